"""IKD-MIL's parts on tiny random networks and hand-made maps: the fusion, the losses' targets and weights, the role
reversal's timing and weights, the pseudo-mask rule and the bad inputs MIL cannot learn from."""

import json
import logging
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from PIL import Image
from torch import nn

from scripts.constants import IGNORE
from scripts.data.datalist import write_datalist
from scripts.errors import DataError
from scripts.mil.data import check_negatives
from scripts.mil.distill import RoleReversal, TeacherTargets
from scripts.mil.losses import DistillationLoss, TagDiceLoss, confident_labels, easy_weights, tag_targets
from scripts.mil.masks import FusedMaps, MILLabelHandler, MILOutputs
from scripts.mil.net import MILNet


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return MILNet(3, pretrained=False).eval()


def test_the_fused_map_is_the_weighted_sum_of_the_side_outputs(net):
    x = torch.randn(2, 3, 40, 56)  # not a multiple of the stride: every output is still at the input size
    with torch.no_grad():
        out = net(x)
    assert out.shape == (2, 4, 3, 40, 56)
    torch.testing.assert_close(out[:, -1], 0.3 * out[:, 0] + 0.3 * out[:, 1] + 0.4 * out[:, 2])
    assert not torch.allclose(out[:, 0], out[:, 2])  # three distinct depths
    first = MILNet(3, pretrained=False, fusion=(1.0, 0.0, 0.0))
    first.load_state_dict(net.state_dict())  # the weights are no parameter: a checkpoint fits any fusion
    with torch.no_grad():
        torch.testing.assert_close(first.eval().fused(x), out[:, 0])
        assert net.tag_logits(x).shape == (2, 3, 1, 1)
        torch.testing.assert_close(net.tag_logits(x)[:, :, 0, 0], out[:, -1].amax((2, 3)))
    for bad in ((0.5, 0.5), (0.3, -0.3, 1.0), (0.0, 0.0, 0.0)):
        with pytest.raises(DataError, match="fusion weights"):
            MILNet(3, pretrained=False, fusion=bad)


def test_the_papers_vgg16_encoder_gives_side_outputs_at_strides_1_2_4():
    vgg = MILNet(2, backbone="vgg16", pretrained=False).eval()
    assert vgg.stride == 4 and vgg.backbone.feature_info.reduction() == [1, 2, 4]
    assert vgg.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)  # ImageNet statistics, not Lite0's 0.5
    with torch.no_grad():
        assert vgg(torch.randn(1, 3, 20, 12)).shape == (1, 4, 2, 20, 12)
    with pytest.raises(DataError, match="unknown backbone 'vgg19'"):
        MILNet(2, backbone="vgg19", pretrained=False, stages=(0, 1, 2))
    with pytest.raises(DataError, match="'vgg19' has no default side-output stages"):
        MILNet(2, backbone="vgg19", pretrained=False)


def test_an_input_smaller_than_the_stride_is_a_clear_error_but_inference_pads_it(net):
    with pytest.raises(DataError, match=r"smaller than its stride 16"):
        net(torch.zeros(1, 3, 8, 40))
    maps = FusedMaps([0.5] * 3, [0.5] * 3, window=None, sigma=0)(torch.full((1, 3, 8, 5), 128.0), net)
    assert maps.shape == (1, 3, 8, 5) and ((maps >= 0) & (maps <= 1)).all()
    windowed = FusedMaps([0.5] * 3, [0.5] * 3, window=32, sigma=1)(torch.full((1, 3, 8, 5), 128.0), net)
    assert windowed.shape == (1, 3, 8, 5)


def test_a_network_trained_on_resized_patches_reads_windows_of_that_size(net):
    seen = []

    class Spy(nn.Module):
        stride = net.stride

        def fused(self, x):
            seen.append(tuple(x.shape[-2:]))
            return net.fused(x)

    image = torch.rand(1, 3, 40, 70) * 255
    maps = FusedMaps([0.5] * 3, [0.5] * 3, window=32, sigma=0, input_size=64)(image, Spy())
    assert maps.shape == (1, 3, 40, 70) and set(seen) == {(64, 64)}  # the image doubled, the maps back at its size
    plain = FusedMaps([0.5] * 3, [0.5] * 3, window=32, sigma=0)(image, net)
    assert torch.equal(FusedMaps([0.5] * 3, [0.5] * 3, window=32, sigma=0, input_size=32)(image, net), plain)
    with pytest.raises(DataError, match="mil_input_size 64 needs"):
        FusedMaps([0.5] * 3, [0.5] * 3, window=None, input_size=64)
    with pytest.raises(DataError, match="mil_input_size 0 needs"):
        FusedMaps([0.5] * 3, [0.5] * 3, window=32, input_size=0)


