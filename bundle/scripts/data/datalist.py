"""The one datalist format every adapter writes and every stage reads (see DESIGN.md).

``{"classes": [...], "training": [...], "validation": [...], "test": [...]}``; an entry is
``{"image": path, "label": multi-hot, "mask": optional ground truth}`` plus ``location`` (y, x at level 0),
``size`` (h, w) and ``level`` for a patch of a larger image or slide. Paths are stored relative to the
datalist file so a dataset folder can be moved; :func:`monai.data.load_decathlon_datalist` resolves them.

:func:`validate_datalist` checks a datalist's shape before a stage's first epoch (cheap: no file is opened);
:func:`check_mask_values` reads every ground-truth mask of a split once and checks its values against the classes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from functools import reduce
from pathlib import Path

import numpy as np

from ..atomic import atomic_output
from ..constants import IGNORE
from ..errors import DataError
from ..images import read_mask

SPLITS = ("training", "validation", "test")
PATH_KEYS = ("image", "mask", "pseudo")


def parse_names(value, setting: str = "classes") -> list[str] | None:
    """Class names as a user gives them: a list/tuple, a comma-separated string (``tumor,stroma``) or a JSON/Python
    list string (``'["tumor","stroma"]'``, ``'[non-gland,gland]'``: the command line passes what it cannot parse
    as a string). A single bare name is refused: iterating it would give one class per character, and a lone name
    is more often a forgotten comma than a one-class dataset (write ``tumor,`` or ``'[tumor]'`` for that)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                parsed = [n.strip().strip("'\"") for n in text[1:-1].split(",")]
            if not isinstance(parsed, list):
                raise DataError(f"{setting}: expected a list of names, got {value!r}")
            value = [n for n in parsed if not isinstance(n, str) or n.strip()]
        elif "," in text:
            value = [n.strip() for n in text.split(",") if n.strip()]
        else:
            raise DataError(
                f"{setting}: got the single name {value!r}, not a list; give the names as a list: "
                f"{setting}=a,b or '[\"a\", \"b\"]' (one class: '{text},')"
            )
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{setting}: expected a list of names or a comma-separated string, got {value!r}")
    bad = [v for v in value if isinstance(v, bool) or not isinstance(v, (str, int))]
    if bad:
        raise DataError(f"{setting}: names must be strings, got {bad[0]!r} in {list(value)}")
    return [str(v).strip() for v in value]


def check_classes(classes, source: str) -> list[str]:
    """A clean class list (see :func:`parse_names` for what a string may be); ``source`` names the file or setting."""
    if isinstance(classes, str):
        classes = parse_names(classes, "classes")
    if not isinstance(classes, (list, tuple)):
        raise DataError(f"{source}: 'classes' must be a list of names, got {classes!r}")
    if any(isinstance(c, bool) or not isinstance(c, (str, int)) for c in classes):
        raise DataError(f"{source}: class names must be strings, got {list(classes)}")
    classes = [str(c).strip() for c in classes]
    if not classes:
        raise DataError(f"{source}: no classes given; a datalist needs at least one class name")
    if len(set(classes)) != len(classes) or "" in classes:
        raise DataError(f"{source}: class names must be unique and non-empty, got {classes}")
    if len(classes) >= IGNORE:
        raise DataError(f"{source}: {len(classes)} classes; at most {IGNORE - 1} fit a uint8 mask beside {IGNORE}")
    return classes


def _relative(value: str, root: Path) -> str:
    return os.path.relpath(os.path.abspath(value), root)


def _patch_key(entry: dict) -> tuple:
    """What makes two entries the same sample: the image and, for a patch, its location, size and level."""

    def tup(v):
        return tuple(v) if isinstance(v, list) else v

    return (os.path.normpath(entry["image"]), tup(entry.get("location")), tup(entry.get("size")), entry.get("level"))


