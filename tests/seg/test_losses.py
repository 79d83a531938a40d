"""Multi-layer pseudo-supervision loss: layer weights, the 255 ignore index, the single-mask case."""

import math

import pytest
import torch
import torch.nn.functional as F

from scripts.errors import DataError
from scripts.seg.losses import PseudoSupervisionLoss


def nll(logits, c):
    """-log softmax(logits)[c] of one pixel, by hand."""
    return -(logits[c] - math.log(sum(math.exp(v) for v in logits)))


# one image, two classes, 1 x 3 pixels: logits per pixel
PRED = torch.tensor([[[[2.0, 0.0, 1.0]], [[0.0, 1.0, 1.0]]]])
PIXELS = [[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]


def test_layers_are_weighted_and_ignored_pixels_skipped():
    target = torch.tensor([[[[0, 1, 255]], [[1, 255, 255]], [[255, 255, 255]]]], dtype=torch.uint8)
    loss = PseudoSupervisionLoss((0.6, 0.3, 0.1))(PRED, target)
    layer0 = (nll(PIXELS[0], 0) + nll(PIXELS[1], 1)) / 2
    layer1 = nll(PIXELS[0], 1)
    assert loss.item() == pytest.approx(0.6 * layer0 + 0.3 * layer1 + 0.1 * 0)  # an all-ignored layer adds 0, not NaN


def test_ignored_pixels_get_no_gradient():
    pred = PRED.clone().requires_grad_()
    target = torch.tensor([[[[0, 255, 1]]]])
    PseudoSupervisionLoss((1.0,))(pred, target).backward()
    assert torch.all(pred.grad[..., 1] == 0) and torch.all(pred.grad[..., [0, 2]] != 0)


def test_single_mask_is_plain_cross_entropy():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8))
    target[0, 0, :2] = 255
    expected = F.cross_entropy(pred, target[:, 0], ignore_index=255)
    torch.testing.assert_close(PseudoSupervisionLoss((1.0,))(pred, target), expected)


def softmax(logits):
    return [math.exp(v) / sum(math.exp(u) for u in logits) for v in logits]


def test_dice_term_by_hand():
    """CE + 0.5 x (1 - mean over classes of 2 sum(p g) / (sum p + sum g)), the ignored third pixel counted nowhere;
    MONAI's 1e-5 smoothing aside."""
    target = torch.tensor([[[[0, 1, 255]]]])
    p = [softmax(PIXELS[0]), softmax(PIXELS[1])]  # the two labelled pixels: class 0, then class 1
    dice = [2 * p[0][0] / (p[0][0] + p[1][0] + 1), 2 * p[1][1] / (p[0][1] + p[1][1] + 1)]
    ce = (nll(PIXELS[0], 0) + nll(PIXELS[1], 1)) / 2
    loss = PseudoSupervisionLoss((1.0,), lambda_dice=0.5)(PRED, target)
    assert loss.item() == pytest.approx(ce + 0.5 * (1 - sum(dice) / 2), abs=1e-5)  # 0.2201 + 0.5 x 0.1952
    # MONAI's batch=True: the sums run over the batch, so the class an image lacks does not score it 0
    targets = torch.tensor([[[[0, 0, 255]]], [[[1, 1, 255]]]])  # image 1 all class 0, image 2 all class 1
    loss = PseudoSupervisionLoss((1.0,), lambda_dice=1.0)(PRED.expand(2, -1, -1, -1), targets)
    s0, s1 = p[0][0] + p[1][0], p[0][1] + p[1][1]  # each class's probability over the two labelled pixels
    dice = [2 * s0 / (2 * s0 + 2), 2 * s1 / (2 * s1 + 2)]
    ce = (nll(PIXELS[0], 0) + nll(PIXELS[1], 0) + nll(PIXELS[0], 1) + nll(PIXELS[1], 1)) / 4
    assert loss.item() == pytest.approx(ce + 1 - sum(dice) / 2, abs=1e-5)


def test_dice_term_honours_ignore():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8))
    ignored = target.clone()
    ignored[:, :, :4] = 255
    dice_ce = PseudoSupervisionLoss((1.0,), lambda_dice=0.5)
    # with ignore, the Dice term depends only on the labelled half: changing logits in the ignored half changes nothing
    other = pred.clone()
    other[..., :4, :] = torch.randn(2, 3, 4, 8)
    torch.testing.assert_close(dice_ce(pred, ignored), dice_ce(other, ignored))


def test_layer_count_must_match_the_weights():
    with pytest.raises(DataError, match=r"expected \(B, 3, H, W\)"):
        PseudoSupervisionLoss()(PRED, torch.zeros(1, 1, 1, 3, dtype=torch.long))
    with pytest.raises(DataError, match="non-empty list of values >= 0"):
        PseudoSupervisionLoss((0.5, -0.1))


def test_easy_mining_weights_pixels_by_their_normalised_loss_per_class():
    """OEEM: within a patch and pseudo-class the easiest pixel weighs 1, the hardest 0; a lone pixel keeps 1."""
    pred = PRED.clone().requires_grad_()
    target = torch.tensor([[[[0, 0, 1]]]])
    loss = PseudoSupervisionLoss((1.0,), easy_mining=True)(pred, target)
    easy, hard, lone = nll(PIXELS[0], 0), nll(PIXELS[1], 0), nll(PIXELS[2], 1)
    assert easy < hard
    assert loss.item() == pytest.approx((1 * easy + 0 * hard + 1 * lone) / 2)
    loss.backward()
    assert torch.all(pred.grad[..., 1] == 0)  # the hardest pixel of class 0 teaches nothing
    torch.testing.assert_close(
        PseudoSupervisionLoss((1.0,), easy_mining=True)(PRED, torch.full_like(target, 255)), torch.tensor(0.0)
    )  # nothing labelled: 0, not NaN
