"""Learning test of the CAM classifier: train_cam.json's own trainer (SupervisedTrainer, BCEWithLogits, AdamW with the
head's learning-rate factor, cosine schedule) trains a random-weight CAMNet on one fixed batch, which it must then fit;
broken on purpose (learning rate 0, loss detached, labels shuffled) it must not."""

import json

import pytest
import torch
from conftest import configs, train_on_one_batch

torch.set_num_threads(1)
STEPS = 24
BREAKS = ("learning rate 0", "loss detached", "labels shuffled")
# every step the same batch: all the tiny demo's training patches at once, without augmentation; PDA off (it hides each
# map's peak, an objective made harder every epoch, so its loss rises on purpose); no validation, no checkpoints
FIXED_BATCH = {
    "pretrained": False,
    "cam_input_size": 32,
    "num_workers": 0,
    "num_threads": 1,
    "progress_bar": False,
    "pda": False,
    "max_epochs": STEPS,
    "learning_rate": 1e-3,  # the config's 1e-4 (x10 for the head) is for 8 epochs of thousands of patches
    "val_interval": 10**6,
    "train#preprocessing": "@validate#preprocessing",
    "train#checkpoint_handlers": [],
}


def train(datalist, out, broken: str | None = None) -> tuple[list[float], float]:
    """Train ``STEPS`` steps; returns the loss of every step and the multi-label accuracy on the batch afterwards."""
    size = len(json.loads(open(datalist).read())["training"])
    losses, network, batch = train_on_one_batch(
        configs("train_cam.json"),
        "train#dataset#data",
        broken,
        datalist=datalist,
        ckpt_dir=str(out / "models"),
        log_dir=str(out / "logs"),
        **FIXED_BATCH,
        batch_size=size,
    )
    with torch.no_grad():
        predicted = torch.sigmoid(network(batch["image"])) >= 0.5
    return losses, (predicted == batch["label"].bool()).float().mean().item()


def learned(losses: list[float], accuracy: float) -> bool:
    """The criterion: the loss fell to at most half its first value and >= 90% of the (patch, class) tags are right
    (answering the majority for every class scores 69% on this batch)."""
    return len(losses) == STEPS and losses[-1] <= losses[0] / 2 and accuracy >= 0.9


def test_the_classifier_fits_a_fixed_batch(tiny_demo, tmp_path):
    losses, accuracy = train(tiny_demo, tmp_path)
    assert learned(losses, accuracy), (losses[0], losses[-1], accuracy)


@pytest.mark.slow  # the must-fail checks of the learning test above: 3 more trainings
@pytest.mark.parametrize("broken", BREAKS)
def test_a_broken_trainer_does_not_fit(tiny_demo, tmp_path, broken):
    losses, accuracy = train(tiny_demo, tmp_path, broken)
    assert not learned(losses, accuracy), (losses[0], losses[-1], accuracy)
