"""Pseudo-masks from CAMs and SAM masks: the EP-SAM filter and fusion, and the MLPS CAM-only path.

A pseudo-mask is an (H, W) uint8 map of class indices with :data:`IGNORE` (255) where the label is uncertain;
the segmentation loss skips those pixels. Only classes the image is tagged with can ever appear.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from ..atomic import atomic_output
from ..constants import IGNORE
from ..errors import DataError


def _tagged_cams(cams, tags) -> tuple[np.ndarray, np.ndarray]:
    """CAMs as float32 with NaN (an all-zero CAM normalised by its max) read as no activation, tags as bool."""
    cams = np.nan_to_num(np.asarray(cams, np.float32))
    tags = np.asarray(tags).astype(bool)
    if cams.ndim < 3 or tags.shape != (cams.shape[-3],):
        raise DataError(f"pseudo-masks need (..., C, H, W) CAMs and C tags, got CAMs {cams.shape}, tags {tags.shape}")
    if len(tags) >= IGNORE:
        raise DataError(f"{len(tags)} classes do not fit a uint8 pseudo-mask with {IGNORE} as ignore")
    return cams, tags


def cam_pseudo_mask(cams, tags, confidence: float = 0.5) -> np.ndarray:
    """MLPS path: the tagged class with the highest CAM, or IGNORE where that CAM is below ``confidence``
    (or zero: a pixel no tagged class activates at all has no label).

    ``cams`` may carry leading axes, e.g. (L, C, H, W) for the CAMs of L layers -> one (L, H, W) map per layer.
    """
    cams, tags = _tagged_cams(cams, tags)
    scores = np.where(tags[:, None, None], cams, -np.inf)
    best = scores.argmax(axis=-3)
    top = np.take_along_axis(scores, best[..., None, :, :], axis=-3)[..., 0, :, :]
    return np.where((top >= confidence) & (top > 0), best, IGNORE).astype(np.uint8)


def inside_degree(masks: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """EP-SAM's IDS per mask: |mask ∩ region| / |mask|; an empty mask scores 0 (nothing to keep).

    ``masks`` (N, H, W) bool; ``regions`` (N, H, W) or (H, W) bool (the CAM region of each mask's class).
    """
    masks = np.asarray(masks, bool)
    area = masks.sum(axis=(-2, -1))
    inside = (masks & np.asarray(regions, bool)).sum(axis=(-2, -1))
    return np.divide(inside, area, out=np.zeros(len(masks)), where=area > 0)


def fuse(
    masks: np.ndarray, classes, cams, tags, disagreement: float = 0.5, confidence: float = 0.5, boxes=None
) -> np.ndarray:
    """Kept SAM masks -> one class map.

    - A pixel covered by masks of one or more tagged classes takes the covering class with the highest CAM.
    - It becomes IGNORE where another tagged class's CAM exceeds that class's CAM by ``disagreement`` or more:
      SAM and the CAM disagree strongly and neither is trusted.
    - With ``boxes`` (N, 4) (y0, x0, y1, x1), the prompt box of each mask: inside the box of a class-c mask SAM
      has drawn c's boundary, so an uncovered pixel there cannot be c (the CAM is the blur SAM sharpens). It takes
      the other tagged class with the highest CAM; the only other class if no CAM prefers one; else IGNORE.
      In a binary task this is EP-SAM's rule: inside the box, outside SAM's mask is the other class.
    - Any other uncovered pixel follows the CAM (:func:`cam_pseudo_mask` with ``confidence``): SAM may have
      missed an object the CAM is sure of, and an unsure CAM gives IGNORE rather than a guess.
    - Masks of untagged classes are dropped, so untagged classes never appear.
    """
    cams, tags = _tagged_cams(cams, tags)
    masks, classes = np.asarray(masks, bool), np.asarray(classes, np.int64)
    out = cam_pseudo_mask(cams, tags, confidence)
    covered = np.stack([masks[(classes == c) & tags[c]].any(axis=0) for c in range(len(tags))])
    if not covered.any():
        return out
    any_covered = covered.any(axis=0)
    if boxes is not None:
        excluded = np.zeros_like(covered)
        for (y0, x0, y1, x1), c in zip(np.round(np.asarray(boxes)).astype(np.int64), classes):
            if tags[c]:
                excluded[c, max(y0, 0) : y1 + 1, max(x0, 0) : x1 + 1] = True
        excluded &= ~covered
        remaining = tags[:, None, None] & ~excluded
        scores = np.where(remaining, cams, -np.inf)
        best, top = scores.argmax(axis=0), scores.max(axis=0)
        decided = (top > 0) | (remaining.sum(axis=0) == 1)
        boxed = excluded.any(axis=0) & ~any_covered
        out[boxed] = np.where(decided, best, IGNORE)[boxed]
    sam_class = np.where(covered, cams, -np.inf).argmax(axis=0)
    own = np.take_along_axis(cams, sam_class[None], axis=0)[0]
    rivals = np.where(tags[:, None, None], cams, -np.inf)
    np.put_along_axis(rivals, sam_class[None], -np.inf, axis=0)
    out[any_covered] = sam_class[any_covered]
    out[any_covered & (rivals.max(axis=0) - own >= disagreement)] = IGNORE
    return out


def sam_pseudo_mask(
    masks: np.ndarray,
    classes,
    cams,
    tags,
    cam_threshold: float,
    ids_threshold: float,
    disagreement: float,
    confidence: float,
    boxes=None,
) -> tuple[np.ndarray, np.ndarray]:
    """EP-SAM: keep a SAM mask only if at least ``ids_threshold`` of it lies in its class's CAM region
    (``cam >= cam_threshold``, the region its prompt came from), then :func:`fuse` the kept ones.

    ``boxes``: the (N, 4) prompt boxes, for :func:`fuse`'s rule inside them. Returns the uint8 pseudo-mask and
    which of the N masks were kept.
    """
    cams, tags = _tagged_cams(cams, tags)
    masks, classes = np.asarray(masks, bool), np.asarray(classes, np.int64)
    keep = (inside_degree(masks, cams[classes] >= cam_threshold) >= ids_threshold) & tags[classes]
    kept_boxes = None if boxes is None else np.asarray(boxes)[keep]
    return fuse(masks[keep], classes[keep], cams, tags, disagreement, confidence, kept_boxes), keep


def save_pseudo_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write an (H, W) uint8 pseudo-mask as a PNG, atomically: a resumed run never finds a half-written file."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise DataError(f"{path}: a pseudo-mask must be an (H, W) uint8 array, got {mask.shape} {mask.dtype}")
    with atomic_output(path) as tmp:
        Image.fromarray(mask).save(tmp, format="PNG")
