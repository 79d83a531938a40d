"""Whole-slide access in one place: opening a slide with a clear error, its pixel size, and a tissue mask.

Slides are read through MONAI's :class:`monai.data.WSIReader` (cuCIM by default, OpenSlide as fallback).
Before a backend sees a TIFF we check it with tifffile, because the backends report bad files badly:
a truncated file gives "Cannot load" or a short-read error from deep inside the decoder, and a plain strip
TIFF (not tiled, not a pyramid) is either refused by OpenSlide as "unsupported" or, with cuCIM, decoded as
one huge strip for every patch.

Measured quirks (cuCIM 26.10, OpenSlide 4.0.1, MONAI 1.6.1):

- ``WSIReader.get_mpp`` with cuCIM returns (1.0, 1.0) for a file that records no pixel size (e.g. a TCGA
  slide whose Aperio header has no ``MPP``); with OpenSlide it raises. :func:`slide_mpp` returns ``None``.
- Both backends decode the JPEG tiles of CMU-1-Small-Region.svs bit-identically; the tissue mask is still
  computed on block averages with a histogram-binned threshold so that a one-level difference in a decoder
  does not move it.
"""

from __future__ import annotations

import logging
import math
import os
import re

import numpy as np
from scipy import ndimage
from skimage.morphology import remove_small_objects

from ..errors import DataError

log = logging.getLogger(__name__)

BACKENDS = ("cucim", "openslide")
CONVERT_HINT = "vips tiffsave in.tif out.tif --tile --pyramid --compression jpeg"


# ----------------------------------------------------------------------------------------------- opening


def _check_tiff(path: str) -> None:
    """Refuse a TIFF (checked by its magic bytes before) that is corrupt, truncated or not tiled."""
    import tifffile

    size = os.path.getsize(path)
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.pages:
                raise DataError(f"{path}: the TIFF has no image pages (corrupt or truncated file)")
            first = tif.pages.first
            ndpi = tif.is_ndpi  # NDPI level 0 is one restart-marker JPEG that OpenSlide reads tile-wise
            end = 0
            for page in tif.pages:
                offsets, counts = page.dataoffsets, page.databytecounts
                if len(offsets):
                    end = max(end, int(np.max(np.asarray(offsets, np.int64) + np.asarray(counts, np.int64))))
            tiled = first.is_tiled
            shape = (first.imagelength, first.imagewidth)
    except DataError:
        raise
    except Exception as e:  # TiffFileError, struct.error, OSError, ValueError, ... from a damaged header
        raise DataError(f"{path}: cannot read the slide, the TIFF structure is corrupt or truncated ({e})") from e
    if end > size:
        raise DataError(
            f"{path}: truncated slide file: image data reaches byte {end} but the file has only {size} bytes "
            "(an interrupted copy or download?)"
        )
    if not tiled and not ndpi:
        raise DataError(
            f"{path}: not a tiled/pyramidal slide (level 0, {shape[1]} x {shape[0]} px, is stored in strips); "
            f"whole-slide readers need a tiled TIFF. Convert it, e.g. `{CONVERT_HINT}` "
            "(or, for an image this small, use the folder + CSV adapter)"
        )


