"""``tools/full_supervision_datalist.py``: the fully-supervised reference row trains the segmentation stage on the
training images' ground-truth masks, through the same ``datalist_pseudo.json`` contract as the pseudo-masks."""

import json
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from scripts.errors import DataError

sys.path.insert(0, str(ROOT / "tools"))
from full_supervision_datalist import write_reference  # noqa: E402


def test_every_training_entry_learns_its_own_ground_truth(tiny_demo, tmp_path):
    out = write_reference(tiny_demo, str(tmp_path / "reference" / "datalist_pseudo.json"))
    source, written = json.loads(Path(tiny_demo).read_text()), json.loads(out.read_text())
    assert len(written["training"]) == len(source["training"]) > 0
    for given, entry in zip(source["training"], written["training"]):
        truth = (Path(tiny_demo).parent / given["mask"]).resolve()
        assert (out.parent / entry["pseudo"]).resolve() == truth
        assert [(out.parent / p).resolve() for p in entry["pseudo_layers"]] == [truth]
    assert len(written["validation"]) == len(source["validation"])  # the other splits are kept


def test_a_training_image_without_a_mask_is_named(tiny_demo, tmp_path):
    data = json.loads(Path(tiny_demo).read_text())
    unmasked = data["training"][0]
    del unmasked["mask"]
    datalist = Path(tiny_demo).parent / "unmasked.json"
    datalist.write_text(json.dumps(data))
    with pytest.raises(DataError, match="without a 'mask'.*" + Path(unmasked["image"]).name):
        write_reference(str(datalist), str(tmp_path / "datalist_pseudo.json"))
    assert not (tmp_path / "datalist_pseudo.json").exists()
