"""train_cam.json end to end through monai.bundle on tiny synthetic data: train, validate, resume, bad values."""

import json
import re

import numpy as np
import pytest
import torch
from conftest import BUNDLE, configs
from monai.bundle import ConfigWorkflow

from scripts.cam.metrics import cam_masks
from scripts.errors import DataError

CONFIG = configs("train_cam.json")
TINY = {  # random weights, 32-px inputs, no worker processes: seconds on a CPU
    "pretrained": False,
    "cam_input_size": 32,
    "batch_size": 4,
    "num_workers": 0,
    "progress_bar": False,
    "pda_warmup_epochs": 0,
}


@pytest.fixture(scope="module")
def datalist(tiny_demo):
    return tiny_demo


def workflow(datalist, out, **override):
    torch.set_num_threads(1)
    wf = ConfigWorkflow(
        config_file=CONFIG,
        workflow_type="train",
        bundle_root=str(BUNDLE),
        datalist=datalist,
        ckpt_dir=str(out / "models"),
        log_dir=str(out / "logs"),
        **{**TINY, **override},
    )
    wf.initialize()
    return wf


def validation_by_hand(wf) -> tuple[float, float]:
    """The trained network's macro F1 (probability >= 0.5) and arg-max CAM mIoU (ignite's: the mean over every class,
    0 for one absent from both sides) on the validation split, counted here in numpy from its class maps; only the CAM
    masks themselves come from :func:`cam_masks` (checked by hand in test_cam_metrics.py)."""
    network = wf.parser.get_parsed_content("network").eval()
    n = len(wf.parser.get_parsed_content("classes"))
    tp, fp, fn, confusion = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros((n, n))
    for batch in wf.parser.get_parsed_content("validate#dataloader"):
        with torch.no_grad():
            maps = network.class_maps(batch["image"])
        predicted, tags = torch.sigmoid(maps.mean((2, 3))).numpy() >= 0.5, batch["label"].numpy() == 1
        tp, fp, fn = tp + (predicted & tags).sum(0), fp + (predicted & ~tags).sum(0), fn + (~predicted & tags).sum(0)
        cams, mask = cam_masks({"pred": maps, "label": batch["label"], "gt_mask": batch["mask"]})
        cam, mask = cams.argmax(1).numpy().ravel(), mask.numpy().ravel()
        confusion += np.bincount(n * mask[mask < n] + cam[mask < n], minlength=n * n).reshape(n, n)
    precision, recall = tp / np.maximum(tp + fp, 1), tp / np.maximum(tp + fn, 1)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
    iou = np.diag(confusion) / np.maximum(confusion.sum(0) + confusion.sum(1) - np.diag(confusion), 1)
    return f1.mean(), iou.mean()


def test_bundle_properties(datalist, tmp_path):
    assert not workflow(datalist, tmp_path).check_properties()


@pytest.mark.parametrize("adl, pda", [(False, False), (True, True)])
def test_one_epoch_then_resume(datalist, tmp_path, adl, pda):
    wf = workflow(datalist, tmp_path, adl=adl, pda=pda, **{"train#trainer#max_epochs": 1})
    wf.run()
    trainer = wf.parser.get_parsed_content("train#trainer")
    metrics = wf.parser.get_parsed_content("validate#evaluator").state.metrics
    classes = json.loads(open(datalist).read())["classes"]
    assert {"val_f1", "val_auc", "val_cam_miou", *(f"val_f1_{c}" for c in classes)} <= set(metrics)
    f1, cam_miou = validation_by_hand(wf)  # the network is as validated: nothing changes it after the last epoch
    assert metrics["val_f1"] == pytest.approx(f1) and metrics["val_cam_miou"] == pytest.approx(cam_miou)
    models = tmp_path / "models"
    assert {"cam_best.pt", "cam_last.pt"} <= {p.name for p in models.iterdir()}
    best = torch.load(models / "cam_best.pt", weights_only=True)
    assert best["model"].keys() == wf.parser.get_parsed_content("network").state_dict().keys()
    assert best["contract"]["classes"] == classes
    steps = trainer.state.iteration
    wf.finalize()

    resumed = workflow(datalist, tmp_path, adl=adl, pda=pda, resume=True, **{"train#trainer#max_epochs": 2})
    resumed.run()
    trainer = resumed.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 2 and trainer.state.iteration == 2 * steps  # epoch 1 was not repeated
    if pda:
        assert resumed.parser.get_parsed_content("network").pda_gamma.item() == pytest.approx(0.98**2)
    resumed.finalize()


def test_init_from_starts_a_new_run_from_trained_weights(datalist, tmp_path):
    """Fine-tuning (e.g. at a larger input size): the weights come from ``init_from``, the epochs start again."""
    torch.manual_seed(1)
    start = workflow(datalist, tmp_path / "a").parser.get_parsed_content("network").state_dict()
    torch.save(start, tmp_path / "start.pt")
    wf = workflow(datalist, tmp_path / "b", init_from=str(tmp_path / "start.pt"), **{"train#trainer#max_epochs": 1})
    for key, value in wf.parser.get_parsed_content("network").state_dict().items():
        torch.testing.assert_close(value, start[key])
    wf.run()
    assert wf.parser.get_parsed_content("train#trainer").state.epoch == 1
    wf.finalize()
    missing = workflow(datalist, tmp_path / "c", init_from=str(tmp_path / "nowhere.pt"))
    with pytest.raises(RuntimeError) as info:
        missing.parser.get_parsed_content("network")
    cause = info.value
    while cause.__cause__ is not None and not isinstance(cause, DataError):
        cause = cause.__cause__
    assert isinstance(cause, DataError) and re.search(r"nowhere\.pt: CAM classifier .* not found", str(cause))


@pytest.mark.parametrize(
    "override, match",
    [
        ({"cam_backbone": "resnet_9000"}, r"unknown backbone 'resnet_9000'; choose one of \['efficientnet_lite0'\]"),
        ({"classes": []}, "num_classes must be at least 1"),
    ],
)
def test_bad_values_give_clear_errors(datalist, tmp_path, override, match):
    wf = workflow(datalist, tmp_path, **override)
    with pytest.raises(RuntimeError) as info:  # monai.bundle wraps the error of the component it built
        wf.parser.get_parsed_content("network_def")
    cause = info.value
    while cause.__cause__ is not None and not isinstance(cause, DataError):
        cause = cause.__cause__
    assert isinstance(cause, DataError)
    assert re.search(match, str(cause))


def test_datalist_without_classes_is_refused(tmp_path):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"classes": [], "training": [], "validation": []}))
    wf = workflow(str(path), tmp_path)
    with pytest.raises(RuntimeError) as info:
        wf.parser.get_parsed_content("classes")
    assert "no classes given" in str(info.value.__cause__)
