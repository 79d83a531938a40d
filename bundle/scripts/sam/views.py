"""The two views of a place that WSI-SAM looks at: the high-resolution (HR) view at the model's pixel size and the
low-resolution (LR) view with the same centre, twice the field of view at half the resolution.

A :class:`Window` says where a view lies on level 0 of its image (a slide or a tile) and at which pixel size; it is
the one place prompts move between level 0 and a view (:meth:`Window.to_view`), so an HR box reaches the LR frame as
``box / 2 + offset`` through level 0 whatever the view's shape or position. :class:`ImageSource` reads a window from a
slide (only the pyramid level and the region it needs) or from a tile, padding with white glass where the window
leaves the image: at a slide's border, or around a tile (a tile knows no surroundings).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import DataError
from ..images import read_rgb
from ..viewer import TILE_SUFFIXES
from ..wsi.reader import open_slide, pick_level, slide_mpp, to_level0

GLASS = 255  # the padding: what lies beyond a slide's or a tile's edge is read as empty glass


@dataclass(frozen=True)
class Window:
    """A view: its top-left corner ``origin`` (y, x) on level 0, level-0 pixels per view pixel ``downsample``, and its
    ``shape`` (h, w) in view pixels. View pixel i covers level-0 ``[origin + i * downsample, origin + (i + 1) *
    downsample)``."""

    origin: tuple[float, float]
    downsample: float
    shape: tuple[int, int]

    @classmethod
    def around(cls, centre, downsample: float, shape) -> Window:
        """The window of ``shape`` view pixels centred on level-0 point ``centre`` (y, x)."""
        half = np.asarray(shape, np.float64) * downsample / 2
        origin = tuple(float(v) for v in np.asarray(centre, np.float64) - half)
        return cls(origin, float(downsample), tuple(int(v) for v in shape))

    @property
    def centre(self) -> np.ndarray:
        return np.asarray(self.origin) + np.asarray(self.shape) * self.downsample / 2

    @property
    def extent(self) -> np.ndarray:
        """(y0, x0, y1, x1) on level 0, end exclusive."""
        return np.concatenate([self.origin, np.asarray(self.origin) + np.asarray(self.shape) * self.downsample])

    def context(self) -> Window:
        """The LR view of this (HR) view: same centre and shape, twice the downsample, so twice the field of view."""
        return Window.around(self.centre, 2 * self.downsample, self.shape)

    def to_view(self, coords) -> np.ndarray:
        """Level-0 (y, x) pixel indices -> this view's; the last axis holds points (2) or boxes (y0, x0, y1, x1) (4).
        Pixel centres map to pixel centres, as in :func:`scripts.sam.model.to_sam`."""
        c = np.asarray(coords, np.float64)
        pairs = c.reshape(*c.shape[:-1], c.shape[-1] // 2, 2)
        return ((pairs + 0.5 - self.origin) / self.downsample - 0.5).reshape(c.shape)

    def to_level0(self, coords) -> np.ndarray:
        """Inverse of :meth:`to_view`."""
        c = np.asarray(coords, np.float64)
        pairs = c.reshape(*c.shape[:-1], c.shape[-1] // 2, 2)
        return ((pairs + 0.5) * self.downsample + self.origin - 0.5).reshape(c.shape)


def map_prompts(coords, source: Window, target: Window) -> np.ndarray:
    """Points or boxes from one view's pixels to another's (HR -> LR: ``box / 2 + offset``)."""
    return target.to_view(source.to_level0(coords))


class ImageSource:
    """A slide or a tile, read window by window (see the module docstring). A tile is any image file
    :data:`scripts.viewer.TILE_SUFFIXES` names; anything else is opened as a slide.

    Args:
        path: the slide or tile.
        backend: slide reader, ``"cucim"`` (OpenSlide fallback) or ``"openslide"``.
        mpp: level 0's pixel size in um when the file records none (tiles record none).
    """

    def __init__(self, path: str | os.PathLike, backend: str = "cucim", mpp: float | None = None):
        self.path = os.fspath(path)
        self.is_tile = self.path.lower().endswith(TILE_SUFFIXES)
        if self.is_tile:
            self.tile, self.slide = read_rgb(self.path), None
            self.size = self.tile.shape[:2]
            self.mpp = mpp
        else:
            self.tile, self.slide = None, open_slide(self.path, backend)
            reader, wsi = self.slide
            self.size = tuple(int(v) for v in reader.get_size(wsi, 0))
            self.mpp = slide_mpp(self.path, reader, wsi) or mpp

    def downsample(self, mpp: float | None) -> float:
        """Level-0 pixels per view pixel at ``mpp`` um/px; 1 without a model pixel size or without the image's."""
        if mpp is None or self.mpp is None:
            return 1.0
        return mpp / self.mpp

    def read(self, window: Window) -> np.ndarray:
        """The window's pixels, (h, w, 3) uint8; where it leaves the image, :data:`GLASS`."""
        y0, x0, y1, x1 = window.extent
        if self.is_tile:
            level, ds = 0, 1.0
        else:
            level, ds = pick_level(*self.slide, window.downsample)
        # the window's extent at the read level, in whole pixels, and the part of it inside the image
        top, left = math.floor(y0 / ds + 1e-6), math.floor(x0 / ds + 1e-6)
        bottom, right = math.ceil(y1 / ds - 1e-6), math.ceil(x1 / ds - 1e-6)
        if self.is_tile:
            height, width = self.size
        else:
            height, width = (int(v) for v in self.slide[0].get_size(self.slide[1], level))
        canvas = np.full((bottom - top, right - left, 3), GLASS, np.uint8)
        ty, tx, by, bx = max(top, 0), max(left, 0), min(bottom, height), min(right, width)
        if by > ty and bx > tx:
            canvas[ty - top : by - top, tx - left : bx - left] = self._pixels(level, ds, ty, tx, by - ty, bx - tx)
        if canvas.shape[:2] == tuple(window.shape):
            return canvas
        resized = Image.fromarray(canvas).resize(
            window.shape[::-1], Image.Resampling.BOX
        )  # area average, as the pyramid levels
        return np.asarray(resized)

    def _pixels(self, level: int, ds: float, y: int, x: int, h: int, w: int) -> np.ndarray:
        if self.is_tile:
            return self.tile[y : y + h, x : x + w]
        reader, wsi = self.slide
        try:
            data, _ = reader.get_data(wsi, location=(to_level0(y, ds), to_level0(x, ds)), size=(h, w), level=level)
        except Exception as e:  # the backends raise ValueError, RuntimeError, OpenSlideError ...
            raise DataError(f"{self.path}: cannot read level {level} at ({y}, {x}) size ({h}, {w}) ({e})") from e
        return np.moveaxis(np.asarray(data, np.uint8)[:3], 0, -1)
