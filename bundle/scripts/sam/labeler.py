"""Stage 2: pseudo-masks of the training images. CAM -> prompts -> SAM -> IDS filter -> fused class map (EP-SAM),
and the CAM-only mask of every CAM layer (MLPS). :class:`scripts.cam.maps.WholeImageCAM` reads each image in windows
of the training patch size, the scale the classifier learned; the files written are listed in
:mod:`scripts.sam.outputs`, the rules in :mod:`scripts.sam.rules`, the decoder rounds in :mod:`scripts.sam.refine`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

from ..atomic import atomic_output
from ..errors import DataError
from .embeddings import Embeddings
from .masks import cam_pseudo_mask, save_pseudo_mask
from .model import SegmentAnything
from .outputs import Outputs
from .rules import Rules

logger = logging.getLogger(__name__)


def load_cams(path: Path) -> np.ndarray:
    return np.load(path).astype(np.float32) / 255


class ImageHandler:
    """The resumable per-image part of a labelling stage: an ignite handler for an evaluator whose loader gives
    :meth:`pending` items one per batch (whole images differ in size). Subclasses say when an item is ``done`` (its
    last-written file exists) and what a batch's ``pred`` becomes (:meth:`handle`); ``what`` names them in logs."""

    what = "pseudo-labels"
    items: list[dict]

    def done(self, item: dict) -> bool:
        raise NotImplementedError

    def pending(self) -> list[dict]:
        """Items without all their outputs; a resumed run processes only these."""
        todo = [item for item in self.items if not self.done(item)]
        logger.info(f"{self.what}: {len(self.items) - len(todo)} of {len(self.items)} images done, {len(todo)} to go")
        return todo

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        batch = engine.state.batch
        if len(batch["name"]) != 1:
            raise DataError(f"{self.what} need batch_size 1 (whole images differ in size), got {len(batch['name'])}")
        self.handle(batch, engine.state.output["pred"], batch["label"][0].cpu().numpy().astype(bool))

    def handle(self, batch: dict, pred: torch.Tensor, tags: np.ndarray) -> None:
        raise NotImplementedError


class PseudoLabelHandler(ImageHandler):
    """ignite handler for an evaluator whose inferer is :class:`scripts.cam.maps.WholeImageCAM` and whose loader gives
    :meth:`pending` items one per batch, with no augmentation (masks belong to the image as stored). Per image it
    writes the CAM, the CAM-only mask of every layer and the SAM pseudo-mask of round 0.

    Args:
        items: the units of work (:func:`scripts.sam.outputs.pseudo_items`), with ``name``, ``image`` and ``label``.
        output_dir: the stage's output folder (file names: :class:`scripts.sam.outputs.Outputs`).
        sam: the SAM model prompted for the round-0 pseudo-masks.
        rules: the prompt and fusion rules, shared with the refinement rounds.
        num_layers: CAM layers the inferer returns, one CAM-only mask each.
        embeddings: the SAM embedding cache, shared with the refinement rounds.
    """

    def __init__(
        self,
        items: Sequence[dict],
        output_dir: str | os.PathLike,
        sam: SegmentAnything,
        rules: Rules,
        num_layers: int,
        embeddings: Embeddings,
    ):
        self.items, self.out, self.sam, self.rules = list(items), Outputs(output_dir), sam, rules
        self.num_layers, self.embeddings = num_layers, embeddings

    def done(self, item: dict) -> bool:
        name = item["name"]
        paths = [self.out.cam(name), self.out.sam(name, 0), *(self.out.layer(name, i) for i in range(self.num_layers))]
        return all(p.exists() for p in paths)

    def handle(self, batch: dict, cams: torch.Tensor, tags: np.ndarray) -> None:
        if cams.shape[1] != self.num_layers:
            raise DataError(f"the CAM inferer gave {cams.shape[1]} layers, the handler expects {self.num_layers}")
        image = batch["image"][0].permute(1, 2, 0).cpu().numpy().astype(np.uint8)
        self.label(batch["name"][0], image, cams[0].cpu().numpy(), tags)

    def label(self, name: str, image: np.ndarray, cams: np.ndarray, tags: np.ndarray) -> None:
        """``cams`` (L, C, H, W) in [0, 1]. The SAM mask is written last: it marks the image done."""
        cams = np.where(tags[None, :, None, None], np.nan_to_num(cams), 0.0)
        stored = np.round(cams[0] * 255).astype(np.uint8)  # what later rounds and reports read back
        with atomic_output(self.out.cam(name)) as tmp:
            np.save(tmp, stored)
        for i, layer in enumerate(cam_pseudo_mask(cams, tags, self.rules.confidence)):
            save_pseudo_mask(self.out.layer(name, i), layer)
        cams = stored.astype(np.float32) / 255
        prompts = self.rules.prompts(name, cams, tags)
        embedding = self.embeddings({"name": name}, image) if len(prompts) else None
        save_pseudo_mask(self.out.sam(name, 0), self.rules.sam_mask(self.sam, embedding, cams, tags, prompts))