def test_the_teacher_is_scored_against_the_broadcast_tag():
    tags = torch.tensor([[1, 0], [0, 1]])
    target = tag_targets(tags, (4, 5))
    assert target.shape == (2, 2, 4, 5)
    assert (target[0, 0] == 1).all() and (target[0, 1] == 0).all() and (target[1, 1] == 1).all()
    loss = TagDiceLoss()
    right = (target * 40 - 20)[:, None].repeat(1, 4, 1, 1, 1)  # every output sure of the tag
    assert loss(right, tags) < 1e-3
    for wrong_output in range(4):  # each side output and the fused map count
        wrong = right.clone()
        wrong[:, wrong_output] *= -1
        assert loss(wrong, tags) > 0.9  # one output wholly wrong: its mean Dice near 1
    untagged_on = right.clone()
    untagged_on[0, :, 1] = 20  # an untagged class lit everywhere: the MIL negative is violated
    tagged_off = right.clone()
    tagged_off[0, :, 0] = -20  # a tagged class dark everywhere
    # one (image, class) of four, in 4 outputs: the class's batch Dice (2 x 20 + 1) / (40 + 20 + 1) (smoothing 1; a
    # false positive as large as its 20 true pixels), the other class's 1
    assert loss(untagged_on, tags) == pytest.approx(4 * (1 - 41 / 61) / 2, abs=1e-4)
    assert loss(tagged_off, tags) == pytest.approx(4 * (1 - 1 / 21) / 2, abs=1e-4)  # class 0: no true pixel left
    with pytest.raises(DataError, match="do not fit"):
        loss(right[:, 0], tags)


def test_an_untagged_patch_is_pushed_down_as_hard_as_a_tagged_one_up():
    """The MIL negatives must teach: per image, a lit all-zero target's Dice is flat (gradient 1/5600 of a tagged
    patch's), and with most patches tagged the maps saturate; over the batch both are of one order."""
    logits = torch.full((2, 4, 1, 112, 112), 2.2, requires_grad=True)  # every output at p = 0.9
    TagDiceLoss()(logits, torch.tensor([[1], [0]])).backward()
    tagged, untagged = logits.grad[0].abs().mean(), logits.grad[1].abs().mean()
    assert untagged > 0.2 * tagged > 0


def test_confident_labels_keep_sure_pixels_of_both_sides():
    maps = torch.tensor([0.0, 0.05, 0.2, 0.5, 0.89, 0.9, 1.0]).view(1, 1, 1, 7)
    assert confident_labels(maps, 0.9).flatten().tolist() == [0, 0, IGNORE, IGNORE, IGNORE, 1, 1]
    assert confident_labels(maps, 0.5).flatten().tolist() == [0, 0, 0, 1, 1, 1, 1]  # 0.5: positive
    for bad in (0.4, 1.1):
        with pytest.raises(DataError, match="confidence"):
            confident_labels(maps, bad)


def test_easy_weights_have_mean_one_and_favour_the_easiest_pixel():
    torch.manual_seed(1)
    losses = torch.rand(2, 3, 5, 6) * 3
    valid = torch.rand(2, 3, 5, 6) > 0.3
    valid[1, 2] = False  # a class with no confident pixel in an image: weights 0, not NaN
    weights = easy_weights(losses, valid)
    assert torch.isfinite(weights).all() and (weights[~valid] == 0).all()
    for b in range(2):
        for c in range(3):
            if not valid[b, c].any():
                continue
            w, loss = weights[b, c][valid[b, c]], losses[b, c][valid[b, c]]
            assert w.mean() == pytest.approx(1.0, abs=1e-5)
            assert w.argmax() == loss.argmin() and w.argmin() == loss.argmax()
            # the softmax of the negative loss: weights' log-ratios are the losses' differences
            assert math.log(w.max() / w.min()) == pytest.approx(float(loss.max() - loss.min()), rel=1e-4)