def _is_tiff(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def open_slide(path: str | os.PathLike, backend: str = "cucim"):
    """Open a whole-slide image; returns ``(reader, wsi)`` for :class:`monai.data.WSIReader` calls.

    ``backend`` is ``"cucim"`` (default) or ``"openslide"``. If cuCIM is not installed, or cannot open a
    file that OpenSlide can (a non-TIFF vendor format), OpenSlide is used with a warning.
    Raises :class:`DataError` naming the file for a missing, corrupt, truncated or non-tiled slide.
    """
    from monai.data import WSIReader

    path = os.fspath(path)
    if backend not in BACKENDS:
        raise DataError(f"unknown slide backend {backend!r}; use one of {BACKENDS}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: slide file not found")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: slide file is empty")
    if _is_tiff(path):
        _check_tiff(path)
    errors = []
    order = [backend] + [b for b in BACKENDS if b != backend]
    for name in order:
        try:
            reader = WSIReader(backend=name)
        except (ImportError, ModuleNotFoundError, RuntimeError) as e:  # backend package missing
            errors.append(f"{name}: not available ({e})")
            continue
        try:
            wsi = reader.read(path)
        except Exception as e:  # the backends raise ValueError, RuntimeError, OpenSlideError, ...
            errors.append(f"{name}: {type(e).__name__}: {e}")
            continue
        if name != backend:
            log.warning("%s: backend %s failed (%s); using %s", path, backend, errors[0], name)
        try:
            if reader.get_level_count(wsi) < 1 or min(reader.get_size(wsi, 0)) < 1:
                raise DataError(f"{path}: the slide has no image data")
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{path}: cannot read the slide's levels ({e})") from e
        return reader, wsi
    raise DataError(
        f"{path}: cannot open the slide (unsupported format, corrupt or truncated file): " + "; ".join(errors)
    )


def slide_path(reader, wsi) -> str:
    try:
        return str(reader.get_file_path(wsi))
    except Exception:
        return "<slide>"


# ------------------------------------------------------------------------------------------ pixel size


def _valid(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and 0 < v < 1000 else None


def _mpp_openslide(path: str, wsi=None) -> float | None:
    try:
        import openslide

        slide = wsi if isinstance(wsi, openslide.OpenSlide) else openslide.OpenSlide(path)
    except Exception:
        return None
    return _valid(slide.properties.get("openslide.mpp-x"))


def _mpp_tifffile(path: str) -> float | None:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            desc = page.description or ""
            if tif.is_svs:
                m = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", desc)
                return _valid(m.group(1)) if m else None
            if tif.is_ome:
                m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata or "")
                u = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata or "")
                scale = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "mm": 1e3}.get(u.group(1) if u else "µm")
                return _valid(float(m.group(1)) * scale) if m and scale else None
            tags = page.tags
            if "XResolution" not in tags or "ResolutionUnit" not in tags:
                return None
            unit = int(tags["ResolutionUnit"].value)
            num, den = tags["XResolution"].value
            per_unit = num / den if den else 0  # pixels per unit
            microns = {2: 25400.0, 3: 10000.0}.get(unit)
            return _valid(microns / per_unit) if microns and per_unit > 0 else None
    except Exception:
        return None


def slide_mpp(path: str | os.PathLike, reader=None, wsi=None) -> float | None:
    """Microns per pixel at level 0 (x direction), or ``None`` when the file records none.

    Uses OpenSlide's ``openslide.mpp-x`` (it knows the vendor formats) and falls back to the TIFF tags
    (Aperio ``MPP``, OME ``PhysicalSizeX``, ``XResolution`` in inch or centimetre). cuCIM's own answer is
    not trusted: it reports 1.0 for files without a recorded pixel size.
    """
    path = os.fspath(path)
    mpp = _mpp_openslide(path, wsi)
    if mpp is None and _is_tiff(path):
        mpp = _mpp_tifffile(path)
    return mpp


# ------------------------------------------------------------------------------------------ tissue mask


def level_downsample(reader, wsi, level: int) -> float:
    """Downsample of ``level`` from the level sizes (mean of the two axes, as OpenSlide defines it).

    Computed here rather than asked from the backend: cuCIM reports it in float32 and OpenSlide in float64,
    and patch coordinates rounded from the two would differ."""
    if level == 0:
        return 1.0
    h0, w0 = reader.get_size(wsi, 0)
    h, w = reader.get_size(wsi, level)
    return (h0 / h + w0 / w) / 2


def pick_level(reader, wsi, target_downsample: float) -> tuple[int, float]:
    """The level whose downsample is closest to, but not above, ``target_downsample`` (level 0 at worst)."""
    best, best_ds = 0, 1.0
    for level in range(reader.get_level_count(wsi)):
        ds = level_downsample(reader, wsi, level)
        if ds <= target_downsample * 1.001 and ds >= best_ds:
            best, best_ds = level, ds
    return best, best_ds


def to_level0(v: int, ds: float) -> int:
    """Level-0 coordinate of level pixel ``v``. Rounded up: cuCIM floors ``location / downsample`` (so this
    lands exactly on ``v``) and OpenSlide resamples at the fractional position (less than a pixel off)."""
    return int(math.ceil(v * ds - 1e-6))


