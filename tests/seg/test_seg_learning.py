"""Learning test of the segmentation network: train.json's own trainer (SupervisedTrainer, the MLPS
PseudoSupervisionLoss over three pseudo-mask layers, AdamW, cosine schedule) trains a random-weight FlexibleUNet
(efficientnet-lite0) on one fixed batch, which it must then fit; broken on purpose (learning rate 0, loss detached,
labels shuffled) it must not."""

import json

import numpy as np
import pytest
import torch
from conftest import configs, train_on_one_batch
from seg_fixtures import demo_with_pseudo_masks

torch.set_num_threads(1)
STEPS = 30
BREAKS = ("learning rate 0", "loss detached", "labels shuffled")
# every step the same batch: all the tiny demo's training patches at once, without augmentation; no validation split
FIXED_BATCH = {
    "pretrained": False,
    "num_workers": 0,
    "num_threads": 1,
    "progress_bar": False,
    "max_epochs": STEPS,
    "learning_rate": 3e-3,  # the config's 5e-4 is for 20 epochs of thousands of patches
    "holdout_fraction": 0,
    "train#augmentation": [],
}


def train(datalist, out, broken: str | None = None) -> tuple[list[float], np.ndarray]:
    """Train ``STEPS`` steps; returns the loss of every step and the per-class IoU of the network's arg-max on the batch
    afterwards against the first pseudo-mask layer (here the ground truth)."""
    size = len(json.loads(open(datalist).read())["training"])
    losses, network, batch = train_on_one_batch(
        configs("train.json"),
        "train#dataset#data",
        broken,
        pseudo_datalist=datalist,
        ckpt_dir=str(out / "models"),
        log_dir=str(out / "logs"),
        **FIXED_BATCH,
        batch_size=size,
    )
    with torch.no_grad():
        predicted = network(batch["image"]).argmax(1)
    predicted, target = predicted.numpy(), batch["label"][:, 0].numpy()
    counted = target != 255
    iou = [
        ((predicted == c) & (target == c)).sum() / ((predicted == c) | (target == c))[counted].sum() for c in range(3)
    ]
    return losses, np.array(iou)


def learned(losses: list[float], iou: np.ndarray) -> bool:
    """The criterion: the loss fell to at most half its first value and every class has IoU >= 0.9 (the untrained
    network's are below 0.3)."""
    return len(losses) == STEPS and losses[-1] <= losses[0] / 2 and iou.min() >= 0.9


@pytest.fixture(scope="module")
def datalist(tiny_demo):
    return demo_with_pseudo_masks(tiny_demo)


def test_the_network_fits_a_fixed_batch(datalist, tmp_path):
    losses, iou = train(datalist, tmp_path)
    assert learned(losses, iou), (losses[0], losses[-1], iou)


@pytest.mark.slow  # the must-fail checks of the learning test above: 3 more trainings
@pytest.mark.parametrize("broken", BREAKS)
def test_a_broken_trainer_does_not_fit(datalist, tmp_path, broken):
    losses, iou = train(datalist, tmp_path, broken)
    assert not learned(losses, iou), (losses[0], losses[-1], iou)
