"""Transforms MONAI lacks: one loader for every datalist entry, and H&E stain jitter.

MONAI's ``LoadImaged`` reads a whole file and knows nothing of a datalist entry's ``location``/``size``;
``PatchWSIDataset`` reads slides only. :class:`LoadPatchd` reads both kinds of entry, so one preprocessing
chain serves tiles (GlaS, LUAD-HistoSeg, the demo) and slide patches. MONAI has stain *normalisation*
(``monai.apps.pathology.transforms``) but no stain *augmentation*; :class:`RandHEDJitterd` adds it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type, convert_to_numpy
from skimage.color import hed_from_rgb, rgb_from_hed

from .errors import DataError
from .images import read_mask, read_rgb
from .wsi.reader import level_downsample, open_slide

TILE_CACHE = 64  # decoded tiles kept per process: a 112-px patch grid reads each tile ~100 times per epoch


@functools.lru_cache(maxsize=TILE_CACHE)
def _read_tile(path: str, is_mask: bool, mtime: float) -> np.ndarray:
    array = read_mask(path) if is_mask else read_rgb(path)
    array.flags.writeable = False  # shared by every patch of the tile
    return array


class LoadPatchd(MapTransform):
    """Read the patch a datalist entry describes, channel-first uint8 (image 3 x h x w, mask 1 x h x w).

    A tile entry (PNG/JPEG/TIFF image, no ``"level"``) is cropped at ``location`` (y, x) with ``size``
    (h, w), or read whole without them. A slide entry (with ``"level"``) is read through
    :class:`monai.data.WSIReader` (``backend`` cuCIM, OpenSlide fallback): ``location`` at level 0,
    ``size`` at ``level``; its mask is a label TIFF read the same way, or a PNG holding just that patch (the
    pseudo-label stage writes one per slide patch). Keys in ``mask_keys`` are read as class-index masks, the
    others as RGB.

    Args:
        keys: the entry keys whose files are read; the others pass through.
        mask_keys: the keys read as class-index masks (1 channel); the others are read as RGB.
        backend: slide reader, ``"cucim"`` (OpenSlide fallback) or ``"openslide"``; tiles ignore it.
        allow_missing_keys: skip a key an entry lacks instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        mask_keys: Sequence[str] = ("mask", "pseudo"),
        backend: str = "cucim",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.mask_keys = tuple(mask_keys)
        self.backend = backend
        self._slides: dict[str, tuple] = {}  # open slide handles of this process

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            path = os.fspath(d[key])
            is_mask = key in self.mask_keys
            if "level" not in d:
                patch = self._tile(path, d, is_mask)
            elif is_mask and path.lower().endswith(".png"):
                patch = self._tile(path, {}, is_mask)
                if list(patch.shape[1:]) != list(d.get("size", [])):
                    raise DataError(
                        f"{path}: a {patch.shape[1]} x {patch.shape[2]} mask for a slide patch of size {d.get('size')}"
                    )
            else:
                patch = self._slide(path, d)
            d[key] = patch[:1] if is_mask else patch
        return d

    def _tile(self, path: str, d: Mapping, is_mask: bool) -> np.ndarray:
        try:
            mtime = os.path.getmtime(path)
        except OSError:
            raise DataError(f"{path}: file not found") from None
        array = _read_tile(path, is_mask, mtime)
        if array.ndim == 2:
            array = array[..., None]
        if "location" in d or "size" in d:
            (y, x), (h, w) = d.get("location", (0, 0)), d.get("size", array.shape[:2])
            if y < 0 or x < 0 or h <= 0 or w <= 0 or y + h > array.shape[0] or x + w > array.shape[1]:
                raise DataError(
                    f"{path}: patch at location (y, x) = ({y}, {x}) with size (h, w) = ({h}, {w}) does not lie "
                    f"inside the {array.shape[0]} x {array.shape[1]} image"
                )
            array = array[y : y + h, x : x + w]
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    def slide(self, path: str) -> tuple:
        """``(reader, wsi)`` of a slide, opened once per process."""
        if path not in self._slides:
            self._slides[path] = open_slide(path, self.backend)
        return self._slides[path]

    def _slide(self, path: str, d: Mapping) -> np.ndarray:
        reader, wsi = self.slide(path)
        if "location" not in d or "size" not in d:
            raise DataError(f"{path}: a slide entry needs 'location' and 'size' besides 'level', got keys {sorted(d)}")
        _check_region(path, reader, wsi, d)
        try:
            patch, _ = reader.get_data(wsi, location=tuple(d["location"]), size=tuple(d["size"]), level=int(d["level"]))
        except Exception as e:  # the backends raise ValueError, RuntimeError, OpenSlideError ...
            raise DataError(
                f"{path}: cannot read the patch at {d['location']} size {d['size']} level {d['level']} ({e})"
            ) from e
        return np.ascontiguousarray(convert_to_numpy(patch, dtype=np.uint8))


