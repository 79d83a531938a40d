"""The CAM classifier (ADL, PDA) and CAM extraction, on tiny random-weight models."""

import pytest
import torch
from ignite.engine import Engine
from monai.visualize import GradCAM

from scripts.cam.maps import MultiLayerCAM, cams_to_mask, layer_outputs, white_background
from scripts.cam.net import CAMNet, PDASchedule
from scripts.checkpoints import load_network
from scripts.errors import DataError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return CAMNet(3, pretrained=False).eval()


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


def test_logits_are_the_mean_of_the_class_maps(net):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps, logits = net.class_maps(x), net(x)
    assert maps.shape == (2, 3, 4, 4)  # stride 16
    torch.testing.assert_close(logits, maps.mean((2, 3)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 0}, "num_classes must be at least 1"),
        ({"num_classes": 2, "backbone": "vgg"}, "unknown backbone 'vgg'"),
        ({"num_classes": 2, "adl": True, "adl_layers": ["blocks.9"]}, "no module 'blocks.9'"),
        ({"num_classes": 2, "output_stride": 8}, "output_stride must be 16 or 32"),
    ],
)
def test_bad_configuration_is_refused(kwargs, match):
    with pytest.raises(DataError, match=match):
        CAMNet(pretrained=False, **kwargs)


def test_adl_acts_in_training_only_and_keeps_checkpoints_compatible():
    torch.manual_seed(0)
    plain = CAMNet(2, pretrained=False)
    adl = CAMNet(2, pretrained=False, adl=True, adl_drop_rate=1.0)
    assert plain.state_dict().keys() == adl.state_dict().keys()
    adl.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    plain.eval(), adl.eval()
    with torch.no_grad():
        torch.testing.assert_close(adl(x), plain(x))
        plain.train(), adl.train()
        torch.manual_seed(1)
        differs = not torch.allclose(adl(x), plain(x))
    assert differs


def test_pda_drops_the_peak_of_each_class_map_in_training():
    net = CAMNet(3, pretrained=False, pda=True).train()
    # 2 x 2 class maps with peaks 4 and 2 (each class's own peak counts), and one negative everywhere
    maps = torch.tensor(
        [[[[4.0, 1.0], [2.0, -1.0]], [[2.0, 1.0], [0.5, -1.0]], [[-1.0, -2.0], [-3.0, -4.0]]]], requires_grad=True
    )
    net.class_maps = lambda x: maps
    x = torch.zeros(1, 3, 32, 32)
    # the logit is the mean over all 4 cells, those above gamma x the class's peak zeroed
    for gamma, expected in (
        (1.0, [6 / 4, 2.5 / 4, -10 / 4]),  # nothing dropped
        (0.5, [2 / 4, 0.5 / 4, -10 / 4]),  # drops the 4 (keeps the 2: <= 0.5 x 4) and class 1's 2
        (0.25, [0 / 4, -0.5 / 4, -10 / 4]),  # drops the 4 and 2 (keeps 1 = 0.25 x 4), class 1's 2 and 1
    ):
        net.pda_gamma.fill_(gamma)
        torch.testing.assert_close(net(x), torch.tensor([expected]))
    net.pda_gamma.fill_(0.5)
    net(x)[0, 0].backward()
    assert maps.grad[0, 0].tolist() == [[0.0, 0.25], [0.25, 0.25]]  # a dropped cell gets no gradient
    net.eval()
    torch.testing.assert_close(net(x), torch.tensor([[6 / 4, 2.5 / 4, -10 / 4]]))  # never at inference


def test_pda_schedule_warmup_decay_floor():
    net = CAMNet(1, pretrained=False, pda=True)
    schedule = PDASchedule(net, warmup_epochs=2)
    assert [round(schedule.gamma(e), 4) for e in (1, 2, 3, 4)] == [1.0, 1.0, 0.98, 0.9604]
    assert schedule.gamma(100) == 0.65
    engine = Engine(lambda e, b: None)
    schedule.attach(engine)
    engine.run([0], max_epochs=4)
    assert net.pda_gamma.item() == pytest.approx(0.9604)
    with pytest.raises(DataError, match="PDA schedule"):
        PDASchedule(net, floor=0.0)


def test_cams_shapes_normalisation_and_class_masking(net):
    x = torch.randn(2, 3, 48, 48)
    tags = torch.tensor([[1, 0, 1], [0, 1, 0]])
    hooks = hook_count(net)
    with torch.no_grad():  # Grad-CAM must still work
        cams = MultiLayerCAM(net, layers=("classifier", "backbone.blocks.5", "backbone.blocks.4"), tta="flip")(x, tags)
    assert hook_count(net) == hooks and not net.training
    assert set(cams) == {"classifier", "backbone.blocks.5", "backbone.blocks.4"}
    for maps in cams.values():
        assert maps.shape == (2, 3, 48, 48) and not maps.requires_grad
        assert maps.min() >= 0
        peaks = maps.amax((2, 3))
        assert torch.all(peaks[tags == 0] == 0)
        torch.testing.assert_close(peaks[tags == 1], torch.ones(3))


