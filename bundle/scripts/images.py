"""Reading tiles and masks with errors that name the file: every adapter and stage reads through here."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError


def _open(path: str | os.PathLike) -> Image.Image:
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        img = Image.open(path)
        img.load()
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
