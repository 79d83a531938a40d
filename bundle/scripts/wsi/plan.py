"""Phase 1 of whole-slide inference, the plan: which pixels the network sees and which of them are worth reading.

The inference grid is the pyramid level nearest to the model's ``mpp`` (resampled from the next finer level when
none is within ``mpp_tolerance``), cut into tiles a whole number of window strides wide (:func:`tiling`). Each tile is
read with a margin of (roi - stride) / 2, so the windows of all tiles lie on one global sliding-window grid: no window
is computed twice, and no output pixel lies at a window's outer edge. Only tiles that touch the low-resolution tissue
mask are listed (:func:`plan_slide`); :class:`TileDataset` reads them, with the tissue mask as a fourth channel.

Plain tiles (PNG/JPEG) go through the same code as one-level slides; they record no pixel size and are taken to be at
the model's ``mpp``. The tissue decision for small images is described at :func:`debris_size`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from ..errors import DataError
from ..images import read_rgb
from .reader import level_downsample, open_slide, pick_level, tissue_mask, to_level0
from .reader import slide_mpp as recorded_mpp

TILE_SUFFIXES = (".png", ".jpg", ".jpeg")
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
DEBRIS_PX0 = 128 * 128  # tissue-mask objects below this many level-0 pixels are debris (mask_from_rgb's default)


# ------------------------------------------------------------------------------------------ plain tiles


class _Tile:
    """A plain RGB tile in memory, with what :class:`_TileReader` needs."""

    def __init__(self, path: str):
        self.path, self.rgb = path, read_rgb(path)


class _TileReader:
    """The :class:`monai.data.WSIReader` calls used here, on a one-level in-memory tile: tiles take the slide code."""

    def get_level_count(self, wsi) -> int:
        return 1

    def get_size(self, wsi, level: int) -> tuple[int, int]:
        return wsi.rgb.shape[:2]

    def get_file_path(self, wsi) -> str:
        return wsi.path

    def get_data(self, wsi, location, size, level=0):
        (y, x), (h, w) = location, size
        return np.moveaxis(wsi.rgb[y : y + h, x : x + w], -1, 0), {}


def open_input(path: str, backend: str = "cucim"):
    """``(reader, wsi)`` for a slide (:func:`scripts.wsi.open_slide`) or a plain tile."""
    if path.lower().endswith(TILE_SUFFIXES):
        return _TileReader(), _Tile(path)
    return open_slide(path, backend)


# --------------------------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Grid:
    """The pixel grid the network sees: ``downsample`` of level 0, read from pyramid ``level`` (``level_downsample``)
    and resampled when the two differ; ``mpp`` in micrometres per grid pixel (None when unknown)."""

    level: int
    level_downsample: float
    downsample: float
    height: int
    width: int
    mpp: float | None

    @property
    def scale(self) -> float:
        """Level pixels per grid pixel (1 when a level matches the model's mpp)."""
        return self.downsample / self.level_downsample


def choose_grid(reader, wsi, slide_mpp: float | None, model_mpp: float | None, tolerance: float = 0.1) -> Grid:
    """The pyramid level whose pixel size is nearest (in ratio) to ``model_mpp``, used as is when within
    ``tolerance``; otherwise the model's pixel size, resampled from the finest level not coarser than it (level 0,
    upsampled, when the slide is coarser than the model). ``model_mpp=None``: level 0 as it is."""
    if model_mpp is not None and slide_mpp is None:
        raise DataError("no slide pixel size")  # the caller names the file and the way out
    height0, width0 = (int(v) for v in reader.get_size(wsi, 0))
    target = 1.0 if model_mpp is None else model_mpp / slide_mpp
    downsamples = [level_downsample(reader, wsi, level) for level in range(reader.get_level_count(wsi))]
    nearest = min(range(len(downsamples)), key=lambda level: abs(math.log(downsamples[level] / target)))
    if abs(downsamples[nearest] / target - 1) <= tolerance:
        level, level_ds, downsample = nearest, downsamples[nearest], downsamples[nearest]
        height, width = (int(v) for v in reader.get_size(wsi, level))
    else:
        level, level_ds = pick_level(reader, wsi, target)
        downsample = target
        height, width = max(1, round(height0 / target)), max(1, round(width0 / target))
    return Grid(level, level_ds, downsample, height, width, None if slide_mpp is None else slide_mpp * downsample)


def _rgb(array) -> np.ndarray:
    """H x W x 3 uint8 from the reader's channel-first data (grey levels repeated, alpha dropped: MONAI's reader
    already composites RGBA)."""
    array = np.asarray(array)
    array = np.repeat(array[:1], 3, 0) if array.shape[0] < 3 else array[:3]
    return np.moveaxis(array, 0, -1).astype(np.uint8, copy=False)


def read_region(reader, wsi, grid: Grid, y: int, x: int, size: int) -> np.ndarray:
    """Grid pixels ``[y, y + size) x [x, x + size)`` as size x size x 3 uint8; outside the slide the edge repeats.
    Resampled regions are read from the grid's level and resized with antialiasing (within a level pixel)."""
    level_h, level_w = (int(v) for v in reader.get_size(wsi, grid.level))
    s = grid.scale
    y0, x0 = math.floor(y * s), math.floor(x * s)
    y1, x1 = max(y0 + 1, math.ceil((y + size) * s)), max(x0 + 1, math.ceil((x + size) * s))
    cy0, cx0 = min(max(y0, 0), level_h - 1), min(max(x0, 0), level_w - 1)
    cy1, cx1 = max(min(y1, level_h), cy0 + 1), max(min(x1, level_w), cx0 + 1)
    location = (to_level0(cy0, grid.level_downsample), to_level0(cx0, grid.level_downsample))
    try:
        data, _ = reader.get_data(wsi, location=location, size=(cy1 - cy0, cx1 - cx0), level=grid.level)
    except Exception as e:  # the backends raise ValueError, RuntimeError, OpenSlideError ...
        raise DataError(
            f"{reader.get_file_path(wsi)}: cannot decode level {grid.level} at rows {cy0}-{cy1} ({e})"
        ) from e
    rgb = _rgb(data)
    pad = ((max(0, cy0 - y0), max(0, y1 - cy1)), (max(0, cx0 - x0), max(0, x1 - cx1)), (0, 0))
    rgb = np.pad(rgb, pad, mode="edge")[: y1 - y0, : x1 - x0]
    if rgb.shape[:2] != (size, size):
        chw = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float()[None]
        chw = torch.nn.functional.interpolate(
            chw, size=(size, size), mode="bilinear", antialias=s > 1, align_corners=False
        )
        rgb = chw[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return rgb


def _mask_indices(start: int, count: int, limit: int, grid_ds: float, mask_ds: float, mask_len: int):
    """Mask row (or column) of each grid pixel in ``[start, start + count)``, and whether it lies on the slide."""
    pixels = np.arange(start, start + count)
    index = np.clip((pixels * grid_ds / mask_ds).astype(np.int64), 0, mask_len - 1)
    return index, (pixels >= 0) & (pixels < limit)


@dataclass
class Plan:
    """One slide made ready: its grid, tissue mask and the tiles (core top-left, grid pixels) that touch tissue."""

    path: str
    reader: object
    wsi: object
    slide_mpp: float | None
    grid: Grid
    mask: np.ndarray
    mask_downsample: float
    tile: int
    margin: int
    tiles: list = field(default_factory=list)
    total_tiles: int = 0


# ------------------------------------------------------------------------------------------- the tiling


def tiling(roi_size, overlap, tile_size: int, prob_downsample: int) -> tuple[int, int, int]:
    """How slides are cut into tiles whose windows all lie on one global sliding-window grid.

    Args:
        roi_size: the sliding-window inferer's window size; square (one value, or equal values per axis).
        overlap: the inferer's window overlap (one value, or equal values per axis).
        tile_size: the wanted tile side in grid pixels; rounded to the nearest whole number of tiling units.
        prob_downsample: the probability map's reduction factor; tiles are a whole number of it, so no reduced pixel
            straddles two tiles.

    Returns:
        ``(roi, margin, tile)``: the window side, the margin read around each tile ((roi - stride) / 2) and the tile
        side, a whole number of both the window stride and ``prob_downsample``.
    """
    roi, overlap = np.atleast_1d(roi_size), np.atleast_1d(overlap)
    if len(set(roi.tolist())) != 1 or len(set(overlap.tolist())) != 1:
        raise DataError(f"whole-slide inference needs a square roi_size and one overlap, got {roi}, {overlap}")
    roi = int(roi[0])
    stride = max(1, int(roi * (1 - float(overlap[0]))))  # MONAI's scan interval
    unit = math.lcm(stride, prob_downsample)
    return roi, (roi - stride) // 2, unit * max(1, round(tile_size / unit))


def debris_size(height0: int, width0: int) -> float:
    """The size (level-0 pixels) below which a tissue-mask object is dropped as debris, for a ``height0 x width0``
    slide or tile: :data:`DEBRIS_PX0`, but at most a sixteenth of the image.

    The tissue mask (:func:`scripts.wsi.reader.mask_from_rgb`) drops objects under 128 x 128 level-0 pixels: on a
    slide those are dust and specks. An image smaller than that (a 64-256 px PNG tile) holds no object that large,
    so all of it was "no tissue", whatever it showed. The decision stays the mask's, at full resolution (images up to
    1024 px are masked at their own resolution), with the same colour thresholds -- a glass-only or grey tile is still
    no tissue -- but an object is debris only when it is also under a sixteenth of the image (a 64 px tile: under
    16 x 16 px). Images of 512 x 512 pixels or more are unchanged.
    """
    return min(float(DEBRIS_PX0), height0 * width0 / 16)


def plan_slide(
    path: str,
    *,
    tile: int,
    margin: int,
    model_mpp: float | None,
    slide_mpp: float | None,
    mpp_tolerance: float,
    backend: str,
) -> Plan:
    """Open a slide or tile, choose its grid, compute its tissue mask (dropping debris under :func:`debris_size`) and
    list the tiles that touch tissue.

    Args:
        path: a slide (any :class:`monai.data.WSIReader` format) or a PNG/JPEG tile.
        tile: tile side in grid pixels (from :func:`tiling`).
        margin: the margin read around each tile (from :func:`tiling`).
        model_mpp: the model's pixel size in micrometres (None: level 0 as it is).
        slide_mpp: the pixel size of a slide that records none (a recorded one wins; tiles default to ``model_mpp``).
        mpp_tolerance: a pyramid level within this ratio of ``model_mpp`` is used as it is (see :func:`choose_grid`).
        backend: the slide reader's backend (``"cucim"`` or ``"openslide"``).

    Returns:
        The :class:`Plan`, its tiles in row-major order.
    """
    reader, wsi = open_input(path, backend)
    is_tile = isinstance(wsi, _Tile)
    mpp = recorded_mpp(path, reader, wsi) if not is_tile else None
    mpp = mpp or slide_mpp or (model_mpp if is_tile else None)
    if model_mpp is not None and mpp is None:
        raise DataError(
            f"{path}: the slide records no pixel size (mpp), needed to infer at the model's "
            f"{model_mpp} um/px; state it with --slide_mpp <um per level-0 pixel>, or pass --mpp '$None' "
            "to infer at level 0 as it is"
        )
    grid = choose_grid(reader, wsi, mpp, model_mpp, mpp_tolerance)
    height0, width0 = (int(v) for v in reader.get_size(wsi, 0))
    mask, mask_ds = tissue_mask(
        reader, wsi, min(32.0, max(1.0, max(height0, width0) / 1024)), min_object_px0=debris_size(height0, width0)
    )
    plan = Plan(path, reader, wsi, mpp, grid, mask, mask_ds, tile, margin)
    for ty in range(0, grid.height, tile):
        for tx in range(0, grid.width, tile):
            plan.total_tiles += 1
            r0, c0 = (int(v * grid.downsample / mask_ds) for v in (ty, tx))
            r1 = math.ceil(min(ty + tile, grid.height) * grid.downsample / mask_ds)
            c1 = math.ceil(min(tx + tile, grid.width) * grid.downsample / mask_ds)
            if mask[r0 : max(r1, r0 + 1), c0 : max(c1, c0 + 1)].any():
                plan.tiles.append((ty, tx))
    return plan


# -------------------------------------------------------------------------------------- reading the tiles


class TileDataset(torch.utils.data.Dataset):
    """A tissue tile with its margin: 4 x S x S uint8 (RGB and the tissue mask as 0/1), read in the worker process
    (each opens the slide once)."""

    def __init__(self, plan: Plan, backend: str):
        self.opener = partial(open_input, plan.path, backend)
        self.grid, self.mask, self.mask_ds = plan.grid, plan.mask, plan.mask_downsample
        self.tiles, self.size, self.margin = plan.tiles, plan.tile + 2 * plan.margin, plan.margin
        self._slide, self._pid = (plan.reader, plan.wsi), os.getpid()

    def __len__(self) -> int:
        return len(self.tiles)

    def __getstate__(self) -> dict:  # spawned workers open their own handle
        return {**self.__dict__, "_slide": None, "_pid": None}

    def __getitem__(self, index: int) -> dict:
        if self._pid != os.getpid():  # a worker: its own handle (cuCIM and OpenSlide handles are per process)
            self._slide, self._pid = self.opener(), os.getpid()
        y, x = self.tiles[index][0] - self.margin, self.tiles[index][1] - self.margin
        rgb = read_region(*self._slide, self.grid, y, x, self.size)
        grid, (mask_h, mask_w) = self.grid, self.mask.shape
        rows, row_ok = _mask_indices(y, self.size, grid.height, grid.downsample, self.mask_ds, mask_h)
        cols, col_ok = _mask_indices(x, self.size, grid.width, grid.downsample, self.mask_ds, mask_w)
        tissue = self.mask[rows[:, None], cols[None, :]] & row_ok[:, None] & col_ok[None, :]
        image = np.concatenate([rgb.transpose(2, 0, 1), tissue[None].astype(np.uint8)])
        return {"image": torch.from_numpy(np.ascontiguousarray(image)), "tile": index}
