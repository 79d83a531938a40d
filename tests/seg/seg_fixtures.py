"""Tiny synthetic data with FAKE pseudo-masks derived from the ground truth, for stage-3 workflow tests only: the real
pipeline gets its pseudo-masks from the pseudo-label stage and never uses ground truth for training."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from scripts.images import read_mask


def demo_with_pseudo_masks(demo: str) -> str:
    """The tiny demo (conftest's ``tiny_demo``) with a ``datalist_pseudo.json`` beside it whose training entries
    carry ``pseudo`` and three ``pseudo_layers``: the mask with 0, 4 and 8 border rows set to 255 (ignore).
    Returns its path."""
    datalist = Path(demo)
    root = datalist.parent
    data = json.loads(datalist.read_text())
    for entry in data["training"]:
        mask_path = root / entry["mask"]
        mask = read_mask(mask_path)
        layers = []
        for layer in range(3):
            path = root / "pseudo" / f"{mask_path.stem}_{layer}.png"
            if not path.exists():
                path.parent.mkdir(exist_ok=True)
                fake = mask.copy()
                fake[: 4 * layer] = 255
                Image.fromarray(fake).save(path)
            layers.append(str(path.relative_to(root)))
        entry["pseudo"], entry["pseudo_layers"] = layers[0], layers
    out = root / "datalist_pseudo.json"
    out.write_text(json.dumps(data))
    return str(out)


def validation_pixels(datalist: str) -> int:
    """Pixels of the distinct validation masks (whole images)."""
    root = Path(datalist).parent
    masks = {e["mask"] for e in json.loads(Path(datalist).read_text())["validation"]}
    return sum(np.count_nonzero(read_mask(root / m) < 255) for m in masks)
