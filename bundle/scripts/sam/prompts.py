"""SAM prompts from class activation maps (EP-SAM), one prompt per object: a box around it and points from the CAM.

Coordinates are (y, x) pixel indices of the image, like every other array in the bundle;
:func:`scripts.sam.to_sam` is the only place they become SAM's (x, y).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.feature import peak_local_max
from skimage.measure import label, regionprops
from skimage.segmentation import watershed

from ..errors import DataError


@dataclass(frozen=True)
class Prompts:
    """The prompts of one image, one row per object, ready for ``SegmentAnything.predict``."""

    boxes: np.ndarray  # (N, 4) float32 (y0, x0, y1, x1), inclusive pixel indices
    points: np.ndarray  # (N, P, 2) float32 (y, x)
    labels: np.ndarray  # (N, P) int64: 1 inside the object, 0 outside, -1 padding
    classes: np.ndarray  # (N,) int64 class index each prompt was made for

    def __len__(self) -> int:
        return len(self.boxes)


def _sample(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of up to ``n`` distinct entries drawn with probability proportional to ``weights``."""
    nonzero = np.flatnonzero(weights > 0)
    if n <= 0 or len(nonzero) == 0:
        return nonzero[:0]
    w = weights[nonzero]
    return nonzero[rng.choice(len(nonzero), size=min(n, len(nonzero)), replace=False, p=w / w.sum())]


def instances(cam: np.ndarray, region: np.ndarray, min_distance: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The objects of one class: a label image over ``region`` and each label's peak (row ``label - 1``), or None.

    With ``min_distance`` the region is split by a watershed of ``-cam`` from its local maxima at least that many
    pixels apart: touching objects whose CAMs peak apart become separate objects, so one box no longer covers
    several. A component in which none is found (a CAM flat over the whole image) gets its CAM maximum as its peak.
    Without ``min_distance``: the connected components.
    """
    components = label(region, connectivity=2)
    if min_distance is None:
        return components, None
    peaks = peak_local_max(cam, min_distance=max(int(min_distance), 1), labels=components, exclude_border=False)
    missing = np.setdiff1d(np.arange(1, components.max() + 1), components[tuple(peaks.T)])
    flat = [np.unravel_index(np.argmax(np.where(components == i, cam, -np.inf)), cam.shape) for i in missing]
    peaks = np.concatenate([peaks.reshape(-1, 2), np.reshape(flat, (-1, 2))]).astype(np.int64)
    markers = np.zeros(cam.shape, np.int64)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-cam, markers, mask=region), peaks


def cam_prompts(
    cams: np.ndarray,
    tags,
    threshold: float = 0.5,
    margin: int = 0,
    n_positive: int = 0,
    n_negative: int = 0,
    min_area: int = 1,
    max_components: int | None = None,
    min_distance: int | None = None,
    objects=None,
    rng: np.random.Generator | int | None = 0,
) -> Prompts:
    """Per tagged object class, each object of ``cam >= threshold`` (see :func:`instances`) gives a box and points.

    ``cams``: (C, H, W) class activation maps normalised to [0, 1]; ``tags``: the C image-level labels
    (untagged classes get no prompts). ``objects``: the class indices SAM is prompted for (None: every class);
    the others (background-like classes such as stroma, which SAM cannot outline as an object) get no prompts
    but still give negative points. An object smaller than ``min_area`` pixels is dropped (CAM speckle makes
    boxes SAM cannot use); per class at most ``max_components`` are kept, strongest CAM mass first.
    The box is the object's extent grown by ``margin`` pixels (CAMs are blurry, SAM wants the whole object inside)
    and clipped to the image. The first of ``n_positive`` points is the object's peak when it has one (its most
    confident pixel), the others are drawn inside it with probability proportional to the CAM; ``n_negative``
    points inside the box where another tagged class's CAM dominates, proportional to that CAM (a negative point
    outside the box tells SAM nothing). ``rng``: a seed or generator, so the same CAMs always give the same prompts.
    The defaults add nothing (a tight box around every component, no points); the tuned values are pseudo_label.json's
    ``prompts``, their one place.
    """
    cams = np.nan_to_num(np.asarray(cams, np.float32))
    tags = np.asarray(tags).astype(bool)
    if cams.ndim != 3 or tags.shape != (cams.shape[0],):
        raise DataError(f"CAM prompts need (C, H, W) CAMs and C tags, got CAMs {cams.shape} and tags {tags.shape}")
    if not 0 < threshold <= 1:
        raise DataError(f"prompt threshold must be in (0, 1], got {threshold}")
    prompted = tags.copy()
    if objects is not None:
        prompted &= np.isin(np.arange(len(tags)), objects)
    rng = np.random.default_rng(rng)
    h, w = cams.shape[1:]
    tagged = np.where(tags[:, None, None], cams, 0.0)
    rows = []  # (class, box, positives, negatives)
    for c in np.flatnonzero(prompted):
        others = np.delete(tagged, c, axis=0).max(axis=0, initial=0.0)
        negative = np.where((others >= threshold) & (others > cams[c]), others, 0.0)
        labelled, peaks = instances(cams[c], cams[c] >= threshold, min_distance)
        found = [r for r in regionprops(labelled, cams[c]) if r.area >= min_area]
        found.sort(key=lambda r: -r.area * r.intensity_mean)
        for r in found[:max_components]:
            y0, x0, y1, x1 = r.bbox
            box = np.array([y0 - margin, x0 - margin, y1 - 1 + margin, x1 - 1 + margin])
            box = np.clip(box, 0, [h - 1, w - 1, h - 1, w - 1])
            weights = cams[c][tuple(r.coords.T)]
            peak = (np.zeros((0, 2), np.int64) if peaks is None else peaks[r.label - 1 : r.label])[:n_positive]
            weights[(r.coords[:, None] == peak).all(-1).any(-1)] = 0  # the peak is not drawn twice
            positives = np.concatenate([peak, r.coords[_sample(weights, n_positive - len(peak), rng)]])
            inside = negative[box[0] : box[2] + 1, box[1] : box[3] + 1]
            picked = _sample(inside.ravel(), n_negative, rng)
            negatives = np.stack(np.unravel_index(picked, inside.shape), axis=1) + box[:2]
            rows.append((c, box, positives, negatives))
    n_points = max((len(p) + len(q) for _, _, p, q in rows), default=0)
    boxes = np.zeros((len(rows), 4), np.float32)
    points = np.zeros((len(rows), n_points, 2), np.float32)
    labels = np.full((len(rows), n_points), -1, np.int64)
    for i, (_, box, positives, negatives) in enumerate(rows):
        boxes[i] = box
        k, m = len(positives), len(positives) + len(negatives)
        points[i, :m] = np.concatenate([positives, negatives])
        labels[i, :k], labels[i, k:m] = 1, 0
    return Prompts(boxes, points, labels, np.array([c for c, *_ in rows], np.int64))