def test_the_student_learns_the_teachers_map_and_only_its_confident_labels():
    teacher = torch.tensor([[0.95, 0.6], [0.02, 0.5]]).view(1, 1, 2, 2).repeat(1, 2, 1, 1)
    teacher[:, 1] = 0  # an untagged class: a zero map, all confident negatives
    logits = torch.logit(teacher.clamp(1e-4, 1 - 1e-4))[:, None].repeat(1, 4, 1, 1, 1)
    with_ce, dice_only = DistillationLoss(0.9, 1.0), DistillationLoss(0.9, 0.0)
    ce = lambda pred: with_ce(pred, teacher) - dice_only(pred, teacher)  # noqa: E731
    unsure = logits.clone()
    unsure[:, -1, 0, 0, 1] = 5.0  # the student changes its mind where the teacher was unsure (0.6)
    assert ce(unsure) == pytest.approx(float(ce(logits)), abs=1e-6)
    sure = logits.clone()
    sure[:, -1, 0, 0, 0] = -5.0  # ... and where the teacher was sure (0.95): the cross entropy counts it, though
    assert ce(sure) > ce(logits) + 1e-3  # least of all its pixels (OEEM: the hardest pixel weighs least)
    lit = logits.clone()
    lit[:, :, 1] = 5.0  # the untagged class lit: Dice and cross entropy both object
    assert dice_only(lit, teacher) > dice_only(logits, teacher) + 1 and ce(lit) > ce(logits) + 1
    with pytest.raises(DataError, match="ce_weight"):
        DistillationLoss(0.9, -1.0)


def test_teacher_targets_are_the_teachers_fused_map_of_tagged_classes(net):
    images = torch.randn(2, 3, 32, 32)
    tags = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    net.train()
    x, target = TeacherTargets(net)({"image": images, "label": tags})
    assert not net.training and not target.requires_grad and x is images
    with torch.no_grad():
        expected = torch.sigmoid(net.fused(images)) * tags[:, :, None, None]
    torch.testing.assert_close(target, expected)
    assert (target[0, 1] == 0).all() and (target[1, 0] == 0).all() and (target[0, 0] > 0).all()


def run_reversal(interval, metrics, epochs):
    """A student trainer of ``epochs`` epochs whose student's weight becomes the epoch number at each epoch's end and
    whose validation metric after epoch e is ``metrics[e - 1]``; returns the (teacher, student) weights after each
    epoch and the reversal handler."""
    teacher, student = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        teacher.weight.fill_(-1.0)
    validator = Engine(lambda engine, batch: None)
    validator.state.key_metric_name = "val_f1"
    validator.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_f1=metrics[trainer.state.epoch - 1])
    )

    def train_step(engine, batch):
        with torch.no_grad():
            student.weight.fill_(float(engine.state.epoch))

    trainer = Engine(train_step)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: validator.run([0]))
    reversal = RoleReversal(teacher, student, interval, validator)
    reversal.attach(trainer)
    seen = []
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: seen.append((teacher.weight.item(), student.weight.item()))
    )
    trainer.run([0], max_epochs=epochs)
    return seen, reversal


def test_role_reversal_every_r_epochs_from_2r_with_the_best_student():
    metrics = [0.1, 0.5, 0.9, 0.3, 0.2, 0.8, 0.4, 0.1]
    seen, _ = run_reversal(2, metrics, 8)
    # epochs 1-3 no swap; after epoch 4 the teacher takes the best student so far (epoch 3, metric 0.9) and the
    # student the teacher's weights (-1); the best is then counted afresh: after epoch 6 the teacher takes epoch 6's
    # student (0.8 beats epoch 5's 0.2) and the student the teacher's (3); after epoch 8, epoch 7's (0.4 > 0.1)
    assert seen == [(-1, 1), (-1, 2), (-1, 3), (3, -1), (3, 5), (6, 3), (6, 7), (7, 6)]
    assert [e for e in range(1, 13) if RoleReversal(nn.Linear(1, 1), nn.Linear(1, 1), 3).due(e)] == [6, 9, 12]
    off, _ = run_reversal(0, metrics, 8)
    assert all(teacher == -1 for teacher, _ in off)


