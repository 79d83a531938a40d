"""evaluate.json: sliding-window inference on whole images, metrics.json, per-image CSV and overlays; zoom and the
classification gate."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import BUNDLE, ROOT, bundle_run, check_evaluation_report, configs
from monai.bundle import ConfigWorkflow
from monai.networks.nets import FlexibleUNet
from PIL import Image
from seg_fixtures import demo_with_pseudo_masks, validation_pixels

import scripts.seg.net  # noqa: F401  (registers efficientnet-lite0 in FlexibleUNet)
from scripts.cam.net import CAMNet
from scripts.seg.net import GatedSegmenter
from scripts.tta import Averaged

CONFIG = configs("train.json", "evaluate.json")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_demo):
    """The demo datalist and random-weight checkpoints: evaluation needs no training to be tested."""
    root = tmp_path_factory.mktemp("eval")
    datalist = demo_with_pseudo_masks(tiny_demo)
    torch.manual_seed(0)
    segmenter = FlexibleUNet(3, 3, "efficientnet-lite0", pretrained=False)
    with torch.no_grad():
        segmenter.segmentation_head[0].bias.copy_(torch.tensor([0.0, 3.0, 0.0]))  # leaning to "gland"
    torch.save(segmenter.state_dict(), root / "model.pt")
    # a classifier sure that "gland" (class 1) is absent everywhere and the others present: its features are ReLU6
    # outputs (>= 0), so the logits are -sum and +sum of them
    classifier = CAMNet(3, pretrained=False)
    with torch.no_grad():
        classifier.classifier.weight.copy_(
            torch.tensor([1.0, -1.0, 1.0])[:, None, None, None].expand_as(classifier.classifier.weight)
        )
    torch.save(classifier.state_dict(), root / "cam_best.pt")
    return datalist, root


def test_command_line_writes_metrics_csv_and_overlays(setup, tmp_path):
    datalist, root = setup
    args = {
        "datalist": datalist,
        "ckpt_path": root / "model.pt",
        "output_dir": tmp_path,
        "num_workers": 0,
        "progress_bar": False,
        "roi_size": "[32,32]",
    }
    result = subprocess.run(
        [
            sys.executable,
            *bundle_run(None, CONFIG, **args),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["images"] == 2 and metrics["classes"] == ["stroma", "gland", "lymphocytes"]
    for key in (
        "miou",
        "fwiou",
        "dice",
        "mean_dice",
        "image_dice",
        "pixel_accuracy",
        "iou_gland",
        "dice_gland",
        "object_f1",
        "object_dice",
    ):
        assert key in metrics, key
    # whole images, not the 32-px patches of the datalist: every mask pixel counted exactly once, in its class's row
    check_evaluation_report(metrics, datalist)
    rows = list(csv.DictReader((tmp_path / "per_image.csv").open()))
    assert sorted(r["name"] for r in rows) == ["validation_000", "validation_001"]
    assert {"miou", "iou_stroma", "object_f1", "object_dice"} <= set(rows[0])
    assert Image.open(tmp_path / "overlays" / "validation_000.png").size == (3 * 64 + 2 * 4, 64)
    assert "miou" in result.stderr + result.stdout  # printed by StatsHandler


def evaluate(setup, out, check=None, **override):
    """Run evaluate.json with ``override``s; ``check(workflow)`` sees the initialised workflow before the run."""
    datalist, root = setup
    wf = ConfigWorkflow(
        config_file=CONFIG,
        workflow_type=None,
        bundle_root=str(BUNDLE),
        datalist=datalist,
        ckpt_path=str(root / "model.pt"),
        classifier_path=str(root / "cam_best.pt"),
        output_dir=str(out),
        num_workers=0,
        progress_bar=False,
        roi_size=[32, 32],
        overlays=False,
        **override,
    )
    wf.initialize()
    if check is not None:
        check(wf)
    wf.run()
    wf.finalize()
    return json.loads((out / "metrics.json").read_text())


def test_onnxruntime_backend_gives_the_metrics_of_pytorch(setup, tmp_path):
    reference = evaluate(setup, tmp_path / "torch")
    exported = evaluate(setup, tmp_path / "onnxruntime", backend="onnxruntime")
    assert (setup[1] / "model.onnx").is_file()
    assert exported["confusion_matrix"] == reference["confusion_matrix"]


class Colours(torch.nn.Module):
    """A segmenter without weights whose logits are the input's R, G, B: each pixel's class is its dominant colour."""

    def forward(self, x):
        return x


@pytest.fixture(scope="module")
def pattern(tmp_path_factory):
    """A 64-px image whose left half alternates colours at the finest scale (in every 2 x 2 block three red pixels,
    class 0, and one green, class 1) and whose right half is blue (class 2), its mask, and a checkpoint of
    :class:`Colours` (no weights)."""
    root = tmp_path_factory.mktemp("pattern")
    mask = np.full((64, 64), 2, np.uint8)
    mask[:, :32] = 0
    mask[1::2, 1:32:2] = 1
    Image.fromarray(np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)[mask]).save(root / "image.png")
    Image.fromarray(mask).save(root / "mask.png")
    classes = ["stroma", "gland", "lymphocytes"]
    entry = {"image": "image.png", "mask": "mask.png", "label": [1, 1, 1]}
    (root / "datalist.json").write_text(json.dumps({"classes": classes, "training": [], "validation": [entry]}))
    torch.save({"model": {}, "contract": {"classes": classes}}, root / "model.pt")
    return str(root / "datalist.json"), root


@pytest.mark.parametrize(
    "zoom, confusion",
    [
        (1.0, [[1536, 0, 0], [0, 512, 0], [0, 0, 2048]]),  # the full scale: every pixel its own colour
        # half scale: a 2 x 2 block averages to (3/4 red, 1/4 green), class 0; blown back up to the mask size the
        # left half is all class 0 and the border between the halves stays between columns 31 and 32
        (0.5, [[1536, 0, 0], [512, 0, 0], [0, 0, 2048]]),
    ],
)
def test_zoom_predicts_at_another_scale_and_reports_at_the_mask_size(pattern, tmp_path, zoom, confusion):
    metrics = evaluate(pattern, tmp_path, zoom=zoom, network=Colours())
    assert metrics["confusion_matrix"] == confusion


def test_gate_removes_the_classes_the_classifier_rejects(setup, tmp_path):
    plain = evaluate(setup, tmp_path / "plain")
    gated = evaluate(setup, tmp_path / "gated", gate=True)
    gland_predicted = lambda m: sum(row[1] for row in m["confusion_matrix"])  # noqa: E731
    assert gland_predicted(plain) > 0 and gland_predicted(gated) == 0
    # a threshold no class reaches leaves every window as it was (the gate never zeroes all classes)
    assert (
        evaluate(setup, tmp_path / "none", gate=True, gate_threshold=1.1)["confusion_matrix"]
        == plain["confusion_matrix"]
    )


def test_tta_averages_flipped_views_of_every_image(setup, tmp_path):
    def averages_four_views(wf):
        network = wf.parser.get_parsed_content("validate#evaluator").network
        assert isinstance(network, Averaged) and len(network.transforms) == 4
        assert isinstance(network.network, GatedSegmenter)  # probabilities are averaged, after the gate

    metrics = evaluate(setup, tmp_path, check=averages_four_views, seg_tta="flip")
    assert sum(map(sum, metrics["confusion_matrix"])) == validation_pixels(setup[0])