def test_unnormalised_maps_are_the_raw_cam(net):
    x = torch.randn(2, 3, 32, 32)
    tags = torch.tensor([[1, 1, 0], [0, 1, 1]])
    raw = MultiLayerCAM(net, layers=("classifier", "backbone.blocks.5"), tta="flip", normalize=False)(x, tags)
    unit = MultiLayerCAM(net, layers=("classifier", "backbone.blocks.5"), tta="flip")(x, tags)
    for layer in raw:
        torch.testing.assert_close(raw[layer] / raw[layer].amax((2, 3), keepdim=True).clamp_min(1e-12), unit[layer])
    with torch.no_grad():
        cam = torch.relu(net.class_maps(x))
    single = MultiLayerCAM(net, layers=("classifier",), tta="none", normalize=False)(x, tags)["classifier"]
    expected = torch.nn.functional.interpolate(cam, size=(32, 32), mode="bilinear") * tags[:, :, None, None]
    torch.testing.assert_close(single, expected)


def test_untagged_images_keep_the_predicted_classes(net):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        predicted = torch.sigmoid(net(x)) >= 0.5
    cams = MultiLayerCAM(net, layers=("classifier",), tta="none")(x)
    assert torch.equal(cams["classifier"].amax((2, 3)) > 0, predicted)


def test_grad_cam_matches_monai(net):
    x = torch.randn(2, 3, 64, 64)
    tags = torch.ones(2, 3)
    ours = MultiLayerCAM(net, layers=("backbone.blocks.4",), tta="none")(x, tags)["backbone.blocks.4"]
    reference = CAMNet(3, pretrained=False).eval()
    reference.load_state_dict(net.state_dict())
    monai_cam = GradCAM(reference, target_layers="backbone.blocks.4", postprocessing=lambda m: m)  # default inverts
    for c in range(3):
        ref = monai_cam(x, class_idx=c)
        ref = ref / ref.amax((2, 3), keepdim=True).clamp_min(1e-12)
        torch.testing.assert_close(ours[:, c : c + 1], ref)


def test_tta_maps_follow_the_image(net):
    """Averaged over the whole D4 group, the CAM of a rotated/flipped image is the rotated/flipped CAM."""
    x = torch.randn(1, 3, 32, 32)
    tags = torch.ones(1, 3)
    extract = MultiLayerCAM(net, layers=("classifier", "backbone.blocks.5"), tta="d4")
    a, b = extract(x, tags), extract(torch.rot90(x.flip(-1), 1, (-2, -1)), tags)
    for layer in a:
        torch.testing.assert_close(torch.rot90(a[layer].flip(-1), 1, (-2, -1)), b[layer], atol=1e-5, rtol=1e-4)


def test_hooks_are_removed_after_an_error(net):
    hooks = hook_count(net)
    with pytest.raises(RuntimeError):
        with layer_outputs(net, ["backbone.blocks.4"]):
            raise RuntimeError("boom")
    assert hook_count(net) == hooks
    with pytest.raises(DataError, match="not modules of the network"):
        MultiLayerCAM(net, layers=("backbone.nope",))(torch.randn(1, 3, 32, 32))
    assert hook_count(net) == hooks
    with pytest.raises(DataError, match="unknown tta"):
        MultiLayerCAM(net, tta="rot45")


def test_background_channel_and_masks(net):
    rgb = torch.full((1, 3, 32, 32), 0.5)
    rgb[..., :8] = 0.95  # a white strip: glass
    background = white_background(rgb)
    assert background.shape == (1, 1, 32, 32) and background[..., :8].all() and not background[..., 8:].any()
    cams = MultiLayerCAM(net, layers=("classifier",), tta="none")((rgb - 0.5) / 0.5, torch.ones(1, 3), background)
    maps = cams["classifier"]
    assert maps.shape == (1, 4, 32, 32)
    assert torch.all(maps[:, :3, :, :8] == 0) and torch.all(maps[:, 3, :, :8] == 1)
    mask = cams_to_mask(maps)
    assert mask.dtype == torch.uint8 and torch.all(mask[..., :8] == 3)
    uncertain = cams_to_mask(torch.tensor([[[[0.2, 0.9]], [[0.1, 0.3]]]]), threshold=0.5)
    assert uncertain.tolist() == [[[255, 0]]]


def test_bad_cam_checkpoints_name_the_file(tmp_path):
    network = CAMNet(2, pretrained=False)
    with pytest.raises(DataError, match=r"missing\.pt: CAM classifier .* not found"):
        load_network(network, tmp_path / "missing.pt", "CAM classifier")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=r"corrupt\.pt: cannot read the CAM classifier"):
        load_network(network, tmp_path / "corrupt.pt", "CAM classifier")
    torch.save(CAMNet(5, pretrained=False).state_dict(), tmp_path / "other.pt")
    with pytest.raises(DataError, match=r"other\.pt: not a CAM classifier checkpoint of this network"):
        load_network(network, tmp_path / "other.pt", "CAM classifier")
    torch.save({"model": network.state_dict(), "optimizer": {}}, tmp_path / "cam_last.pt")
    assert load_network(CAMNet(2, pretrained=False), tmp_path / "cam_last.pt", "CAM classifier") is not None