def _check_entries(source: str, data: dict) -> None:
    """Label shape and values, entry fields, duplicates within a split and images shared by two splits."""
    classes = data["classes"]
    first_split = {}  # image -> (split, index)
    for split in SPLITS:
        entries = data.get(split, [])
        if not isinstance(entries, list):
            raise DataError(f"{source}: '{split}' must be a list of entries, got {type(entries).__name__}")
        seen: dict[tuple, int] = {}
        for i, entry in enumerate(entries):
            where = f"{source}: {split}[{i}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry["image"]:
                raise DataError(f"{where}: an entry must be an object with an 'image' path, got {entry!r:.80}")
            label = entry.get("label")
            if (
                not isinstance(label, list)
                or len(label) != len(classes)
                or any(not isinstance(v, (int, float)) or v not in (0, 1) for v in label)
            ):
                raise DataError(
                    f"{where} ({entry['image']}): label {label} is not a multi-hot vector of 0/1 over the "
                    f"{len(classes)} classes {classes}"
                )
            for key, low in (("location", 0), ("size", 1)):
                v = entry.get(key)
                if v is not None and (
                    not isinstance(v, list)
                    or len(v) != 2
                    or any(isinstance(c, bool) or not isinstance(c, int) or c < low for c in v)
                ):
                    raise DataError(f"{where} ({entry['image']}): '{key}' must be two integers >= {low}, got {v!r}")
            for key in ("mask", "pseudo"):
                if key in entry and (not isinstance(entry[key], str) or not entry[key]):
                    raise DataError(f"{where} ({entry['image']}): '{key}' must be a path, got {entry[key]!r}")
            key = _patch_key(entry)
            if key in seen:
                patch = f" at location {entry.get('location')}, size {entry.get('size')}" if key[1] else ""
                raise DataError(
                    f"{source}: {split} entries {seen[key]} and {i} are the same sample ({entry['image']}{patch}); "
                    "remove the duplicate (a row listed twice?)"
                )
            seen[key] = i
            image = key[0]
            other = first_split.get(image)
            if other and other[0] != split:
                raise DataError(
                    f"{source}: image {entry['image']} is in both {other[0]} (entry {other[1]}) and {split} "
                    f"(entry {i}); an image in two splits leaks between them"
                )
            first_split.setdefault(image, (split, i))


