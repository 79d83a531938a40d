"""Learning test of the segmentation network: train.json's own trainer (SupervisedTrainer, the MLPS
PseudoSupervisionLoss over three pseudo-mask layers, AdamW, cosine schedule) trains a random-weight FlexibleUNet
(efficientnet-lite0) on one fixed batch, which it must then fit; broken on purpose (learning rate 0, loss detached,
labels shuffled) it must not."""

import json

import numpy as np
import pytest
import torch
from conftest import BUNDLE, break_loss, configs
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from monai.data import DataLoader, Dataset
from monai.handlers import from_engine
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
    override = {**FIXED_BATCH, "batch_size": len(json.loads(open(datalist).read())["training"])}
    if broken == "learning rate 0":
        override["learning_rate"] = 0.0
    torch.manual_seed(0)  # the initial weights; the run's set_determinism seeds the rest
    wf = ConfigWorkflow(
        config_file=configs("train.json"),
        workflow_type="train",
        bundle_root=str(BUNDLE),
        pseudo_datalist=datalist,
        ckpt_dir=str(out / "models"),
        log_dir=str(out / "logs"),
        **override,
    )
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    losses = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: losses.append(from_engine(["loss"], first=True)(e.state.output))
    )
    if broken in ("loss detached", "labels shuffled"):
        trainer.loss_function = break_loss(trainer.loss_function, broken)
    wf.run()

    network = wf.parser.get_parsed_content("network")
    entries = wf.parser.get_parsed_content("train#dataset#data")
    data = Dataset(entries, wf.parser.get_parsed_content("validate#preprocessing"))
    batch = next(iter(DataLoader(data, batch_size=len(entries))))
    # BatchNorm's running averages lag a few dozen fast steps behind the weights: recompute them on the batch
    torch.optim.swa_utils.update_bn([batch["image"]], network)
    with torch.no_grad():
        predicted = network.eval()(batch["image"]).argmax(1)
    wf.finalize()
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