def _check_region(path: str, reader, wsi, d: Mapping) -> None:
    """A patch must overlap the slide: the readers return blank pixels (or fail obscurely) for one outside it."""
    level = int(d["level"])
    if not 0 <= level < reader.get_level_count(wsi):
        raise DataError(f"{path}: level {level} does not exist (the slide has {reader.get_level_count(wsi)} levels)")
    (y, x), (h, w) = d["location"], d["size"]
    height, width = reader.get_size(wsi, 0)
    ds = level_downsample(reader, wsi, level)
    slack = ds - 1  # a level's size is rounded: its last pixel may reach past level 0's by under one level pixel
    if h <= 0 or w <= 0 or y < 0 or x < 0 or y + h * ds > height + slack or x + w * ds > width + slack:
        raise DataError(
            f"{path}: the patch at level-0 (x, y) = ({x}, {y}) of size (w, h) = ({w}, {h}) at level {level} does not "
            f"lie inside the slide ({width} x {height} pixels, w x h)"
        )


class RandHEDJitterd(RandomizableTransform, MapTransform):
    """H&E stain augmentation (Tellez et al., 2018): split optical density into haematoxylin, eosin and DAB
    (Ruifrok's vectors, ``skimage.color.hed_from_rgb``), scale each stain by U(1 - alpha, 1 + alpha) and
    shift it by U(-beta, beta) optical-density units, and recombine.

    ``skimage.color.rgb2hed`` is not used because it clips negative stain amounts, which changes colours
    outside the H-E-DAB cone even with no jitter; this linear round trip is exact.
    Input: channel-first RGB in [0, 1]; output the same, clipped.

    Args:
        keys: the keys of the images to jitter.
        prob: probability in [0, 1] of jittering a sample (all its keys alike).
        alpha: scale jitter: each stain is multiplied by U(1 - alpha, 1 + alpha).
        beta: shift jitter in optical-density units: each stain is shifted by U(-beta, beta).
        allow_missing_keys: skip a key a sample lacks instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        alpha: float = 0.05,
        beta: float = 0.05,
        allow_missing_keys: bool = False,
    ):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.alpha, self.beta = alpha, beta
        self.scale, self.shift = np.ones(3), np.zeros(3)

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self.scale = self.R.uniform(1 - self.alpha, 1 + self.alpha, 3)
        self.shift = self.R.uniform(-self.beta, self.beta, 3)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            rgb = convert_to_numpy(d[key], dtype=np.float32).transpose(1, 2, 0)
            stains = -np.log(np.clip(rgb, 1e-6, 1)) @ hed_from_rgb * self.scale + self.shift
            out = np.clip(np.exp(-stains @ rgb_from_hed), 0, 1).astype(np.float32).transpose(2, 0, 1)
            d[key] = convert_to_dst_type(out, d[key])[0]
        return d
