"""The synthetic demo dataset: GlaS-like tiles and masks, a pyramidal slide, and its datalist, from one seed."""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import atomic_output
from ..errors import DataError
from ..wsi.pyramid_tiff import write_pyramidal_tiff
from .adapters import from_mask_folder
from .render import CLASSES, check_size, make_slide_array, make_tile

logger = logging.getLogger(__name__)


def _save_png(path: Path, array: np.ndarray) -> None:
    with atomic_output(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def prepare_demo(
    output_dir: str | os.PathLike,
    n_train: int = 24,
    n_validation: int = 8,
    n_test: int = 8,
    tile_size: int = 256,
    seed: int = 0,
    slide_size: int = 4096,
    mpp: float = 0.5,
    patch_size: int = 128,
    stride: int = 64,
    min_fraction: float = 0.05,
    force: bool = False,
) -> str:
    """Write the synthetic demo dataset and its datalist; returns the datalist path.

    GlaS-like layout: ``images/NAME.png``, ``masks/NAME.png``, ``labels.csv`` (name, split), plus a
    pyramidal slide ``slide/demo_slide.tif`` (JPEG, mpp tags) and its label pyramid
    ``slide/demo_slide_mask.tif`` (255 = no tissue) for whole-slide inference. Same seed, same bytes.
    An existing datalist is kept unless ``force``.

    Args:
        output_dir: the folder the dataset is written to (created if missing).
        n_train: training tiles, at least 1.
        n_validation: validation tiles.
        n_test: test tiles.
        tile_size: tile side in pixels.
        seed: the seed every image is drawn from.
        slide_size: slide side in pixels at level 0.
        mpp: slide resolution in microns per pixel, written to its tags.
        patch_size: side in pixels of the datalist's patches, cut from each tile.
        stride: step in pixels between those patches.
        min_fraction: share of a patch, in [0, 1), a class must exceed for the patch to be tagged with it.
        force: regenerate even if ``datalist.json`` exists.

    Returns:
        The path of ``output_dir/datalist.json``.
    """
    output_dir = Path(output_dir)
    datalist = output_dir / "datalist.json"
    if datalist.exists() and not force:
        logger.info("%s exists; pass force=True to regenerate", datalist)
        return str(datalist)
    counts = {"training": n_train, "validation": n_validation, "test": n_test}
    if any(n < 0 for n in counts.values()) or n_train < 1:
        raise DataError(f"tile counts must be >= 0 with at least one training tile, got {counts}")
    check_size(tile_size, tile_size)
    check_size(slide_size, slide_size)
    if not mpp > 0 or not 0 <= min_fraction < 1 or patch_size < 1 or stride < 1:
        raise DataError(
            f"need mpp > 0, 0 <= min_fraction < 1 and positive patch_size and stride; got mpp={mpp}, "
            f"min_fraction={min_fraction}, patch_size={patch_size}, stride={stride}"
        )

    seeds = iter(np.random.SeedSequence(seed).spawn(sum(counts.values()) + 1))
    rows = []
    for split, count in counts.items():
        for i in range(count):
            name = f"{split}_{i:03d}"
            rgb, mask = make_tile(np.random.default_rng(next(seeds)), tile_size, tile_size)
            _save_png(output_dir / "images" / f"{name}.png", rgb)
            _save_png(output_dir / "masks" / f"{name}.png", mask)
            rows.append((name, split))
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([("name", "split"), *rows])
    with atomic_output(output_dir / "labels.csv") as tmp:
        tmp.write_text(text.getvalue())

    rgb, mask = make_slide_array(np.random.default_rng(next(seeds)), slide_size, slide_size)
    slide_dir = output_dir / "slide"
    description = f"synthetic H&E demo slide, seed {seed}; mask classes {', '.join(CLASSES)}, 255 = no tissue"
    write_pyramidal_tiff(slide_dir / "demo_slide.tif", rgb, mpp=mpp, description=description)
    write_pyramidal_tiff(slide_dir / "demo_slide_mask.tif", mask, mpp=mpp, compression="lzw", description=description)
    logger.info("%s: %d tiles and a %d px slide written", output_dir, len(rows), slide_size)
    return from_mask_folder(
        data_dir=str(output_dir),
        output=str(datalist),
        classes=CLASSES,
        patch_size=patch_size,
        stride=stride,
        min_fraction=min_fraction,
    )
