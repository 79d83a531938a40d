"""The EP-SAM rules of stage 2: which CAM regions become prompts, and how SAM masks become a pseudo-mask."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError
from .masks import cam_pseudo_mask, sam_pseudo_mask
from .model import Embedding, SegmentAnything
from .prompts import Prompts, cam_prompts

logger = logging.getLogger(__name__)


def cam_cell(stride: int, window: int | None, input_size: int) -> float:
    """Image pixels per CAM cell: the network's output ``stride`` at the scale the CAM inferer reads the image
    (a ``window`` resized to ``input_size``; for whole images, those at ``input_size``). Nothing finer than a cell
    is resolved, so two objects are told apart only by peaks at least two cells apart with a dip between them.

    Args:
        stride: the classifier's output stride (16 or 32).
        window: the CAM window side in pixels (:func:`scripts.sam.outputs.patch_size`); None for whole images.
        input_size: the side in pixels the classifier's input is resized to.

    Returns:
        The side of a CAM cell in image pixels.
    """
    return stride * (window or input_size) / input_size


def object_classes(classes: Sequence[str], names: Sequence[str] | None) -> list[int] | None:
    """Indices of the classes SAM is prompted for (``sam_classes``), None for all; an unknown name is a DataError.

    Args:
        classes: the datalist's class names.
        names: the names of the classes to prompt (``sam_classes``); None for all.

    Returns:
        Their indices into ``classes``, in the order of ``names``; None for all.
    """
    if names is None:
        return None
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise DataError(f"sam_classes {unknown} are not among the datalist's classes {list(classes)}")
    return [list(classes).index(n) for n in names]


@dataclass
class Rules:
    """How CAMs become prompts and SAM masks become a pseudo-mask; one object shared by the first pass, every
    refinement round and the reports, so they all use the same prompts (seeded per image name, not per run order).

    A class's CAM region (the prompts' components, the IDS filter's reference) is ``cam >= cam_threshold``; with
    ``cam_threshold`` None it is where the class has the highest tagged CAM, the CAM-only arg-max labelling: no
    threshold to choose, and SAM then redraws the boundaries of the arg-max blobs (every pixel of an H&E tile is
    some class, so the arg-max is the CAM's own answer).

    ``objects``: the classes SAM is prompted for (None: every class). SAM outlines objects (a gland, a nucleus, a
    tumour nest); a background-like class (stroma, lumen, "not gland") is no object and a box around it is the
    whole image. Such classes get no prompts, in the first pass or in refinement; they keep the pixels no kept SAM
    mask covers where their CAM wins, and SAM's masks of the object classes draw their boundary.

    Args:
        ids_threshold: EP-SAM: keep a SAM mask only if this fraction (in [0, 1]) of it lies in its class's CAM region.
        confidence: uncovered pixels: the CAM's class where its CAM reaches this (and is > 0), else ignore.
        disagreement: CAM margin in [0, 1] at which a SAM-covered pixel becomes ignore (:func:`scripts.sam.masks.fuse`).
        box_rule: inside a kept mask's prompt box SAM draws the boundary (see :func:`scripts.sam.masks.fuse`).
        cam_threshold: the CAM region's threshold in [0, 1]; None: the arg-max regions (see above).
        prompt_args: keyword arguments of :func:`scripts.sam.prompts.cam_prompts`: margin, min_distance, ...
        objects: the class indices SAM is prompted for (see above); None: every class.
        seed: base seed of the prompts' and the refinement's random draws, combined with the image name.
    """

    # the values are pseudo_label.json's (its settings are the one place they are set)
    ids_threshold: float
    confidence: float
    disagreement: float
    box_rule: bool
    cam_threshold: float | None = None
    prompt_args: dict = field(default_factory=dict)
    objects: Sequence[int] | None = None
    seed: int = 0

    def rng(self, name: str, *extra: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(name.encode()), *extra])

    def regions(self, cams: np.ndarray, tags) -> tuple[np.ndarray, float]:
        """The CAMs the prompts and the filter read, and the threshold that gives the regions."""
        if self.cam_threshold is not None:
            return cams, self.cam_threshold
        tagged = np.where(np.asarray(tags, bool)[:, None, None], cams, -np.inf)
        wins = np.arange(len(cams))[:, None, None] == tagged.argmax(0)
        return np.where(wins, cams, 0.0).astype(np.float32), float(np.finfo(np.float32).tiny)

    def prompts(self, name: str, cams: np.ndarray, tags) -> Prompts:
        cams, threshold = self.regions(cams, tags)
        return cam_prompts(
            cams, tags, threshold=threshold, objects=self.objects, rng=self.rng(name), **self.prompt_args
        )

    def mask_prompts(self, name: str, pseudo: np.ndarray, tags, round_: int) -> Prompts:
        """Training prompts for the decoder: the connected components of each object class of a pseudo-mask (a flat
        one-hot map has no peaks to split at)."""
        onehot = np.stack([pseudo == c for c in range(len(tags))]).astype(np.float32)
        args = {**self.prompt_args, "min_distance": None}
        return cam_prompts(onehot, tags, threshold=0.5, objects=self.objects, rng=self.rng(name, round_), **args)

    def sam_mask(self, sam: SegmentAnything, embedding: Embedding | None, cams: np.ndarray, tags, prompts: Prompts):
        """The fused pseudo-mask; no prompts (an empty CAM) -> the CAM-only mask (ignore where the CAM is unsure)."""
        cams, threshold = self.regions(cams, tags)
        if not len(prompts):
            return cam_pseudo_mask(cams, tags, self.confidence)
        masks = sam.predict(embedding, prompts.boxes, prompts.points, prompts.labels).probs > 0.5
        return sam_pseudo_mask(
            masks,
            prompts.classes,
            cams,
            tags,
            threshold,
            self.ids_threshold,
            self.disagreement,
            self.confidence,
            prompts.boxes if self.box_rule else None,
        )[0]