def read_lowres(reader, wsi, target_downsample: float = 32, block: int = 4096) -> tuple[np.ndarray, float]:
    """An RGB thumbnail (H x W x 3 float32, 0-255) at about ``target_downsample``, and its exact downsample.

    Reads the pyramid level closest to the target from below, in blocks of about ``block`` pixels (a
    block edge inside a level whose downsample is not an integer is where cuCIM and OpenSlide may differ
    by a fraction of a pixel; a level that fits one block is read exactly), and
    shrinks it further by an integer factor with area averaging; memory stays bounded for a slide with a
    single huge level. Pixel (i, j) of the result covers level-0 rows ``[i*d, (i+1)*d)`` with ``d`` the
    returned downsample (partial blocks at the right/bottom border are averaged over what exists).
    """
    if target_downsample < 1:
        raise DataError(f"target_downsample must be >= 1, got {target_downsample}")
    name = slide_path(reader, wsi)
    level, ds = pick_level(reader, wsi, target_downsample)
    factor = max(1, int(target_downsample / ds + 0.01))
    height, width = (int(v) for v in reader.get_size(wsi, level))
    step = factor * max(1, block // factor)
    out_h, out_w = -(-height // factor), -(-width // factor)
    out = np.zeros((out_h, out_w, 3), np.float32)
    for y in range(0, height, step):
        for x in range(0, width, step):
            h, w = min(step, height - y), min(step, width - x)
            try:
                data, _ = reader.get_data(wsi, location=(to_level0(y, ds), to_level0(x, ds)), size=(h, w), level=level)
            except Exception as e:
                raise DataError(f"{name}: cannot decode the slide at level {level}, rows {y}-{y + h} ({e})") from e
            arr = np.asarray(data)
            if arr.ndim != 3 or arr.shape[0] < 3:
                raise DataError(f"{name}: expected an RGB slide, got pixel data of shape {arr.shape}")
            arr = np.moveaxis(arr[:3], 0, -1).astype(np.float32)
            bh, bw = -(-h // factor), -(-w // factor)
            if factor > 1:
                pad = np.zeros((bh * factor, bw * factor, 3), np.float32)
                pad[:h, :w] = arr
                sums = pad.reshape(bh, factor, bw, factor, 3).sum((1, 3))
                cy = np.minimum(factor, h - np.arange(bh) * factor)
                cx = np.minimum(factor, w - np.arange(bw) * factor)
                arr = sums / (cy[:, None] * cx[None, :])[..., None]
            out[y // factor : y // factor + bh, x // factor : x // factor + bw] = arr
    return out, ds * factor


def _fill_small_holes(mask: np.ndarray, max_size: int) -> np.ndarray:
    """Like skimage's ``remove_small_holes`` but background touching the border is never a hole:
    skimage would fill a small slide's whole background, or a white margin, as a "hole"."""
    labels, n = ndimage.label(~mask)
    if n == 0:
        return mask
    fill = np.bincount(labels.ravel()) <= max_size
    fill[0] = False
    fill[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = False
    return mask | fill[labels]


def mask_from_rgb(
    rgb: np.ndarray,
    downsample: float = 1.0,
    min_saturation: float = 0.05,
    max_saturation: float = 0.25,
    white: float = 220,
    black: float = 40,
    min_object_px0: float = 128 * 128,
    max_hole_px0: float = 512 * 512,
) -> np.ndarray:
    """Tissue = saturated, neither near-white nor near-black, on a low-resolution RGB image (0-255).

    The saturation threshold is Otsu's on a fixed 256-bin histogram over [0, 1] (so a tiny change in the
    decoded pixels cannot move it), clipped to ``[min_saturation, max_saturation]``: the lower bound keeps
    JPEG noise on an empty slide out, the upper bound keeps pale tissue when the slide is nearly all tissue.
    Objects up to ``min_object_px0`` level-0 pixels are removed and holes up to ``max_hole_px0`` filled.
    """
    rgb = np.asarray(rgb, np.float32)
    mx, mn = rgb.max(-1), rgb.min(-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)  # HSV saturation
    hist, _ = np.histogram(sat, bins=256, range=(0.0, 1.0))
    thr = min_saturation
    if hist.sum() and np.count_nonzero(hist) > 1:
        from skimage.filters import threshold_otsu

        thr = float(threshold_otsu(hist=(hist, (np.arange(256) + 0.5) / 256)))
    thr = float(np.clip(thr, min_saturation, max_saturation))
    mask = (sat > thr) & (mn <= white) & (mx >= black)
    area = downsample * downsample
    mask = remove_small_objects(mask, max_size=int(min_object_px0 / area))
    return _fill_small_holes(mask, int(max_hole_px0 / area))


def tissue_mask(reader, wsi, target_downsample: float = 32, **kwargs) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of a slide at about ``target_downsample`` and its exact downsample.

    Pixel (i, j) covers level-0 rows ``[i*d, (i+1)*d)`` and columns ``[j*d, (j+1)*d)``. An empty mask is
    returned as is (the caller decides); ``kwargs`` go to :func:`mask_from_rgb`.
    """
    rgb, ds = read_lowres(reader, wsi, target_downsample)
    return mask_from_rgb(rgb, ds, **kwargs), ds
