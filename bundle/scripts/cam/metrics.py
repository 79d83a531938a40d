"""Validation metrics of the CAM classifier, built from ignite and MONAI metrics.

The evaluator's prediction is the class-map stack (B, C, h, w) (see ``train_cam.json``): its spatial mean
is the logit, and the same tensor gives CAM masks. Classification metrics choose the checkpoint; the CAM
mIoU against ground-truth masks is only reported, never used to choose anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from ignite.metrics import ConfusionMatrix, EpochMetric, Metric, MetricsLambda, Precision, Recall, mIoU
from monai.metrics import compute_roc_auc


def probabilities(output: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmoid of the pooled class maps, tags) from an evaluator output."""
    return torch.sigmoid(output["pred"].float().mean((2, 3))), output["label"].long()


def _decisions(output: dict, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    prob, label = probabilities(output)
    return (prob >= threshold).long(), label


def _f1(threshold: float) -> MetricsLambda:
    binary = partial(_decisions, threshold=threshold)
    precision = Precision(average=False, is_multilabel=True, output_transform=binary)
    recall = Recall(average=False, is_multilabel=True, output_transform=binary)
    return precision * recall * 2 / (precision + recall + 1e-12)


def macro_f1(threshold: float = 0.5) -> MetricsLambda:
    """Mean over classes of the per-class F1 at a fixed probability threshold: the checkpoint criterion.

    Args:
        threshold: probability in [0, 1] at or above which a class counts as predicted.

    Returns:
        An ignite metric giving the macro F1 in [0, 1].
    """
    return _f1(threshold).mean()


def report_metrics(classes: Sequence[str], with_masks: bool = False, threshold: float = 0.5) -> dict[str, Metric]:
    """Per-class F1 and ROC-AUC, mean AUC, and (``with_masks``) ``val_cam_miou``: the mIoU of arg-max CAM masks
    against the validation masks, intersections and unions summed over the epoch (the OEEM protocol).

    Args:
        classes: class names in channel order; they name the per-class metrics.
        with_masks: also report ``val_cam_miou`` (the validation entries carry masks).
        threshold: probability in [0, 1] at or above which a class counts as predicted, for the F1s.

    Returns:
        Metric name -> ignite metric: ``val_auc``, ``val_f1_NAME``, ``val_auc_NAME`` and, with masks, ``val_cam_miou``.
    """
    f1 = _f1(threshold)
    auc = EpochMetric(partial(compute_roc_auc, average="none"), output_transform=probabilities, check_compute_fn=False)
    metrics: dict[str, Metric] = {"val_auc": MetricsLambda(lambda v: float(np.nanmean(v)), auc)}
    for i, name in enumerate(classes):
        metrics[f"val_f1_{name}"] = f1[i]
        metrics[f"val_auc_{name}"] = auc[i]
    if with_masks:
        metrics["val_cam_miou"] = mIoU(ConfusionMatrix(len(classes), output_transform=cam_masks))
    return metrics


def cam_masks(output: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-class normalised CAMs of the tagged classes at mask size, mask) for ignite's ConfusionMatrix,
    whose arg-max over classes makes the CAM mask; mask values outside the classes (255) are not counted.
    The evaluator's postprocessing copies the batch's ``mask`` to ``gt_mask`` in its output."""
    mask = output["gt_mask"]
    maps = F.relu(output["pred"].float())
    maps = F.interpolate(maps, size=mask.shape[-2:], mode="bilinear", align_corners=False)
    maps = maps * output["label"].to(maps)[:, :, None, None]
    maps = maps / maps.amax((2, 3), keepdim=True).clamp_min(1e-12)
    return maps, torch.as_tensor(mask)[:, 0].long().to(maps.device)
