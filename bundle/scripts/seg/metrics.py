"""Segmentation metrics as the WSSS papers report them, and the evaluation report (metrics.json, per-image CSV,
overlays).

Everything derives from a confusion matrix (rows ground truth, columns prediction, as ignite's ``ConfusionMatrix``)
summed over the dataset: per-class IoU = TP / (TP + FP + FN), mIoU their mean (OEEM's protocol on GlaS), FwIoU
weighted by ground-truth frequency, OEEM's "Dice" = 2 mIoU / (1 + mIoU), per-class Dice = 2 TP / (2 TP + FP + FN).
A class absent from both ground truth and prediction over the dataset has no IoU (NaN) and is left out of the mean
rather than counted as 0 or 1. Ground-truth pixels outside [0, C) (the 255 ignore index, a dataset's background
index such as LUAD-HistoSeg's 4) are not counted. ``monai.metrics.MeanIoU`` averages per image and has no ignore
index, so it is not used here.

GlaS object metrics (Sirinukunwattana et al. 2017; official evaluation code): objects are the 8-connected components
of one class. A segmented object is a true positive when it covers more than half of the ground-truth object it
overlaps most; object F1 = 2 TP / (2 TP + FP + FN), with counts summed over the dataset. Object Dice per image is
(sum over segmented objects S_j, weighted by area, of Dice(S_j, its best-overlapping ground-truth object) + the same
from the ground-truth side) / 2, 1 when neither side has objects, and is averaged over images.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import ConfusionMatrix, MetricsLambda
from PIL import Image
from skimage.measure import label as connected_components

from ..atomic import atomic_output
from ..constants import IGNORE, PALETTE


def confusion_matrix(pred, target, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """(C, C) int64 pixel counts, rows ground truth, columns prediction; target pixels outside [0, C) or equal to
    ``ignore_index`` are not counted."""
    pred, target = np.asarray(pred, np.int64).ravel(), np.asarray(target, np.int64).ravel()
    valid = (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        valid &= target != ignore_index
    counts = np.bincount(num_classes * target[valid] + pred[valid], minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.full(numerator.shape, np.nan), where=denominator > 0)


def present_mean(values: np.ndarray) -> float:
    """The mean over the classes present (not NaN, see :func:`scores`); NaN when none is."""
    present = values[~np.isnan(values)]
    return float(present.mean()) if present.size else float("nan")


def scores(cm) -> dict:
    """Scores of a confusion matrix: ``miou``, ``fwiou``, ``dice`` (2 mIoU / (1 + mIoU)), ``mean_dice`` (the mean of
    the per-class Dice), ``pixel_accuracy``, and per class ``iou`` and ``class_dice`` (arrays, NaN for a class
    absent from both ground truth and prediction). NaN overall when nothing was counted."""
    cm = np.asarray(cm, np.float64)
    tp, truth, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    iou = _ratio(tp, truth + predicted - tp)
    class_dice = _ratio(2 * tp, truth + predicted)
    total = cm.sum()
    present = ~np.isnan(iou)
    miou = present_mean(iou)
    return {
        "miou": miou,
        "fwiou": float(np.sum(truth[present] * iou[present]) / total) if total else float("nan"),
        "dice": 2 * miou / (1 + miou),
        "mean_dice": present_mean(class_dice),
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
        "iou": iou,
        "class_dice": class_dice,
    }


def object_scores(pred_objects: np.ndarray, true_objects: np.ndarray) -> dict:
    """GlaS object counts (``tp``, ``fp``, ``fn``) and object Dice between two instance maps (0 = no object, objects
    1..n, e.g. from ``skimage.measure.label``)."""
    n_pred, n_true = int(pred_objects.max(initial=0)), int(true_objects.max(initial=0))
    overlap = np.bincount(
        pred_objects.ravel().astype(np.int64) * (n_true + 1) + true_objects.ravel(),
        minlength=(n_pred + 1) * (n_true + 1),
    ).reshape(n_pred + 1, n_true + 1)
    pred_area, true_area, inter = overlap[1:].sum(1), overlap[:, 1:].sum(0), overlap[1:, 1:]
    if n_pred == 0 or n_true == 0:
        return {"tp": 0, "fp": n_pred, "fn": n_true, "dice": float(n_pred == n_true)}
    best_true, best_pred = inter.argmax(1), inter.argmax(0)  # each object's most-overlapping partner
    pred_inter, true_inter = inter.max(1), inter.max(0)
    tp = int(np.sum(pred_inter > 0.5 * true_area[best_true]))
    # Dice with the best partner; an object overlapping nothing has Dice 0 (its inter is 0)
    pred_dice = 2 * pred_inter / (pred_area + true_area[best_true])
    true_dice = 2 * true_inter / (true_area + pred_area[best_pred])
    dice = (np.sum(pred_area * pred_dice) / pred_area.sum() + np.sum(true_area * true_dice) / true_area.sum()) / 2
    return {"tp": tp, "fp": n_pred - tp, "fn": n_true - tp, "dice": float(dice)}


def object_f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


def pseudo_agreement(num_classes: int) -> MetricsLambda:
    """ignite metric: the mIoU of the predicted arg-max against the first pseudo-mask layer (``label[:, 0]``), counts
    summed over the epoch; 255 is not counted. The checkpoint criterion on held-back training images: agreement
    with the pseudo-labels, no ground truth. Needs an evaluator with ``decollate=False``.

    Args:
        num_classes: the number of classes C.

    Returns:
        An ignite metric giving the mIoU in [0, 1].
    """
    matrix = ConfusionMatrix(num_classes, output_transform=lambda o: (o["pred"], o["label"][:, 0].long()))
    return MetricsLambda(lambda cm: scores(cm.cpu().numpy())["miou"], matrix)


def overlay(image: np.ndarray, pred: np.ndarray, mask: np.ndarray, alpha: float = 0.45, gap: int = 4) -> np.ndarray:
    """image | prediction | ground truth side by side, class colours blended over the image (H, W, 3 uint8 image);
    ground-truth pixels outside the palette's classes (ignore) are left unblended."""

    def blend(labels):
        colours = PALETTE[labels % len(PALETTE)].astype(np.float32)
        mixed = (1 - alpha) * image + alpha * colours
        return np.where((labels == IGNORE)[..., None], image, mixed).astype(np.uint8)

    spacer = np.full((image.shape[0], gap, 3), 255, np.uint8)
    return np.concatenate([image, spacer, blend(pred), spacer, blend(mask)], 1)


