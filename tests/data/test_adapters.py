"""Dataset adapters: each format on fixture files written here, GlaS on the real data, and bad input."""

import json

import numpy as np
import pytest
from conftest import shared
from PIL import Image

from scripts.data.__main__ import main
from scripts.data.adapters import bcss_wsss, from_csv, from_mask_folder, glas, luad_histoseg
from scripts.errors import DataError

PALETTE = [0, 64, 128, 255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255]


def save(path, array, palette=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if palette:
        img = img.convert("P") if img.mode != "P" else img
        img.putpalette(palette)
    img.save(path)
    return path


def rgb(h=64, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def mask_folder(tmp_path, names_splits=(("a", "training"), ("b", "validation"))):
    for i, (name, _) in enumerate(names_splits):
        save(tmp_path / "images" / f"{name}.png", rgb(seed=i))
        mask = np.zeros((64, 64), np.uint8)
        mask[: 16 * (i + 1)] = 1
        save(tmp_path / "masks" / f"{name}.png", mask)
    (tmp_path / "labels.csv").write_text("name,split\n" + "".join(f"{n},{s}\n" for n, s in names_splits))
    return tmp_path


def test_mask_folder_patches_tags_and_relative_paths(tmp_path):
    out = from_mask_folder(mask_folder(tmp_path), tmp_path / "dl" / "datalist.json", ["bg", "fg"], 32, 32, 0.05)
    data = json.loads(open(out).read())
    assert data["classes"] == ["bg", "fg"]
    assert len(data["training"]) == 4 and len(data["validation"]) == 4 and data["test"] == []
    first = data["training"][0]
    assert first["image"] == "../images/a.png" and first["mask"] == "../masks/a.png"
    # image a: rows 0-15 are fg -> top patches have both tags, bottom ones only bg
    assert [e["label"] for e in data["training"]] == [[1, 1], [1, 1], [1, 0], [1, 0]]
    assert first["location"] == [0, 0] and first["size"] == [32, 32]


def test_glas_real_data(tmp_path):
    data_dir = shared("glas")
    out = json.loads(open(glas(data_dir, tmp_path / "glas.json")).read())
    assert out["classes"] == ["non-gland", "gland"]
    train_images = {e["image"] for e in out["training"]}
    assert len(train_images) == 44 and len({e["image"] for e in out["validation"]}) == 30
    assert len(out["training"]) == 5017  # 112-px patches, stride 56
    frac = np.mean([e["label"] for e in out["training"]], axis=0)
    assert 0.8 < frac[0] < 0.95 and 0.75 < frac[1] < 0.9


def histoseg_fixture(tmp_path, names):
    for i, name in enumerate(names):
        save(tmp_path / "training" / name, rgb(seed=i))
    mask = np.zeros((64, 64), np.uint8)
    mask[:32] = 2
    mask[32:, :8] = 4  # white background: ignored, not a class
    for folder in ("val", "test"):
        save(tmp_path / folder / "img" / "x.png", rgb())
        save(tmp_path / folder / "mask" / "x.png", mask, PALETTE)
    return tmp_path


def test_luad_histoseg(tmp_path):
    data_dir = histoseg_fixture(tmp_path, ["p1-[1 0 0 1].png", "p2-[0 1 1 0].png"])
    data = json.loads(open(luad_histoseg(data_dir, tmp_path / "dl.json")).read())
    assert data["classes"] == ["TE", "NEC", "LYM", "TAS"] and data["mask_ignore_index"] == 4
    assert [e["label"] for e in data["training"]] == [[1, 0, 0, 1], [0, 1, 1, 0]]
    assert data["validation"][0]["label"] == [1, 0, 1, 0] and data["test"][0]["mask"] == "test/mask/x.png"


def test_bcss_wsss(tmp_path):
    data_dir = histoseg_fixture(tmp_path, ["q[1101].png"])
    data = json.loads(open(bcss_wsss(data_dir, tmp_path / "dl.json")).read())
    assert data["classes"] == ["TUM", "STR", "LYM", "NEC"] and data["training"][0]["label"] == [1, 1, 0, 1]


def test_from_csv(tmp_path):
    save(tmp_path / "t" / "a.png", rgb())
    save(tmp_path / "t" / "b.jpg", rgb(seed=1))
    save(tmp_path / "t" / "b_mask.png", np.ones((64, 64), np.uint8))
    (tmp_path / "tiles.csv").write_text(
        'path,labels,split,mask\nt/a.png,tumour,,\nt/b.jpg,"stroma, tumour",validation,t/b_mask.png\n'
    )
    data = json.loads(open(from_csv(tmp_path / "tiles.csv", tmp_path / "dl.json")).read())
    assert data["classes"] == ["stroma", "tumour"]
    assert data["training"] == [{"image": "t/a.png", "label": [0, 1]}]
    assert data["validation"][0]["label"] == [1, 1] and data["validation"][0]["mask"] == "t/b_mask.png"


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_file", "file not found"),
        ("unreadable", "cannot read the image"),
        ("no_tag", "no tag string"),
        ("wrong_count", "has 3 values, expected 4"),
        ("empty_folder", "no training images"),
        ("unknown_class", "unknown class"),
        ("bad_split", "split 'holdout'"),
    ],
)
def test_bad_input_names_the_file_and_writes_nothing(tmp_path, case, message):
    out = tmp_path / "out" / "datalist.json"
    if case == "missing_file":
        (tmp_path / "tiles.csv").write_text("path,labels\nnope.png,tumour\n")
        run, culprit = lambda: from_csv(tmp_path / "tiles.csv", out), "nope.png"
    elif case == "unreadable":
        (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        (tmp_path / "tiles.csv").write_text("path,labels\nbad.png,tumour\n")
        run, culprit = lambda: from_csv(tmp_path / "tiles.csv", out), "bad.png"
    elif case == "no_tag":
        histoseg_fixture(tmp_path, ["p1-[1 0 0 1].png", "untagged.png"])
        run, culprit = lambda: luad_histoseg(tmp_path, out), "untagged.png"
    elif case == "wrong_count":
        histoseg_fixture(tmp_path, ["p1-[1 0 1].png"])
        run, culprit = lambda: luad_histoseg(tmp_path, out), "p1-[1 0 1].png"
    elif case == "empty_folder":
        (tmp_path / "training").mkdir()
        run, culprit = lambda: bcss_wsss(tmp_path, out), "training"
    elif case == "unknown_class":
        save(tmp_path / "a.png", rgb())
        (tmp_path / "tiles.csv").write_text("path,labels\na.png,tumor\n")
        run, culprit = lambda: from_csv(tmp_path / "tiles.csv", out, classes=["tumour", "stroma"]), "tiles.csv"
    else:
        mask_folder(tmp_path, (("a", "training"), ("b", "holdout")))
        run, culprit = lambda: from_mask_folder(tmp_path, out, ["bg", "fg"]), "labels.csv"
    with pytest.raises(DataError, match=message) as err:
        run()
    assert culprit in str(err.value)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_command_line_prints_error_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["from_csv", str(tmp_path / "missing.csv"), str(tmp_path / "o.json")])
    assert "missing.csv: file not found" in str(exit_.value.code)
