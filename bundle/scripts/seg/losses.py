"""Multi-layer pseudo-supervision (MLPS, Han et al. 2022): the segmentation loss on pseudo-masks.

MONAI's ``DiceCELoss`` has no ``ignore_index`` (1.6.1), while its ``DiceLoss`` does, so the loss is torch's cross
entropy with ``ignore_index`` plus, optionally, MONAI's ``DiceLoss`` with the same index. Optionally the cross entropy
mines easy pixels (OEEM, Li et al. 2022): pseudo-masks are wrong where the network keeps disagreeing with them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from ..constants import IGNORE
from ..errors import DataError


class PseudoSupervisionLoss(nn.Module):
    """sum over layers l of ``weights[l]`` x (CE + ``lambda_dice`` x Dice) between the logits and pseudo-mask layer l.

    ``pred``: logits (B, C, H, W); ``target``: (B, L, H, W) class indices, one channel per pseudo-mask layer in the
    order of ``weights`` (MLPS: three CAM layers, 0.6 / 0.2 / 0.2); a single pseudo-mask is ``weights=(1.0,)``.
    Pixels equal to ``ignore_index`` count nowhere; a layer with no labelled pixel in the batch adds 0 (torch's
    mean cross entropy would be NaN). The Dice term is over the whole batch (``batch=True``): patches often lack
    a class, and a per-patch Dice of an absent class is all penalty.

    ``easy_mining``: each pixel's cross entropy is weighted by 1 - its loss min-max normalised among the pixels of
    the same patch and pseudo-class (weights not back-propagated), so the pixels the network finds hardest to fit,
    likely pseudo-mask errors, count least; per class, so a rare class is not drowned by an easy common one.

    Args:
        weights: one weight >= 0 per pseudo-mask layer, in the target's channel order.
        lambda_dice: weight >= 0 of the Dice term; 0: cross entropy alone.
        ignore_index: the target value counted nowhere (default 255).
        easy_mining: weight each pixel's cross entropy by how easy it is (see above).
    """

    def __init__(
        self,
        weights: Sequence[float] = (0.6, 0.2, 0.2),
        lambda_dice: float = 0.0,
        ignore_index: int = IGNORE,
        easy_mining: bool = False,
    ):
        super().__init__()
        self.easy_mining = bool(easy_mining)
        self.weights = [float(w) for w in weights]
        if not self.weights or min(self.weights) < 0 or lambda_dice < 0:
            raise DataError(
                "loss weights must be a non-empty list of values >= 0 and lambda_dice >= 0, "
                f"got {weights}, {lambda_dice}"
            )
        self.lambda_dice, self.ignore_index = float(lambda_dice), ignore_index
        self.dice = (
            DiceLoss(to_onehot_y=True, softmax=True, batch=True, ignore_index=ignore_index) if lambda_dice else None
        )

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim != pred.ndim or target.shape[1] != len(self.weights) or target.shape[2:] != pred.shape[2:]:
            raise DataError(
                f"pseudo-mask target {tuple(target.shape)} does not fit logits {tuple(pred.shape)} and "
                f"{len(self.weights)} layer weight(s) {self.weights}: expected (B, {len(self.weights)}, H, W)"
            )
        target = target.long()
        total = pred.new_zeros(())
        for weight, layer in zip(self.weights, target.unbind(1)):
            pixels = F.cross_entropy(pred, layer, ignore_index=self.ignore_index, reduction="none")
            mask = (layer != self.ignore_index).to(pixels.dtype)
            if self.easy_mining:
                mask = mask * self._easy_weights(pixels.detach(), layer, pred.shape[1])
            loss = (pixels * mask).sum() / mask.sum().clamp_min(1)
            if self.dice is not None:
                loss = loss + self.lambda_dice * self.dice(pred, layer[:, None])
            total = total + weight * loss
        return total

    @staticmethod
    def _easy_weights(pixels: torch.Tensor, layer: torch.Tensor, num_classes: int) -> torch.Tensor:
        """(B, H, W) weights 1 - (loss - min) / (max - min) per patch and class; 1 where a class's loss is flat."""
        weights = torch.ones_like(pixels)
        for c in range(num_classes):
            of_class = layer == c
            if not of_class.any():
                continue
            low = torch.where(of_class, pixels, torch.inf).amin((1, 2), keepdim=True)
            high = torch.where(of_class, pixels, -torch.inf).amax((1, 2), keepdim=True)
            spread = (high - low).clamp_min(1e-6)
            weights = torch.where(of_class, 1 - (pixels - low) / spread, weights)
        return weights
