"""A trained segmentation network's class maps in place of CAMs: the prompt source of a self-training round."""

from __future__ import annotations

import logging

import torch
from monai.inferers import SlidingWindowInferer
from torch import nn

from .. import tta as augment

logger = logging.getLogger(__name__)


class SegmentationMaps:
    """Inferer for self-training (``relabel.json``): a trained segmentation network's class probabilities stand in for
    the CAMs, as one layer (B, 1, C, H, W), so the next round's prompts come from its sharper, better separated regions.
    Images are scaled to [0, 1] and read in ``roi_size`` windows with Gaussian blending, as the network was trained;
    ``tta`` averages each window over flips (:mod:`scripts.tta`), as the CAMs of the first round are.

    Args:
        roi_size: window side in pixels, the training patch size.
        sw_batch_size: windows per forward pass.
        overlap: fraction in [0, 1) by which neighbouring windows overlap.
        tta: ``"none"``, ``"flip"`` or ``"d4"``.
    """

    def __init__(self, roi_size: int, sw_batch_size: int = 16, overlap: float = 0.5, tta: str = "none"):
        self.inferer = SlidingWindowInferer(roi_size, sw_batch_size, overlap=overlap, mode="gaussian")
        augment.transforms(tta)  # an unknown name is refused here, not at the first image
        self.tta = tta

    def __call__(self, inputs: torch.Tensor, network: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(self.inferer(inputs.float() / 255, augment.Averaged(network, self.tta)), 1)[:, None]
