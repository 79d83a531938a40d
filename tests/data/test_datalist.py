"""The datalist format: patch grid, patch tags, validation and atomic writing."""

import json

import numpy as np
import pytest

from scripts.atomic import atomic_output
from scripts.data.datalist import patch_grid, patch_tags, read_classes, write_datalist
from scripts.errors import DataError


def test_patch_grid_covers_image_and_small_images():
    grid = patch_grid(250, 130, 112, 56)
    assert {y for y, _ in grid} == {0, 56, 112, 138} and {x for _, x in grid} == {0, 18}
    assert patch_grid(50, 60, 112, 56) == [(0, 0)]
    with pytest.raises(DataError):
        patch_grid(10, 10, 0, 5)


def test_patch_tags_threshold_and_ignore():
    mask = np.zeros((10, 10), np.uint8)
    mask[:, :1] = 1  # 10 % of the patch
    mask[9, 9] = 255
    assert patch_tags(mask, [(0, 0)], 10, 2, 0.05, 255).tolist() == [[1, 1]]
    assert patch_tags(mask, [(0, 0)], 10, 2, 0.2, 255).tolist() == [[1, 0]]
    ignored = np.full((4, 4), 255, np.uint8)
    assert patch_tags(ignored, [(0, 0)], 4, 2, 0.05, 255).tolist() == [[0, 0]]


def test_write_datalist_rejects_wrong_label_length(tmp_path):
    with pytest.raises(DataError, match="multi-hot"):
        write_datalist(tmp_path / "d.json", ["a", "b"], {"training": [{"image": "x.png", "label": [1, 0, 1]}]})
    assert not (tmp_path / "d.json").exists()


def test_write_datalist_makes_paths_relative_and_reads_classes(tmp_path):
    (tmp_path / "img").mkdir()
    out = tmp_path / "lists" / "d.json"
    write_datalist(out, ["a", "b"], {"validation": [{"image": str(tmp_path / "img" / "x.png"), "label": [0, 1]}]})
    data = json.loads(out.read_text())
    assert data["validation"][0]["image"] == "../img/x.png" and data["training"] == [] and data["test"] == []
    assert read_classes(out) == ["a", "b"]


@pytest.mark.parametrize("classes", [[], ["a", "a"], ["a", ""]])
def test_bad_class_lists_are_refused(tmp_path, classes):
    with pytest.raises(DataError, match="class"):
        write_datalist(tmp_path / "d.json", classes, {"training": [{"image": "x.png", "label": [1] * len(classes)}]})


def test_read_classes_names_a_broken_file(tmp_path):
    (tmp_path / "d.json").write_text("{not json")
    with pytest.raises(DataError, match="d.json: not valid JSON"):
        read_classes(tmp_path / "d.json")


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "sub" / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert not target.exists() and list(target.parent.iterdir()) == []
    with atomic_output(target) as tmp:
        assert tmp.suffix == ".json" and tmp.parent == target.parent
        tmp.write_text("done")
    assert target.read_text() == "done" and list(target.parent.iterdir()) == [target]