def test_role_reversal_without_validation_takes_the_current_student_and_its_state_round_trips():
    teacher, student = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        teacher.weight.fill_(-1.0), student.weight.fill_(2.0)
    reversal = RoleReversal(teacher, student, 1)
    engine = Engine(lambda e, b: None)
    engine.state.epoch = 2
    reversal(engine)
    assert (teacher.weight.item(), student.weight.item()) == (2.0, -1.0)
    _, handler = run_reversal(3, [0.1, 0.7, 0.2, 0.3], 4)  # no reversal yet (the first is after epoch 6)
    assert handler.best_metric == 0.7 and handler.best["weight"].item() == 2.0
    state = handler.state_dict()
    fresh = RoleReversal(nn.Linear(1, 1), nn.Linear(1, 1), 3)
    fresh.load_state_dict(state)
    assert fresh.best_metric == 0.7 and fresh.best["weight"].item() == 2.0
    for bad in (-1, 1.5, True):
        with pytest.raises(DataError, match="reversal_interval"):
            RoleReversal(teacher, student, bad)


def test_pseudo_masks_are_the_best_tagged_class_above_the_threshold(tmp_path):
    items = [{"name": "a", "label": [1, 0, 1]}, {"name": "b", "label": [0, 1, 0]}]
    handler = MILLabelHandler(items, tmp_path, threshold=0.5)
    maps = torch.zeros(3, 2, 3)
    maps[0] = torch.tensor([[0.9, 0.6, 0.2], [0.1, 0.4, 0.7]])
    maps[1] = 0.99  # untagged in image a: never a label there
    maps[2] = torch.tensor([[0.3, 0.8, 0.1], [0.2, 0.45, 0.6]])
    mask = handler.label("a", maps, np.array([True, False, True]))
    assert mask.tolist() == [[0, 2, IGNORE], [IGNORE, IGNORE, 0]]
    out = MILOutputs(tmp_path)
    assert np.asarray(Image.open(out.mask("a"))).tolist() == mask.tolist()
    stored = np.load(out.map("a"))
    assert stored.dtype == np.uint8 and (stored[1] == 0).all() and stored[0, 0, 0] == round(0.9 * 255)
    assert [i["name"] for i in handler.pending()] == ["b"]  # a resumed run does what is left
    everywhere = handler.label("b", torch.full((3, 2, 3), 0.8), np.array([False, True, False]))
    assert (everywhere == 1).all()  # the only tagged class, sure everywhere
    for bad in (0.0, 1.5):
        with pytest.raises(DataError, match="threshold"):
            MILLabelHandler(items, tmp_path, threshold=bad)
    with pytest.raises(DataError, match="sigma"):
        FusedMaps([0.5] * 3, [0.5] * 3, sigma=-1)


def write(tmp_path, labels):
    for name in "ab":
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / f"{name}.png")
    entries = [{"image": str(tmp_path / "a.png"), "label": label} for label in labels]
    for i, entry in enumerate(entries):
        entry.update(location=[0, i], size=[16, 16])
    path = tmp_path / "datalist.json"
    validation = [{"image": str(tmp_path / "b.png"), "label": [1, 1]}]
    write_datalist(path, ["stroma", "gland"], {"training": entries, "validation": validation})
    return path


def test_mil_needs_untagged_patches(tmp_path, caplog):
    assert check_negatives(write(tmp_path, [[1, 0], [1, 1], [0, 1]])) == []
    with caplog.at_level(logging.WARNING):
        assert check_negatives(write(tmp_path, [[1, 0], [1, 1]])) == ["stroma"]
    assert "lacks class(es) ['stroma']" in caplog.text and "no negative example" in caplog.text
    with pytest.raises(DataError, match=r"every 'training' entry is tagged with every class \['stroma', 'gland'\]"):
        check_negatives(write(tmp_path, [[1, 1], [1, 1]]))
    assert json.loads((tmp_path / "datalist.json").read_text())["classes"] == ["stroma", "gland"]
