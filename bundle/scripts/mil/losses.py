"""IKD-MIL losses: the teacher's Dice to the broadcast image tag, and the student's distillation loss.

Both are deep-supervised: every side output and the fused map (see :class:`scripts.mil.net.MILNet`) is scored, each
class through its own sigmoid. The Dice is MONAI's ``DiceLoss`` over the batch (``batch=True``) per output and class:
the MIL negatives (the untagged images) then count as false positives of their class. Per image, an all-zero target's
Dice, 1 - 1 / (sum(p) + 1), is flat until the map is almost empty: on a 112-px patch lit at 0.9 its gradient is
1/5600 of a tagged patch's (half of it over the batch), so with most patches tagged the maps saturated (GlaS, 2
epochs: non-gland IoU 0.26, its tag AUC below chance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from ..constants import IGNORE
from ..errors import DataError


def tag_targets(tags: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C) multi-hot tags -> (B, C, H, W) maps: all ones for a tagged class (the MIL assumption: a tagged patch
    has some of the class), all zeros for an untagged one (it has none)."""
    return tags.float()[:, :, None, None].expand(*tags.shape, *size)


def _deep_dice(dice: DiceLoss, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over the S + 1 outputs of ``pred`` (B, S + 1, C, H, W) of the Dice against ``target`` (B, C, H, W)."""
    if pred.ndim != 5 or target.shape != (pred.shape[0], *pred.shape[2:]):
        raise DataError(
            f"MIL outputs {tuple(pred.shape)} and target {tuple(target.shape)} do not fit: "
            "expected (B, S + 1, C, H, W) and (B, C, H, W)"
        )
    outputs = pred.shape[1]  # outputs x classes as channels: the batch Dice pools images, never outputs or classes
    return outputs * dice(pred.flatten(1, 2), target[:, None].expand_as(pred).flatten(1, 2))


class TagDiceLoss(nn.Module):
    """The teacher's loss: Dice of every side output and the fused map against :func:`tag_targets`.

    ``pred``: (B, S + 1, C, H, W) logits; ``target``: (B, C) tags.
    """

    def __init__(self):
        super().__init__()
        self.dice = DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0, batch=True)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _deep_dice(self.dice, pred, tag_targets(target, pred.shape[-2:]))


def confident_labels(maps: torch.Tensor, confidence: float) -> torch.Tensor:
    """(B, C, H, W) teacher probabilities -> hard per-class labels: 1 where the map is >= ``confidence``, 0 where it
    is <= 1 - ``confidence``, :data:`IGNORE` between (the paper's float -> long cast kept only maps of exactly 1)."""
    if not 0.5 <= confidence <= 1:
        raise DataError(f"MIL confidence must be in [0.5, 1], got {confidence}")
    labels = torch.full_like(maps, IGNORE, dtype=torch.long)
    labels[maps <= 1 - confidence] = 0
    labels[maps >= confidence] = 1
    return labels


def easy_weights(losses: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """OEEM-style weights (Li et al. 2022) of per-pixel ``losses`` (B, C, H, W): per image and class, the softmax of
    the negative loss over its ``valid`` pixels, scaled to mean 1 there (0 elsewhere). The pixels the network fits most
    easily count most; the ones it keeps disagreeing with, likely wrong labels, least. Not back-propagated."""
    scores = torch.where(valid, -losses.detach().float(), -torch.inf).flatten(2)
    count = valid.flatten(2).sum(-1, keepdim=True)
    weights = torch.softmax(scores, -1).nan_to_num(0.0) * count
    return weights.view_as(losses)


class DistillationLoss(nn.Module):
    """The student's loss against the teacher's fused map ``target`` (B, C, H, W), in [0, 1], zero for every class the
    image is not tagged with (:class:`scripts.mil.distill.TeacherTargets` makes it): Dice of every side output and the
    fused map against it, plus ``ce_weight`` x the binary cross entropy of the fused map on :func:`confident_labels`,
    weighted by :func:`easy_weights` and averaged over the confident pixels.

    Args:
        confidence: the teacher probability in [0.5, 1] from which a pixel's hard label counts.
        ce_weight: weight >= 0 of the cross-entropy term.
    """

    def __init__(self, confidence: float = 0.9, ce_weight: float = 1.0):
        super().__init__()
        if ce_weight < 0:
            raise DataError(f"MIL ce_weight must be >= 0, got {ce_weight}")
        confident_labels(torch.zeros(1), confidence)  # checks the value now, not at the first batch
        self.confidence, self.ce_weight = float(confidence), float(ce_weight)
        self.dice = DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0, batch=True)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = _deep_dice(self.dice, pred, target)
        if not self.ce_weight:
            return loss
        labels = confident_labels(target, self.confidence)
        valid = labels != IGNORE
        pixels = F.binary_cross_entropy_with_logits(pred[:, -1].float(), labels.clamp_max(1).float(), reduction="none")
        weights = easy_weights(pixels, valid)
        return loss + self.ce_weight * (pixels * weights).sum() / valid.sum().clamp_min(1)