def _json_value(value):
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_value(v) for v in value]
    value = float(value) if isinstance(value, (float, np.floating)) else value
    return None if isinstance(value, float) and np.isnan(value) else value


class SegmentationReport:
    """ignite handler on an evaluator over whole images (``decollate=True``): per image a confusion matrix, the GlaS
    object counts of ``object_class`` and an overlay PNG; at the end of the run ``metrics.json`` and
    ``per_image.csv`` in ``output_dir`` (atomic writes) and the dataset scores in ``engine.state.metrics``
    (attach it before ``StatsHandler`` so they are printed).

    Reads ``pred`` (C, H, W) class scores and ``image`` (3, H, W in [0, 1]) from the output, ``mask`` (1, H, W)
    and ``name`` from the batch.

    Args:
        output_dir: the folder of ``metrics.json``, ``per_image.csv`` and ``overlays/``.
        classes: class names in channel order.
        object_class: the class whose objects get the GlaS object metrics (e.g. ``"gland"``); None: none.
        ignore_index: a ground-truth value not to count besides those outside [0, C); None: only those.
        overlays: write an overlay PNG per image.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        classes: Sequence[str],
        object_class: str | None = None,
        ignore_index: int | None = None,
        overlays: bool = True,
    ):
        if object_class is not None and object_class not in classes:
            raise ValueError(f"object_class {object_class!r} is not one of the classes {list(classes)}")
        self.output_dir, self.classes, self.ignore_index, self.overlays = (
            Path(output_dir),
            list(classes),
            ignore_index,
            overlays,
        )
        self.object_index = None if object_class is None else self.classes.index(object_class)
        self.reset()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def reset(self, _engine: Engine | None = None) -> None:
        self.rows: list[dict] = []
        self.total = np.zeros((len(self.classes), len(self.classes)), np.int64)
        self.object_counts = np.zeros(3, np.int64)  # tp, fp, fn

    def update(self, engine: Engine) -> None:
        for batch, output in zip(engine.state.batch, engine.state.output):
            pred = torch.as_tensor(output["pred"]).argmax(0).cpu().numpy().astype(np.uint8)
            mask = np.asarray(torch.as_tensor(batch["mask"]).cpu()[0], np.uint8)
            if self.ignore_index is not None:
                mask = np.where(mask == self.ignore_index, IGNORE, mask)
            mask = np.where(mask < len(self.classes), mask, IGNORE)
            cm = confusion_matrix(pred, mask, len(self.classes))
            self.total += cm
            row = {"name": batch["name"], "pixels": int(cm.sum())}
            image_scores = scores(cm)
            row.update({k: image_scores[k] for k in ("pixel_accuracy", "miou", "mean_dice")})
            row.update({f"iou_{c}": v for c, v in zip(self.classes, image_scores["iou"])})
            if self.object_index is not None:
                counted = mask != IGNORE
                objects = object_scores(
                    connected_components((pred == self.object_index) & counted, connectivity=2),
                    connected_components(mask == self.object_index, connectivity=2),
                )
                self.object_counts += [objects["tp"], objects["fp"], objects["fn"]]
                row.update({f"object_{k}": v for k, v in objects.items()})
                row["object_f1"] = object_f1(objects["tp"], objects["fp"], objects["fn"])
            self.rows.append(row)
            if self.overlays:
                image = np.clip(torch.as_tensor(output["image"]).float().cpu().numpy() * 255 + 0.5, 0, 255).astype(
                    np.uint8
                )
                self._save_png(
                    self.output_dir / "overlays" / f"{batch['name']}.png", overlay(image.transpose(1, 2, 0), pred, mask)
                )

    def summary(self) -> dict:
        """Dataset scores from the summed counts (object Dice and ``image_dice`` as means over images)."""
        total = scores(self.total)
        out = {k: total[k] for k in ("miou", "fwiou", "dice", "mean_dice", "pixel_accuracy")}
        out["image_dice"] = float(np.nanmean([r["mean_dice"] for r in self.rows])) if self.rows else float("nan")
        out.update({f"iou_{c}": v for c, v in zip(self.classes, total["iou"])})
        out.update({f"dice_{c}": v for c, v in zip(self.classes, total["class_dice"])})
        if self.object_index is not None:
            out["object_f1"] = object_f1(*self.object_counts.tolist())
            out["object_dice"] = float(np.mean([r["object_dice"] for r in self.rows])) if self.rows else float("nan")
        return out

    def write(self, engine: Engine) -> None:
        summary = self.summary()
        engine.state.metrics.update(summary)
        absent = [c for c, v in zip(self.classes, scores(self.total)["iou"]) if np.isnan(v)]
        report = {
            **summary,
            "images": len(self.rows),
            "classes": self.classes,
            "absent_classes": absent,
            "object_class": None if self.object_index is None else self.classes[self.object_index],
            "overlay_colours": {c: PALETTE[i % len(PALETTE)].tolist() for i, c in enumerate(self.classes)},
            "confusion_matrix": self.total.tolist(),
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with atomic_output(self.output_dir / "metrics.json") as tmp:
            tmp.write_text(json.dumps(_json_value(report), indent=1))
        text = io.StringIO()
        if self.rows:
            writer = csv.DictWriter(text, fieldnames=list(self.rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)
        with atomic_output(self.output_dir / "per_image.csv") as tmp:
            tmp.write_text(text.getvalue())

    @staticmethod
    def _save_png(path: Path, array: np.ndarray) -> None:
        with atomic_output(path) as tmp:
            Image.fromarray(array).save(tmp, format="PNG")
