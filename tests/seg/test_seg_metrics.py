"""Evaluation metrics against hand-computed values: ignore, absent classes, GlaS object F1 and object Dice, the
pseudo-mask agreement criterion and the report handler."""

import csv
import json

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from PIL import Image

from scripts.seg.metrics import (
    SegmentationReport,
    confusion_matrix,
    object_f1,
    object_scores,
    pseudo_agreement,
    scores,
)

# 7 pixels, 3 classes: 255 (ignore) and 7 (outside the classes) are not counted; class 2 is predicted only on an
# ignored pixel, so it is absent from both sides over what counts
TARGET = np.array([0, 0, 0, 1, 1, 255, 7])
PRED = np.array([0, 0, 1, 1, 0, 2, 2])


def test_confusion_matrix_skips_ignored_pixels():
    cm = confusion_matrix(PRED, TARGET, 3)
    np.testing.assert_array_equal(cm, [[2, 1, 0], [1, 1, 0], [0, 0, 0]])
    # a dataset's own ignore value inside the class range (here class 1) is dropped too
    np.testing.assert_array_equal(confusion_matrix(PRED, TARGET, 3, ignore_index=1), [[2, 1, 0], [0, 0, 0], [0, 0, 0]])


def test_scores_by_hand_with_an_absent_class():
    s = scores(confusion_matrix(PRED, TARGET, 3))
    np.testing.assert_allclose(s["iou"][:2], [2 / 4, 1 / 3])
    assert np.isnan(s["iou"][2]) and np.isnan(s["class_dice"][2])  # absent everywhere: left out of the mean
    assert s["miou"] == pytest.approx(5 / 12)
    assert s["fwiou"] == pytest.approx((3 * 0.5 + 2 / 3) / 5)
    assert s["dice"] == pytest.approx(10 / 17)  # OEEM: 2 mIoU / (1 + mIoU)
    np.testing.assert_allclose(s["class_dice"][:2], [4 / 6, 2 / 4])
    assert s["mean_dice"] == pytest.approx(7 / 12)
    assert s["pixel_accuracy"] == pytest.approx(3 / 5)


def test_a_class_predicted_but_not_in_the_ground_truth_counts_as_zero():
    s = scores(confusion_matrix([0, 1], [0, 0], 2))
    np.testing.assert_allclose(s["iou"], [0.5, 0.0])
    assert s["miou"] == pytest.approx(0.25)


def test_nothing_counted_gives_nan_not_an_error():
    s = scores(np.zeros((2, 2)))
    assert np.isnan(s["miou"]) and np.isnan(s["pixel_accuracy"]) and np.isnan(s["fwiou"])


def glands():
    """Ground truth G1 (16 px), G2 (4 px); segmented S1 (10 px inside G1: TP), S2 (4 px, 1 inside G2: FP), S3 (3 px
    on nothing: FP); G2 is missed (FN)."""
    true, pred = np.zeros((8, 8), np.int32), np.zeros((8, 8), np.int32)
    true[0:4, 0:4], true[6:8, 6:8] = 1, 2
    pred[0:2, 0:4], pred[2, 0:2] = 1, 1
    pred[5:7, 5:7] = 2
    pred[7, 0:3] = 3
    return pred, true


def test_object_f1_and_object_dice_by_hand():
    result = object_scores(*glands())
    assert (result["tp"], result["fp"], result["fn"]) == (1, 2, 1)
    assert object_f1(1, 2, 1) == pytest.approx(2 / 5)
    d11, d22 = 20 / 26, 2 / 8
    from_segmented = (10 * d11 + 4 * d22 + 3 * 0) / 17
    from_truth = (16 * d11 + 4 * d22) / 20
    assert result["dice"] == pytest.approx((from_segmented + from_truth) / 2)


def test_objects_need_more_than_half_of_their_ground_truth():
    true = np.zeros((4, 4), np.int32)
    true[:, :2] = 1
    half = np.zeros_like(true)
    half[:2, :2] = 1  # exactly half: not a TP (official GlaS code: > 0.5)
    assert object_scores(half, true)["tp"] == 0
    half[2, 0] = 1
    assert object_scores(half, true)["tp"] == 1


def test_object_scores_without_objects():
    empty = np.zeros((4, 4), np.int32)
    one = empty.copy()
    one[1, 1] = 1
    assert object_scores(empty, empty) == {"tp": 0, "fp": 0, "fn": 0, "dice": 1.0}
    assert object_scores(one, empty) == {"tp": 0, "fp": 1, "fn": 0, "dice": 0.0}
    assert object_scores(empty, one) == {"tp": 0, "fp": 0, "fn": 1, "dice": 0.0}
    assert object_f1(0, 0, 0) == 1.0


def test_pseudo_agreement_is_the_miou_against_the_first_layer_over_the_epoch():
    logits = torch.nn.functional.one_hot(torch.as_tensor(PRED), 3).T.float()[None, :, None, :]  # (1, 3, 1, 7)
    layer0 = torch.as_tensor(np.where(TARGET == 7, 255, TARGET))[None, None, None]  # (1, 1, 1, 7)
    label = torch.cat([layer0, torch.zeros_like(layer0)], 1)  # the second layer must not count
    engine = Engine(lambda e, b: b)
    pseudo_agreement(3).attach(engine, "agreement")
    state = engine.run([{"pred": logits, "label": label}] * 2)
    assert state.metrics["agreement"] == pytest.approx(5 / 12)


def test_report_writes_metrics_csv_and_overlays(tmp_path):
    size = (4, 8)
    gt = np.zeros(size, np.uint8)
    gt[:, 4:] = 1
    gt[0, 0] = 255
    pred = gt.copy()
    pred[0, 0] = 1
    pred[3, 4:] = 0  # 4 gland pixels predicted as background
    logits = torch.nn.functional.one_hot(torch.as_tensor(pred, dtype=torch.long), 2).permute(2, 0, 1).float()
    item = ({"mask": torch.as_tensor(gt)[None], "name": "a"}, {"pred": logits, "image": torch.rand(3, *size)})

    def step(engine, _):
        engine.state.batch = [item[0]]
        return [item[1]]

    engine = Engine(step)
    report = SegmentationReport(tmp_path, ["non-gland", "gland"], object_class="gland")
    report.attach(engine)
    engine.run([0])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # 31 counted pixels (one ignored); rows ground truth: 15 background right, 4 of 16 gland pixels missed
    assert metrics["confusion_matrix"] == [[15, 0], [4, 12]]
    assert metrics["iou_non-gland"] == pytest.approx(15 / 19) and metrics["iou_gland"] == pytest.approx(12 / 16)
    assert metrics["miou"] == pytest.approx((15 / 19 + 12 / 16) / 2)
    assert metrics["object_f1"] == 1.0 and metrics["images"] == 1 and metrics["absent_classes"] == []
    assert engine.state.metrics["miou"] == pytest.approx(metrics["miou"])
    rows = list(csv.DictReader((tmp_path / "per_image.csv").open()))
    assert [r["name"] for r in rows] == ["a"] and float(rows[0]["pixel_accuracy"]) == pytest.approx(27 / 31)
    overlay = np.asarray(Image.open(tmp_path / "overlays" / "a.png"))
    assert overlay.shape == (4, 3 * 8 + 2 * 4, 3)