def write_datalist(path: str | os.PathLike, classes: Sequence[str], splits: dict[str, Iterable[dict]], **extra) -> dict:
    """Validate and atomically write a datalist; returns what was written (paths made relative).

    ``extra`` goes to the top level (e.g. ``mask_ignore_index`` for masks whose background is not a class).
    Nothing is written if any entry is invalid (see :func:`validate_datalist` for the checks).
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
                    f"{entry.get('image')}: label {label} is not a multi-hot vector of 0/1 over the "
                    f"{len(classes)} classes {classes}"
                )
            out = {k: _relative(v, root) if k in PATH_KEYS else v for k, v in entry.items()}
            out["label"] = [int(v) for v in label]
            entries.append(out)
        data[split] = entries
    if not any(data[s] for s in SPLITS):
        raise DataError(f"{path}: no entries in any split; nothing to write")
    _check_entries(str(path), data)
    try:
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(data, indent=1))
    except OSError as e:  # unwritable folder, disk full: name the datalist, not the temporary file
        raise DataError(f"{path}: cannot write the datalist ({e.strerror or e})") from e
    return data


def _load(path: str | os.PathLike) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: datalist not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a datalist file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with 'classes' and splits, got a {type(data).__name__}")
    return data


def read_classes(path: str | os.PathLike) -> list[str]:
    """Class names of a datalist, the single source of truth for the class count.

    Args:
        path: the datalist JSON.

    Returns:
        Its ``classes``, checked: at least one, unique, non-empty strings.
    """
    data = _load(path)
    if "classes" not in data:
        raise DataError(f"{path}: no 'classes' list; a datalist names its classes")
    if not isinstance(data["classes"], list):  # a string would be read one class per character
        raise DataError(f"{path}: 'classes' must be a list of strings, got {data['classes']!r:.120}")
    return check_classes(data["classes"], str(path))


def validate_datalist(path: str | os.PathLike, require: Sequence[str] = ("training",)) -> dict:
    """Check a datalist before a stage's first epoch; returns its content. Cheap: no image or mask is opened.

    Refused, with one line naming the file: no/empty/duplicate/non-string class names; an entry without an image,
    a label that is not a list of ``len(classes)`` values each 0 or 1 (a tag 2 is refused), a malformed
    ``location``/``size``; a split in ``require`` (e.g. ``("training", "validation")``) that is missing or empty;
    the same sample (image, location, size, level) twice in a split; the same image in two splits (a leak);
    a ``mask_ignore_index`` that is not an integer 0-255. Mask values: :func:`check_mask_values`.

    Args:
        path: the datalist JSON.
        require: splits (of ``training``, ``validation``, ``test``) that must be present and non-empty.

    Returns:
        The datalist's content, with its ``classes`` cleaned (names stripped).
    """
    data = _load(path)
    source = str(path)
    if "classes" not in data:
        raise DataError(f"{source}: no 'classes' list; a datalist names its classes")
    classes = data["classes"]
    if not isinstance(classes, list) or any(not isinstance(c, str) for c in classes):
        raise DataError(f"{source}: 'classes' must be a list of strings, got {classes!r:.120}")
    data["classes"] = check_classes(classes, source)
    unknown = [s for s in require if s not in SPLITS]
    if unknown:
        raise DataError(f"require: unknown split(s) {unknown}; use {SPLITS}")
    ignore = data.get("mask_ignore_index")
    if ignore is not None and (isinstance(ignore, bool) or not isinstance(ignore, int) or not 0 <= ignore <= 255):
        raise DataError(f"{source}: mask_ignore_index must be an integer 0-255, got {ignore!r}")
    _check_entries(source, data)
    for split in require:
        if not data.get(split):
            raise DataError(
                f"{source}: the {split} split is {'missing' if split not in data else 'empty'}; "
                f"this stage needs {' and '.join(require)} entries"
            )
    return data


# ------------------------------------------------------------------------------------------------- masks


def mask_value_problem(values: Iterable[int], classes: Sequence[str], allowed: Iterable[int] = ()) -> str | None:
    """What is wrong with a mask holding ``values`` for ``classes`` (valid: ``0..C-1`` and ``allowed``), else None.

    The message names the bad values and the classes, and the likely cause: a mask of 0 and 255 for two classes
    was "saved as 0/255"; values that are all multiples of k of valid indices were scaled by k (e.g. x 100)."""
    num = len(classes)
    allowed = set(allowed)
    values = sorted(int(v) for v in values)
    bad = [v for v in values if not (0 <= v < num or v in allowed)]
    if not bad:
        return None
    extra = f" or {sorted(allowed)} (ignored)" if allowed else ""
    shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
    message = f"mask values [{shown}] are outside the classes 0..{num - 1} {list(classes)}{extra}"
    nonzero = [v for v in values if v and v not in allowed]
    scale = reduce(math.gcd, nonzero) if nonzero else 1
    if scale >= 10 and all(v // scale < num for v in nonzero):
        if set(values) - allowed <= {0, 255} and num == 2:
            message += "; it looks saved as 0/255: save class indices 0/1 (mask // 255)"
        else:
            message += f"; the values look scaled by {scale}: save class indices (mask // {scale})"
    elif 255 in bad:
        message += "; if 255 marks unlabelled pixels, declare it (ignore_index=255 / mask_ignore_index)"
    return message


def check_mask(
    path,
    mask: np.ndarray,
    classes: Sequence[str],
    ignore_index: int | None = None,
    allow_255: bool = False,
    tagged: Sequence[int] | None = None,
    tagged_by: str = "its entries",
) -> np.ndarray:
    """Refuse a mask with values outside ``0..C-1`` (+ ``ignore_index``, + 255 when ``allow_255``); returns the
    per-value pixel counts. With ``tagged`` (the classes its entries are tagged with) and 255 allowed but not
    declared, a mask holding 255 and no pixel of a tagged class is refused too: it was saved as 0/255."""
    counts = np.bincount(np.asarray(mask, np.uint8).ravel(), minlength=256)
    allowed = ({ignore_index} if ignore_index is not None else set()) | ({IGNORE} if allow_255 else set())
    problem = mask_value_problem(np.flatnonzero(counts), classes, allowed)
    if problem:
        raise DataError(f"{path}: {problem}")
    if tagged is not None and allow_255 and ignore_index != IGNORE and counts[IGNORE]:
        missing = [c for c, t, n in zip(classes, tagged, counts) if t and not n]
        if missing:
            raise DataError(
                f"{path}: holds 255 but no pixel of {missing}, which {tagged_by} tagged with; it looks saved as "
                f"0/255: save class indices 0..{len(classes) - 1} (or declare mask_ignore_index=255)"
            )
    return counts


def check_mask_values(datalist: str | os.PathLike, split: str) -> int:
    """Read every distinct ground-truth mask of ``split`` once and check its values; returns how many were read.

    Valid values: the class indices ``0..C-1``, the datalist's ``mask_ignore_index`` and 255 (ignored by the metrics).
    Values outside them are an error naming the mask, the values and the classes (the metrics would silently drop
    those pixels), as is a mask that holds 255 but none of a class its entries are tagged with (saved as 0/255).

    Args:
        datalist: the datalist JSON; relative mask paths are relative to its folder.
        split: the split whose masks are read: ``training``, ``validation`` or ``test``.

    Returns:
        The number of distinct masks read (0 when the split has no masks).
    """
    if split not in SPLITS:
        raise DataError(f"split: unknown split {split!r}; use {SPLITS}")
    data = validate_datalist(datalist, require=())
    classes = data["classes"]
    root = Path(datalist).parent
    tagged: dict[str, np.ndarray] = {}
    for entry in data.get(split, []):
        if "mask" in entry:
            label = np.asarray(entry["label"], bool)
            tagged[entry["mask"]] = tagged[entry["mask"]] | label if entry["mask"] in tagged else label
    for mask_name, tags in tagged.items():
        path = Path(mask_name) if os.path.isabs(mask_name) else root / mask_name
        check_mask(
            path,
            read_mask(path),
            classes,
            data.get("mask_ignore_index"),
            allow_255=True,
            tagged=tags,
            tagged_by=f"its {split} entries in {datalist} are",
        )
    return len(tagged)


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
    mask: np.ndarray,
    locations: Sequence[tuple[int, int]],
    size: int,
    num_classes: int,
    min_fraction: float,
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
