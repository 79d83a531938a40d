"""Saving the tools' documentation figures: palette PNGs, as ``scripts.data.render.demo_figure`` saves the README's."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))

from scripts.atomic import atomic_output  # noqa: E402


def save_png(figure: Image.Image, path: str | os.PathLike, colors: int = 256) -> None:
    """Write ``figure`` to ``path`` as a ``colors``-colour palette PNG (median cut, no dithering, optimised),
    atomically, making the folder if needed."""
    with atomic_output(path) as tmp:
        figure.quantize(colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            tmp, format="PNG", optimize=True
        )
