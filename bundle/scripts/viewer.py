"""The bundle as MONAI Label and its viewers (QuPath, Digital Slide Archive) see it.

They speak another dialect than the bundle's datalists: x before y (a region's ``location`` is (x, y) and its
``size`` (w, h); a label array is (W, H)), and label 0 is background, never drawn or reported. Here tissue class
k is label k + 1 and 0 is "not predicted" (inference) or "not painted" (a pathologist's correction, ignored in
training). This module is the one place that translates: a region request into the entry :class:`LoadPatchd`
reads, a prediction into the label the viewers draw, and a corrected label back into class indices.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform

from .constants import IGNORE
from .errors import DataError
from .transforms import LoadPatchd
from .wsi.reader import level_downsample, slide_mpp

log = logging.getLogger(__name__)

# read whole, as tiles, whatever region a viewer asks for (QuPath sends a level and a region for PNGs too);
# any other file is read as a slide
TILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def region_entry(request: Mapping) -> dict:
    """The datalist entry for a MONAI Label request: a slide region at ``location`` (x, y) on level 0 with ``size``
    (w, h) at ``level`` becomes ``location`` (y, x) and ``size`` (h, w); a tile image is read whole.

    Args:
        request: MONAI Label's request, ``image`` a local path; ``location``/``size``/``level`` for a slide region.

    Returns:
        ``{"image"}`` for a tile, else ``{"image", "location", "size", "level"}`` in the bundle's (y, x) order; a
        slide without a region is an error (a whole slide is not one array).
    """
    path = os.fspath(request["image"])
    if path.lower().endswith(TILE_SUFFIXES):
        return {"image": path}
    size = request.get("size") or [0, 0]
    if not any(size):
        raise DataError(
            f"{path}: a whole slide; ask for a region (MONAI Label's /infer/wsi with a location and size), "
            "or run the bundle's `inference` on the slide"
        )
    (x, y), (w, h) = request.get("location") or [0, 0], size
    if w <= 0 or h <= 0 or x < 0 or y < 0:
        raise DataError(f"{path}: no slide region at (x, y) = ({x}, {y}) with size (w, h) = ({w}, {h})")
    level = int(request.get("level") or 0)
    return {"image": path, "location": [int(y), int(x)], "size": [int(h), int(w)], "level": level}


class LoadRegiond(MapTransform):
    """Read what a MONAI Label request names: a tile whole, or a slide region (see :func:`region_entry`), channel-first
    uint8 like :class:`LoadPatchd`. A region at another pixel size than the model's is resampled to it (viewers ask
    for level 0, 0.25 um/px on a 40x slide), its own shape kept under ``region_shape`` for :class:`ToViewerLabeld`.
    The request's keys stay as they are: MONAI Label's contour finder offsets polygons by the (x, y) ``location``.

    Args:
        keys: the image key (MONAI Label's ``image``).
        backend: slide reader, ``"cucim"`` (OpenSlide fallback) or ``"openslide"``.
        mpp: the model's pixel size in um (inference.json's ``mpp``); None reads regions as they are.
        slide_mpp: level 0's pixel size for slides that record none (else they are read as if at ``mpp``).
        mpp_tolerance: relative difference read as the same pixel size.
    """

    def __init__(
        self, keys: KeysCollection = "image", backend: str = "cucim", mpp=None, slide_mpp=None, mpp_tolerance=0.1
    ):
        super().__init__(keys)
        self.loader = LoadPatchd(keys="image", mask_keys=(), backend=backend)
        self.mpp, self.slide_mpp, self.mpp_tolerance = mpp, slide_mpp, mpp_tolerance
        self._slide_mpp: dict[str, float | None] = {}

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            entry = region_entry({**d, "image": d[key]})
            image = self.loader(entry)["image"]
            scale = self.scale(entry)
            if scale != 1:
                d["region_shape"] = list(image.shape[1:])
                size = [max(1, round(n * scale)) for n in image.shape[1:]]
                image = F.interpolate(torch.as_tensor(image)[None].float(), size, mode="bilinear", antialias=True)
                image = image[0].round().clamp(0, 255).to(torch.uint8).numpy()
            d[key] = image
        return d

    def scale(self, entry: Mapping) -> float:
        """Model pixels per region pixel: 1 for a tile, without a model pixel size, or within the tolerance."""
        if "level" not in entry or self.mpp is None:
            return 1.0
        path = entry["image"]
        reader, wsi = self.loader.slide(path)
        if path not in self._slide_mpp:
            self._slide_mpp[path] = slide_mpp(path, reader, wsi) or self.slide_mpp
            if self._slide_mpp[path] is None:
                log.warning("%s: no pixel size recorded (set slide_mpp); read at the model's %s um/px", path, self.mpp)
        if self._slide_mpp[path] is None:
            return 1.0
        scale = self._slide_mpp[path] * level_downsample(reader, wsi, entry["level"]) / self.mpp
        return 1.0 if abs(scale - 1) <= self.mpp_tolerance else scale


class ToViewerLabeld(MapTransform):
    """Class indices (1, H, W) as the label MONAI Label writes and draws: uint8 (W, H), tissue class k as k + 1, at
    the region's own size when :class:`LoadRegiond` resampled it.

    Args:
        keys: the prediction key (``pred``).
    """

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = torch.as_tensor(d[key]).reshape(1, 1, *d[key].shape[-2:]).float()
            if "region_shape" in d:  # predicted at the model's pixel size: back to the region's
                pred = F.interpolate(pred, d["region_shape"], mode="nearest-exact")
            d[key] = (pred[0, 0].T + 1).to(torch.uint8).numpy()
        return d


class FromViewerLabeld(MapTransform):
    """A pathologist's label (0 unpainted, k = class k - 1) as class indices, unpainted pixels IGNORE; applied to the
    training entries :class:`scripts.seg.data.TargetDataset` marks ``viewer_label`` (MONAI Label's datastore, the
    value is the label file); pseudo-masks pass unchanged.

    Args:
        keys: the target key (``label``).
        num_classes: the model's class count; a larger label value is an error naming the label file.
    """

    def __init__(self, keys: KeysCollection, num_classes: int):
        super().__init__(keys)
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if not d.get("viewer_label"):
            return d
        for key in self.key_iterator(d):
            label = np.asarray(d[key])
            if label.size and int(label.max()) > self.num_classes:
                raise DataError(
                    f"{d['viewer_label']}: label value {int(label.max())}, but the model has {self.num_classes} "
                    f"classes (MONAI Label labels: 0 unpainted, 1..{self.num_classes} the classes)"
                )
            d[key] = np.where(label == 0, IGNORE, label.astype(np.int64) - 1).astype(np.uint8)
        return d
