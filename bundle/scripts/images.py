"""Reading tiles and masks with errors that name the file: every adapter and stage reads through here.

Decompression bombs: an image with more than :data:`MAX_IMAGE_PIXELS` pixels is refused before it is decoded
(PIL checks the header's size). The limit is set here, for the whole process, instead of PIL's default (89.5 M
pixels, which only warns up to twice that); larger images are slides, read tile by tile through ``scripts.wsi``.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError

MAX_IMAGE_PIXELS = 16384 * 16384  # 268 M pixels (805 MB as RGB): far above any tile, far below a slide
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# PIL only warns between the limit and twice the limit: refuse there too (set once: catch_warnings is not thread-safe)
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def _too_large(path, pixels: int | None, limit: int) -> DataError:
    size = f"{pixels:,} pixels, " if pixels else ""
    return DataError(
        f"{path}: image too large ({size}over the limit of {limit:,} pixels, scripts.images.MAX_IMAGE_PIXELS: "
        "a decompression-bomb guard); cut it into tiles or read it as a slide"
    )


def _open(path: str | os.PathLike) -> Image.Image:
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        img = Image.open(path)  # reads the header only: the size is known before anything is decoded
        if limit and img.size[0] * img.size[1] > limit:
            img.close()
            raise _too_large(path, img.size[0] * img.size[1], limit)
        img.load()
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        pixels = next((int(w.strip("(")) for w in str(e).split() if w.strip("(").isdigit()), None)
        raise _too_large(path, pixels, limit) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read the image ({e})") from e
    return img


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """H x W x 3 uint8. Grayscale and palette images are expanded, RGBA is composited on white
    (slide exports put transparent pixels where there is no tissue)."""
    img = _open(path)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    elif img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        raise DataError(f"{path}: {img.mode} (16/32-bit) images are not H&E RGB; convert to 8-bit RGB")
    return np.asarray(img.convert("RGB"))


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """H x W uint8 class indices. Palette PNGs keep their indices (LUAD-HistoSeg/BCSS masks are palette images)."""
    img = _open(path)
    if img.mode not in ("L", "P", "1"):
        raise DataError(f"{path}: a mask must be a single-channel index image (mode L or P), got mode {img.mode}")
    return np.asarray(img if img.mode != "1" else img.convert("L"), dtype=np.uint8)
