"""Checkpoints carry their contract (class names, backbone, scaling, version); loaders refuse other classes; a user
error ends `monai.bundle run` with one line."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import BUNDLE, bundle_run
from monai.networks.nets import FlexibleUNet
from monai.transforms import ScaleIntensityRanged
from PIL import Image

import scripts.seg.net  # noqa: F401  (registers efficientnet-lite0)
from scripts.checkpoints import Contract, check_classes, checkpoint_classes, load_network
from scripts.errors import DataError, user_error
from scripts.pipeline import record_classes

CLASSES = ["stroma", "gland", "lymphocytes"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random-weight segmentation checkpoint as train.json saves it: weights and contract in one dict."""
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.manual_seed(0)
    network = FlexibleUNet(3, 3, "efficientnet-lite0", pretrained=False)
    contract = Contract(CLASSES, "efficientnet-lite0", ScaleIntensityRanged("image", 0, 255, 0.0, 1.0))
    torch.save({"model": network.state_dict(), "contract": contract.state_dict()}, path)
    return path


def test_the_contract_loads_with_weights_only(checkpoint):
    saved = torch.load(checkpoint, weights_only=True)["contract"]
    assert saved["classes"] == CLASSES and saved["backbone"] == "efficientnet-lite0"
    assert (
        saved["scaling"] == [0, 255, 0, 1]
        and saved["version"] == json.loads((BUNDLE / "configs" / "metadata.json").read_text())["version"]
    )
    assert checkpoint_classes(checkpoint) == CLASSES and checkpoint_classes(checkpoint.parent / "none.pt") is None


@pytest.mark.parametrize("classes", [["gland", "stroma", "lymphocytes"], ["stroma", "glnd", "lymphocytes"], ["stroma"]])
def test_other_classes_are_refused(checkpoint, classes):
    with pytest.raises(DataError, match=r"model.pt: the model was trained on classes \['stroma', 'gland'"):
        check_classes(checkpoint, classes)
    with pytest.raises(DataError, match="trained on classes"):
        load_network(FlexibleUNet(3, 3, "efficientnet-lite0", pretrained=False), checkpoint, "model", classes=classes)


def test_the_same_classes_load_and_an_old_checkpoint_warns(checkpoint, tmp_path, caplog):
    network = load_network(
        FlexibleUNet(3, 3, "efficientnet-lite0", pretrained=False), checkpoint, "model", classes=CLASSES
    )
    assert not network.training
    old = tmp_path / "old.pt"
    torch.save(torch.load(checkpoint, weights_only=True)["model"], old)  # v0.5: a bare state dict
    with caplog.at_level("WARNING"):
        assert check_classes(old, ["a", "b", "c"]) == ["a", "b", "c"]
    assert "records no class names" in caplog.text


def test_run_training_records_the_datalist_classes_in_metadata(tmp_path):
    metadata = tmp_path / "metadata.json"
    metadata.write_text((BUNDLE / "configs" / "metadata.json").read_text())
    datalist = tmp_path / "d.json"
    datalist.write_text(
        json.dumps({"classes": ["non-gland", "gland"], "training": [{"image": "a.png", "label": [1, 0]}]})
    )
    record_classes(metadata, datalist)
    pred = json.loads(metadata.read_text())["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {"0": "non-gland", "1": "gland"} and pred["num_channels"] == 2


def test_user_errors_are_found_in_the_exception_chain():
    try:
        try:
            raise DataError("x.json: datalist not found")
        except DataError as e:
            raise RuntimeError("Failed to evaluate ConfigExpression") from e
    except RuntimeError as wrapped:
        assert user_error(wrapped) == "x.json: datalist not found"
    assert user_error(ValueError("run ID 'trainig' doesn't exist in the config file.")).startswith("config: run ID")
    assert user_error(ZeroDivisionError()) is None  # a bug keeps its traceback


def run_inference(tmp_path, **overrides):
    tile = tmp_path / "tile.png"
    Image.fromarray(np.full((64, 64, 3), 180, np.uint8)).save(tile)
    config = BUNDLE / "configs" / "inference.json"
    args = bundle_run("inference", config, input=tile, output_dir=tmp_path / "out", progress_bar=False, **overrides)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)


def test_inference_refuses_reordered_classes_in_one_line_and_writes_nothing(checkpoint, tmp_path):
    result = run_inference(tmp_path, ckpt_path=checkpoint, classes="['gland','stroma','lymphocytes']")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {checkpoint}: the model was trained on classes ['stroma', 'gland'")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_inference_takes_the_checkpoints_classes_by_default(checkpoint, tmp_path):
    result = run_inference(tmp_path, ckpt_path=checkpoint)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(next((tmp_path / "out").glob("*_summary.json")).read_text())
    assert summary["classes"] == CLASSES and list(summary["class_pixels"]) == CLASSES
