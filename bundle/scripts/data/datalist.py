"""The one datalist format every adapter writes and every stage reads (see DESIGN.md).

``{"classes": [...], "training": [...], "validation": [...], "test": [...]}``; an entry is
``{"image": path, "label": multi-hot, "mask": optional ground truth}`` plus ``location`` (y, x at level 0),
``size`` (h, w) and ``level`` for a patch of a larger image or slide. Paths are stored relative to the
datalist file so a dataset folder can be moved; :func:`monai.data.load_decathlon_datalist` resolves them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_output
from ..errors import DataError

SPLITS = ("training", "validation", "test")
PATH_KEYS = ("image", "mask", "pseudo")


def check_classes(classes: Sequence[str], source: str) -> list[str]:
    classes = [str(c).strip() for c in classes]
    if not classes:
        raise DataError(f"{source}: no classes given; a datalist needs at least one class name")
    if len(set(classes)) != len(classes) or "" in classes:
        raise DataError(f"{source}: class names must be unique and non-empty, got {classes}")
    return classes


def _relative(value: str, root: Path) -> str:
    return os.path.relpath(os.path.abspath(value), root)


def write_datalist(
    path: str | os.PathLike, classes: Sequence[str], splits: dict[str, Iterable[dict]], **extra
) -> dict:
    """Validate and atomically write a datalist; returns what was written (paths made relative).

    ``extra`` goes to the top level (e.g. ``mask_ignore_index`` for masks whose background is not a class).
    Nothing is written if any entry is invalid.
    """
    path = Path(path)
    classes = check_classes(classes, str(path))
    root = path.parent.resolve()
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise DataError(f"{path}: unknown split(s) {sorted(unknown)}; use {SPLITS}")
    data = {"classes": classes, **extra}
    for split in SPLITS:
        entries = []
        for entry in splits.get(split, ()):
            label = entry.get("label")
            if label is None or len(label) != len(classes) or any(v not in (0, 1) for v in label):
                raise DataError(
                    f"{entry.get('image')}: label {label} is not a multi-hot vector over the {len(classes)} classes {classes}"
                )
            out = {k: _relative(v, root) if k in PATH_KEYS else v for k, v in entry.items()}
            out["label"] = [int(v) for v in label]
            entries.append(out)
        data[split] = entries
    if not any(data[s] for s in SPLITS):
        raise DataError(f"{path}: no entries in any split; nothing to write")
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))
    return data


def read_classes(path: str | os.PathLike) -> list[str]:
    """Class names of a datalist, the single source of truth for the class count."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: datalist not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    return check_classes(data.get("classes", []), str(path))


def patch_grid(height: int, width: int, size: int, stride: int) -> list[tuple[int, int]]:
    """Top-left (y, x) of patches covering an image; the last row/column is shifted to end at the border
    so that no pixel is left out. An image smaller than a patch gives one patch at (0, 0)."""
    if size <= 0 or stride <= 0:
        raise DataError(f"patch size and stride must be positive, got size={size}, stride={stride}")

    def starts(n: int) -> list[int]:
        if n <= size:
            return [0]
        s = list(range(0, n - size + 1, stride))
        return s if s[-1] == n - size else [*s, n - size]

    return [(y, x) for y in starts(height) for x in starts(width)]


def patch_tags(
    mask: np.ndarray, locations: Sequence[tuple[int, int]], size: int, num_classes: int, min_fraction: float,
    ignore_index: int | None = None,
) -> np.ndarray:
    """Multi-hot tags per patch: class c is present when it covers more than ``min_fraction`` of the
    patch's labelled pixels (the OEEM protocol on GlaS uses 5 %). Pixels equal to ``ignore_index`` or
    outside ``[0, num_classes)`` do not count."""
    if not 0 <= min_fraction < 1:
        raise DataError(f"min_fraction must be in [0, 1), got {min_fraction}")
    onehot = np.stack([mask == c for c in range(num_classes)], axis=-1).astype(np.int64)
    valid = mask != ignore_index if ignore_index is not None else np.ones(mask.shape, bool)
    valid &= mask < num_classes
    integral = np.pad(np.cumsum(np.cumsum(onehot, 0), 1), ((1, 0), (1, 0), (0, 0)))
    tags = np.zeros((len(locations), num_classes), np.uint8)
    for i, (y, x) in enumerate(locations):
        y1, x1 = min(y + size, mask.shape[0]), min(x + size, mask.shape[1])
        counts = integral[y1, x1] - integral[y, x1] - integral[y1, x] + integral[y, x]
        total = valid[y:y1, x:x1].sum()
        if total:
            tags[i] = counts / total > min_fraction
    return tags
