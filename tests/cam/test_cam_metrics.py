"""Validation metrics of the CAM classifier on hand-made evaluator outputs with known answers."""

import pytest
import torch
from ignite.engine import Engine

from scripts.cam.metrics import macro_f1, report_metrics


def run(batches, metrics):
    engine = Engine(lambda _engine, batch: batch)
    for name, metric in metrics.items():
        metric.attach(engine, name)
    engine.run(batches, max_epochs=1)
    return engine.state.metrics


def maps_for(logits, size=4):
    """Constant class maps whose spatial mean is ``logits``."""
    return torch.tensor(logits, dtype=torch.float32)[:, :, None, None].expand(-1, -1, size, size).clone()


def test_per_class_f1_and_auc():
    label = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]])
    pred = maps_for([[3.0, -2.0], [2.0, -1.0], [-1.0, 2.0], [1.0, -3.0]])  # class 0: 1 FP; class 1: 1 FN
    metrics = run([{"pred": pred, "label": label}], {"val_f1": macro_f1(), **report_metrics(["a", "b"])})
    assert metrics["val_f1_a"] == pytest.approx(0.8)  # P 2/3, R 1
    assert metrics["val_f1_b"] == pytest.approx(2 / 3)  # P 1, R 1/2
    assert metrics["val_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert metrics["val_auc_a"] == pytest.approx(1.0) and metrics["val_auc_b"] == pytest.approx(1.0)
    assert "val_cam_miou" not in metrics


def test_cam_miou_uses_only_tagged_classes_and_ignores_255():
    # class 0 is strongest on the left half, class 1 on the right; masks at twice the CAM resolution
    pred = torch.zeros(1, 2, 2, 2)
    pred[0, 0, :, 0], pred[0, 1, :, 1] = 5.0, 1.0  # unequal peaks: per-class normalisation must even them
    gt = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    gt[..., 2:] = 1
    gt[..., 0, :] = 255  # not counted
    both = {"pred": pred, "label": torch.tensor([[1, 1]]), "gt_mask": gt}
    only_first = {"pred": pred, "label": torch.tensor([[1, 0]]), "gt_mask": gt}
    assert run([both], report_metrics(["a", "b"], with_masks=True))["val_cam_miou"] == pytest.approx(1.0)
    # tagged with class 0 alone, the whole patch becomes class 0: IoU(a) = 6/12, IoU(b) = 0
    assert run([only_first], report_metrics(["a", "b"], with_masks=True))["val_cam_miou"] == pytest.approx(0.25)
