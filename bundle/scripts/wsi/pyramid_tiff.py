"""Tiled pyramidal TIFF writing that OpenSlide, cuCIM, QuPath and ASAP all open.

Layout: level 0, then 2x reduced levels as consecutive pages (``subfiletype=1``, not SubIFDs, which
OpenSlide's generic TIFF reader ignores), square tiles, resolution in pixels per centimetre. Tiles are
produced from a generator that reads bounded blocks of ``image``, so memory does not grow with image size
and ``image`` may be a NumPy array, a memmap or a zarr array.
"""

from __future__ import annotations

import os

import numpy as np
import tifffile

from ..atomic import atomic_output
from ..errors import DataError

COMPRESSIONS = ("jpeg", "zlib", "lzw")
READ_BLOCK = 1024  # level-0 pixels per side read at a time when building a reduced tile (~12 MB RGB as float32 x4)


def level_shapes(height: int, width: int, min_size: int) -> list[tuple[int, int]]:
    """Level 0, then halved (rounded up) levels until one's longest side is below ``min_size``."""
    shapes = [(height, width)]
    while max(shapes[-1]) >= min_size and max(shapes[-1]) > 1:
        h, w = shapes[-1]
        shapes.append((-(-h // 2), -(-w // 2)))
    return shapes


def _reduce(block: np.ndarray, factor: int, labels: bool) -> np.ndarray:
    """Labels take every ``factor``-th pixel (no invented classes); RGB averages each factor x factor area
    (a partial area at the image border averages the pixels it has)."""
    if factor == 1:
        return block
    if labels:
        return block[::factor, ::factor]
    starts_y, starts_x = np.arange(0, block.shape[0], factor), np.arange(0, block.shape[1], factor)
    sums = np.add.reduceat(np.add.reduceat(block.astype(np.float32), starts_y, 0), starts_x, 1)
    counts = np.outer(np.diff([*starts_y, block.shape[0]]), np.diff([*starts_x, block.shape[1]]))
    return np.rint(sums / counts.reshape(*counts.shape, *([1] * (block.ndim - 2)))).astype(np.uint8)


def _tiles(image, level: int, shape: tuple[int, int], tile: int, labels: bool):
    """Row-major tiles of one level, each built from level-0 blocks of at most READ_BLOCK pixels a side."""
    factor = 2**level
    height0, width0 = image.shape[:2]
    step = max(1, READ_BLOCK // factor)  # reduced pixels produced per block read
    for ty in range(0, shape[0], tile):
        for tx in range(0, shape[1], tile):
            th, tw = min(tile, shape[0] - ty), min(tile, shape[1] - tx)
            out = np.empty((th, tw, *image.shape[2:]), np.uint8)
            for by in range(0, th, step):
                for bx in range(0, tw, step):
                    y0, x0 = (ty + by) * factor, (tx + bx) * factor
                    y1 = min(y0 + min(step, th - by) * factor, height0)
                    x1 = min(x0 + min(step, tw - bx) * factor, width0)
                    reduced = _reduce(np.asarray(image[y0:y1, x0:x1]), factor, labels)
                    out[by : by + reduced.shape[0], bx : bx + reduced.shape[1]] = reduced
            if not labels and (th < tile or tw < tile):
                # repeat the edge rather than let tifffile pad with black, which JPEG would bleed inwards
                out = np.pad(out, ((0, tile - th), (0, tile - tw), (0, 0)), mode="edge")
            yield out


def write_pyramidal_tiff(
    path: str | os.PathLike,
    image,
    mpp: float | None = None,
    tile: int = 256,
    compression: str = "jpeg",
    min_size: int = 512,
    description: str | None = None,
    quality: int = 90,
) -> str:
    """Write ``image`` (H x W x 3 uint8 RGB, or H x W uint8 labels) as a tiled pyramid; returns the path.

    Label images need a lossless ``compression`` ("zlib" or "lzw"); their reduced levels take every 2nd
    pixel so that they hold only real class values. cuCIM cannot decode single-channel zlib tiles (OpenSlide,
    QuPath and tifffile can) but reads single-channel LZW. ``mpp`` (micrometres per level-0 pixel) goes
    into the resolution tags of every level; ``quality`` is the JPEG quality. Written atomically: a failure
    leaves no file.
    """
    shape, dtype = tuple(getattr(image, "shape", ())), np.dtype(getattr(image, "dtype", None))
    labels = len(shape) == 2
    if not (labels or (len(shape) == 3 and shape[2] == 3)) or dtype != np.uint8:
        raise DataError(f"{path}: image must be H x W x 3 or H x W uint8, got shape {shape} dtype {dtype}")
    if min(shape[:2]) < 1:
        raise DataError(f"{path}: image is empty (shape {shape})")
    if compression not in COMPRESSIONS:
        raise DataError(f"{path}: compression must be one of {COMPRESSIONS}, got {compression!r}")
    if compression == "jpeg" and labels:
        raise DataError(f"{path}: JPEG would alter label values; write label images with 'zlib' or 'lzw'")
    if tile < 16 or tile % 16:
        raise DataError(f"{path}: tile size must be a positive multiple of 16 (TIFF rule), got {tile}")
    if not 1 <= quality <= 100:
        raise DataError(f"{path}: JPEG quality must be in [1, 100], got {quality}")
    if min_size < 1:
        raise DataError(f"{path}: min_size must be positive, got {min_size}")
    if mpp is not None and not mpp > 0:
        raise DataError(f"{path}: mpp must be positive, got {mpp}")

    shapes = level_shapes(shape[0], shape[1], min_size)
    bigtiff = sum(h * w for h, w in shapes) * (1 if labels else 3) > 2**31
    with atomic_output(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
        for level, (h, w) in enumerate(shapes):
            options = {}
            if mpp is not None:
                per_cm = 1e4 / (mpp * 2**level)
                options = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(
                _tiles(image, level, (h, w), tile, labels),
                shape=(h, w) if labels else (h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="minisblack" if labels else "rgb",
                compression=compression,
                compressionargs={"level": quality} if compression == "jpeg" else None,
                subfiletype=1 if level else 0,
                description=description if level == 0 else None,
                metadata=None,
                **options,
            )
    return str(path)
