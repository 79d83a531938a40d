"""Test-time augmentation by the dihedral group: the same flips and quarter turns for CAMs (stage 2) and for the
segmentation network (evaluation, relabelling, inference), each prediction turned back before averaging."""

from __future__ import annotations

import torch
from torch import nn

from .errors import DataError

# (k, flip): rotate by k x 90 degrees after an optional left-right flip; the dihedral group D4 in full
TTA = {
    "none": ((0, False),),
    "flip": ((0, False), (0, True), (2, False), (2, True)),  # identity, left-right, 180 degrees, up-down
    "d4": tuple((k, f) for f in (False, True) for k in range(4)),
}


def transforms(tta: str) -> tuple[tuple[int, bool], ...]:
    if tta not in TTA:
        raise DataError(f"unknown tta {tta!r}; choose one of {sorted(TTA)}")
    return TTA[tta]


def apply(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    return torch.rot90(x.flip(-1) if flip else x, k, (-2, -1))


def invert(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.rot90(x, -k, (-2, -1))
    return x.flip(-1) if flip else x


class Averaged(nn.Module):
    """``network``'s dense output averaged over the ``tta`` transforms of its input (``"none"``: the network alone).
    Wrap the module that returns probabilities (e.g. :class:`scripts.seg.net.GatedSegmenter`) to average those.
    Odd quarter turns (``"d4"``) need square inputs, e.g. sliding-window tiles.

    Args:
        network: the module whose dense (B, C, H, W) output is averaged.
        tta: ``"none"``, ``"flip"`` (identity, left-right, up-down, 180 degrees) or ``"d4"`` (all 8 flips and turns).
    """

    def __init__(self, network: nn.Module, tta: str = "flip"):
        super().__init__()
        self.network, self.transforms = network, transforms(tta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [invert(self.network(apply(x, k, flip)), k, flip) for k, flip in self.transforms]
        return torch.stack(outputs).mean(0) if len(outputs) > 1 else outputs[0]
