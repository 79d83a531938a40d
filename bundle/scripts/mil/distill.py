"""IKD-MIL's iterative fusion distillation: the teacher's fused maps as the student's targets, and the role reversal."""

from __future__ import annotations

import copy
import logging
import math

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import default_prepare_batch
from torch import nn

from ..errors import DataError

logger = logging.getLogger(__name__)


class TeacherTargets:
    """``prepare_batch`` of the student's trainer: (images, the teacher's fused probabilities on those same augmented
    images, zeroed for every class the patch is not tagged with) for :class:`scripts.mil.losses.DistillationLoss`.
    The teacher runs in eval mode without gradients; the role reversal swaps its weights in place."""

    def __init__(self, teacher: nn.Module):
        self.teacher = teacher

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        images, tags = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        self.teacher.eval()
        with torch.no_grad():
            maps = torch.sigmoid(self.teacher.fused(images).float())
        return images, maps * tags.float()[:, :, None, None]


class RoleReversal:
    """ignite handler of the student's trainer: at the end of every ``interval``-th epoch from epoch 2 x ``interval``
    on, the teacher takes the weights of the best student since the last reversal (by the validator's key metric; the
    current student when nothing was validated) and the student takes the teacher's. ``interval`` 0: never.

    Attach it after the ``ValidationHandler`` so that the epoch's validation is counted first. It has a state dict (the
    best student so far), for the trainer's checkpoint: a resumed run reverses as the uninterrupted one would.

    Args:
        teacher: the network whose fused maps are the targets (:class:`TeacherTargets`).
        student: the network being trained.
        interval: R, the epochs between reversals (the paper's 30); 0 turns the reversal off.
        validator: the student's evaluator, whose key metric picks the best student; None: the current one.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, interval: int, validator: Engine | None = None):
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 0:
            raise DataError(f"MIL reversal_interval must be a whole number of epochs >= 0 (0: off), got {interval!r}")
        self.teacher, self.student, self.interval, self.validator = teacher, student, interval, validator
        self.best: dict | None = None
        self.best_metric = -math.inf

    def due(self, epoch: int) -> bool:
        return self.interval > 0 and epoch >= 2 * self.interval and epoch % self.interval == 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        if self.validator is not None:
            self.validator.add_event_handler(Events.EPOCH_COMPLETED, self.record)

    def record(self, validator: Engine) -> None:
        """Keep a copy of the student when its validation metric is the best since the last reversal."""
        metric = validator.state.metrics.get(validator.state.key_metric_name)
        if metric is not None and metric > self.best_metric:
            self.best_metric = float(metric)
            self.best = copy.deepcopy(self.student.state_dict())

    def __call__(self, engine: Engine) -> None:
        if not self.due(engine.state.epoch):
            return
        best = self.best if self.best is not None else copy.deepcopy(self.student.state_dict())
        teacher = copy.deepcopy(self.teacher.state_dict())
        self.teacher.load_state_dict(best)
        self.student.load_state_dict(teacher)
        logger.info(
            "MIL role reversal after epoch %d: the teacher takes the best student (metric %.4f), "
            "the student the teacher's weights",
            engine.state.epoch,
            self.best_metric,
        )
        self.best, self.best_metric = None, -math.inf

    def state_dict(self) -> dict:
        return {"best": self.best, "best_metric": self.best_metric}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_metric = state["best"], float(state["best_metric"])
