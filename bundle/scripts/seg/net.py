"""The stage-3 segmentation network: MONAI ``FlexibleUNet`` on the ImageNet EfficientNet-Lite0 encoder, and MLPS's
classification gate.

Importing this module registers ``"efficientnet-lite0"`` in FlexibleUNet's backbone registry, so that
``FlexibleUNet(in_channels=3, out_channels=C, backbone="efficientnet-lite0", pretrained=True)`` is MONAI's decoder and
head on our encoder (MONAI's own ``efficientnet-b*`` encoders download their weights, which fails offline). The
network takes RGB in [0, 1], as ``network_data_format`` in ``metadata.json`` says: the encoder applies the
(x - 0.5) / 0.5 its ImageNet weights expect, so training, TorchScript export and MONAI Label feed the same input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import BaseEncoder
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE
from torch import nn

from ..backbones import create_backbone
from ..errors import DataError


class EfficientNetLite0Encoder(nn.Module, BaseEncoder):
    """timm ``tf_efficientnet_lite0`` features at strides 2, 4, 8, 16, 32 (16, 24, 40, 112, 320 channels)."""

    def __init__(self, spatial_dims: int = 2, in_channels: int = 3, pretrained: bool = True):
        super().__init__()
        if spatial_dims != 2 or in_channels != 3:
            raise DataError(
                "efficientnet-lite0 is a 2D RGB encoder (spatial_dims=2, in_channels=3), "
                f"got spatial_dims={spatial_dims}, in_channels={in_channels}"
            )
        self.features = create_backbone("efficientnet_lite0", pretrained, features_only=True)
        cfg = self.features.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # FlexibleUNet's decoder expects stride-2 features of floor(size / 2) (MONAI's own encoders pad for one fixed
        # image size); TF "same" padding gives ceil(size / 2) on odd sizes, a last row/column that is mostly padding:
        # cropping it lets any input size through (112-px patches: 56, 28, 14, 7, 3 instead of ..., 7, 4).
        height, width = x.shape[-2], x.shape[-1]
        out: list[torch.Tensor] = []
        for feature in self.features((x - self.mean) / self.std):
            height, width = height // 2, width // 2
            out.append(feature[..., :height, :width])
        return out

    @classmethod
    def get_encoder_parameters(cls) -> list[dict]:
        return [{"spatial_dims": 2, "in_channels": 3, "pretrained": True}]

    @classmethod
    def num_channels_per_output(cls) -> list[tuple[int, ...]]:
        return [(16, 24, 40, 112, 320)]

    @classmethod
    def num_outputs(cls) -> list[int]:
        return [5]

    @classmethod
    def get_encoder_names(cls) -> list[str]:
        return ["efficientnet-lite0"]


FLEXUNET_BACKBONE.register_class(EfficientNetLite0Encoder)


def classification_gate(probabilities: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """MLPS's gate: class probabilities (B, C, H, W) times the classifier's patch-level presence (B, C) in {0, 1}.

    A patch in which the classifier finds no class keeps its probabilities: zeroing them all would leave the
    arg-max to tie-breaking, i.e. class 0 everywhere.
    """
    presence = presence.to(probabilities.dtype)
    presence = torch.where(presence.sum(1, keepdim=True) > 0, presence, torch.ones_like(presence))
    return probabilities * presence[:, :, None, None]


class GatedSegmenter(nn.Module):
    """Softmax probabilities of ``segmenter``, gated (``gate=True``) by the stage-1 classifier's verdict on the same
    input: class c is kept where sigmoid(logit c) >= ``threshold``.

    As the evaluator's network under a sliding-window inferer, the gate acts per window, i.e. per patch as in MLPS.
    With ``gate=False`` the classifier is never called (MLPS's code gated even with ``--Is_GM False``). The classifier
    takes its own input normalisation (``mean``/``std``, ``train_cam.json``'s ``normalization``) of the [0, 1] input.

    Args:
        segmenter: the segmentation network, logits (B, C, H, W) from RGB in [0, 1].
        classifier: the stage-1 classifier, logits (B, C); required with ``gate``.
        gate: apply the classification gate.
        threshold: probability in [0, 1] at or above which the classifier keeps a class.
        mean: per-channel mean of the classifier's input normalisation.
        std: per-channel standard deviation of the same.
    """

    def __init__(
        self,
        segmenter: nn.Module,
        classifier: nn.Module | None = None,
        gate: bool = True,
        threshold: float = 0.5,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
    ):
        super().__init__()
        if gate and classifier is None:
            raise DataError("the classification gate needs the stage-1 classifier (classifier=None with gate=True)")
        self.segmenter, self.classifier, self.gate, self.threshold = segmenter, classifier, gate, threshold
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(self.segmenter(x).float(), 1)
        if not self.gate:
            return probabilities
        presence = torch.sigmoid(self.classifier((x - self.mean) / self.std).float()) >= self.threshold
        return classification_gate(probabilities, presence)
