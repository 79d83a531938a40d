"""Test-time augmentation of dense predictions (scripts.tta): the segmentation network's counterpart of the CAM TTA."""

import pytest
import torch
from torch import nn

from scripts.errors import DataError
from scripts.tta import Averaged, apply, invert, transforms

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 5, padding=2)).eval()


@pytest.mark.parametrize("tta", ["none", "flip", "d4"])
def test_each_transform_is_undone_by_its_inverse(tta):
    x = torch.randn(1, 2, 6, 6)
    for k, flip in transforms(tta):
        torch.testing.assert_close(invert(apply(x, k, flip), k, flip), x)


def test_none_is_the_network_and_flip_is_the_mean_of_four_views(net):
    x = torch.randn(2, 3, 12, 20)  # not square: the flips and the half turn keep the shape
    with torch.no_grad():
        torch.testing.assert_close(Averaged(net, "none")(x), net(x))
        views = [net(x), net(x.flip(-1)).flip(-1), net(x.flip(-2)).flip(-2), net(x.flip(-1, -2)).flip(-1, -2)]
        torch.testing.assert_close(Averaged(net, "flip")(x), torch.stack(views).mean(0))


def test_d4_average_follows_a_turned_image(net):
    """Averaged over the whole group, the prediction of a turned, flipped image is the turned, flipped prediction;
    the bare network (not rotation-equivariant) does not have that property."""
    x = torch.randn(1, 3, 16, 16)
    turn = lambda t: torch.rot90(t.flip(-1), 1, (-2, -1))  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(Averaged(net, "d4")(turn(x)), turn(Averaged(net, "d4")(x)), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(net(turn(x)), turn(net(x)), atol=1e-3)


def test_unknown_tta_is_refused(net):
    with pytest.raises(DataError, match="unknown tta 'rot45'"):
        Averaged(net, "rot45")
