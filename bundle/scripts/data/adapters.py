"""Dataset adapters: each turns one on-disk layout into the datalist of :mod:`scripts.data.datalist`.

Command line: :mod:`scripts.data` (``PYTHONPATH=bundle python -m scripts.data glas --data_dir ... --output ...``).
"""

from __future__ import annotations

import csv
import difflib
import io
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..images import read_mask, read_rgb
from .datalist import SPLITS, check_classes, check_mask, parse_names, patch_grid, patch_tags, write_datalist

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
GLAS_CLASSES = ("non-gland", "gland")
LUAD_HISTOSEG_CLASSES = ("TE", "NEC", "LYM", "TAS")
BCSS_WSSS_CLASSES = ("TUM", "STR", "LYM", "NEC")
HISTOSEG_BACKGROUND = 4  # white background index in LUAD-HistoSeg / BCSS-WSSS masks: not a class, ignored


def read_csv_rows(path: Path, required: Sequence[str]) -> list[tuple[int, dict]]:
    """``(line number, row)`` pairs of a UTF-8 CSV (a byte-order mark is skipped; keys and values stripped).
    Non-UTF-8 bytes, a malformed file or missing columns are a :class:`DataError` naming the file (and line)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the CSV as UTF-8"
        ) from None
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        fields = [(c or "").strip() for c in reader.fieldnames or []]
        reader.fieldnames = fields
        rows = [
            (reader.line_num, {k: (v or "").strip() if isinstance(v, str) else "" for k, v in row.items() if k})
            for row in reader
        ]
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: cannot read the CSV ({e})") from None
    missing = [c for c in required if c not in fields]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected columns {list(required)}, found {fields}")
    if not rows:
        raise DataError(f"{path}: no rows after the header")
    return rows


def _no_duplicates(path: Path, rows: Sequence[tuple[int, dict]], column: str) -> None:
    first: dict[str, int] = {}
    for line, row in rows:
        if row[column] in first:
            raise DataError(
                f"{path}, line {line}: {column} {row[column]!r} is already listed on line {first[row[column]]}; "
                "remove the duplicate row"
            )
        first[row[column]] = line


def _find_image(folder: Path, name: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    raise DataError(f"{folder / name}: no image named {name} with a suffix in {IMAGE_SUFFIXES}")


def _tags_from_mask(mask: np.ndarray, num_classes: int, ignore_index: int | None) -> list[int]:
    return patch_tags(mask, [(0, 0)], max(mask.shape), num_classes, 0.0, ignore_index)[0].tolist()


def from_mask_folder(
    data_dir: str,
    output: str,
    classes: Sequence[str],
    patch_size: int = 112,
    stride: int = 56,
    min_fraction: float = 0.05,
    split_names: Mapping[str, str] | None = None,
    ignore_index: int | None = None,
) -> str:
    """``images/NAME.*`` + ``masks/NAME.png`` + ``labels.csv`` (columns ``name, split``) → patch entries.

    Each image is cut into ``patch_size`` patches with ``stride``; a patch is tagged with a class when that
    class covers more than ``min_fraction`` of it (the GlaS weak-label protocol). The mask is attached only
    as evaluation ground truth. ``split_names`` maps the CSV's split values to datalist splits. ``classes``: a list,
    ``a,b`` or ``'[a,b]'``. A mask value outside ``0..C-1`` (e.g. a mask saved as 0/255 or scaled by 100) is an
    error naming the mask, unless it is ``ignore_index`` (then written as the datalist's ``mask_ignore_index``).
    A name listed twice in ``labels.csv`` is an error.
    """
    data_dir = Path(data_dir)
    classes = check_classes(parse_names(classes, "classes"), "classes")
    if ignore_index is not None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or not 0 <= ignore_index <= 255:
            raise DataError(f"ignore_index: expected an integer 0-255, got {ignore_index!r}")
        if ignore_index < len(classes):
            raise DataError(f"ignore_index: {ignore_index} is a class index of {classes}; use one >= {len(classes)}")
    split_names = dict(split_names or {s: s for s in SPLITS})
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    csv_path = data_dir / "labels.csv"
    rows = read_csv_rows(csv_path, ("name", "split"))
    _no_duplicates(csv_path, rows, "name")
    for line, row in rows:
        if row["split"] not in split_names:
            raise DataError(
                f"{csv_path}, line {line}: {row['name']} has split {row['split']!r}, "
                f"expected one of {sorted(split_names)}"
            )
        image_path = _find_image(data_dir / "images", row["name"])
        mask_path = data_dir / "masks" / f"{row['name']}.png"
        image, mask = read_rgb(image_path), read_mask(mask_path)
        if image.shape[:2] != mask.shape:
            raise DataError(f"{mask_path}: mask size {mask.shape} differs from the image's {image.shape[:2]}")
        check_mask(mask_path, mask, classes, ignore_index)  # values outside the classes would vanish from the tags
        locations = patch_grid(*mask.shape, patch_size, stride)
        tags = patch_tags(mask, locations, patch_size, len(classes), min_fraction, ignore_index)
        size = [min(patch_size, mask.shape[0]), min(patch_size, mask.shape[1])]
        splits[split_names[row["split"]]] += [
            {"image": str(image_path), "mask": str(mask_path), "location": [y, x], "size": size, "label": t.tolist()}
            for (y, x), t in zip(locations, tags)
        ]
    extra = {} if ignore_index is None else {"mask_ignore_index": ignore_index}
    write_datalist(output, classes, splits, **extra)
    _log_summary(output, classes, splits)
    return str(output)


def glas(data_dir: str, output: str, patch_size: int = 112, stride: int = 56, min_fraction: float = 0.05) -> str:
    """GlaS as ``../shared/data/glas`` holds it (labels.csv split ``train``/``dev``/``test``); OEEM's protocol
    is 112-px patches with stride 56 and a 5 % tag threshold."""
    return from_mask_folder(
        data_dir,
        output,
        GLAS_CLASSES,
        patch_size,
        stride,
        min_fraction,
        split_names={"train": "training", "dev": "validation", "test": "test"},
    )


_TAG = re.compile(r"\[([01 ]+)\]$")


def _histoseg(data_dir: str, output: str, classes: Sequence[str]) -> str:
    """LUAD-HistoSeg / BCSS-WSSS: ``training/NAME[tags].png`` carries the tags in its name;
    ``val`` and ``test`` hold ``img/`` + palette ``mask/`` with index 4 = white background (ignored)."""
    data_dir = Path(data_dir)
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    train_dir = data_dir / "training"
    files = sorted(p for p in train_dir.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{train_dir}: no training images found")
    for path in files:
        match = _TAG.search(path.stem)
        if not match:
            raise DataError(f"{path}: name has no tag string like '[1 0 0 1]' or '[1001]' at its end")
        label = [int(c) for c in match.group(1).replace(" ", "")]
        if len(label) != len(classes):
            raise DataError(
                f"{path}: tag string has {len(label)} values, expected {len(classes)} for classes {list(classes)}"
            )
        read_rgb(path)
        splits["training"].append({"image": str(path), "label": label})
    for folder, split in (("val", "validation"), ("test", "test")):
        for path in sorted(p for p in (data_dir / folder / "img").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            mask_path = data_dir / folder / "mask" / f"{path.stem}.png"
            mask = read_mask(mask_path)
            if read_rgb(path).shape[:2] != mask.shape:
                raise DataError(f"{mask_path}: mask size {mask.shape} differs from its image's")
            check_mask(mask_path, mask, classes, HISTOSEG_BACKGROUND)
            label = _tags_from_mask(mask, len(classes), HISTOSEG_BACKGROUND)
            splits[split].append({"image": str(path), "mask": str(mask_path), "label": label})
    write_datalist(output, classes, splits, mask_ignore_index=HISTOSEG_BACKGROUND)
    _log_summary(output, classes, splits)
    return str(output)


def luad_histoseg(data_dir: str, output: str) -> str:
    """LUAD-HistoSeg (Han et al. 2022): names like ``NAME-[1 0 0 1].png``, classes TE, NEC, LYM, TAS."""
    return _histoseg(data_dir, output, LUAD_HISTOSEG_CLASSES)


def bcss_wsss(data_dir: str, output: str) -> str:
    """BCSS-WSSS (Han et al. 2022): names like ``NAME[1101].png``, classes TUM, STR, LYM, NEC."""
    return _histoseg(data_dir, output, BCSS_WSSS_CLASSES)


def _typo(csv_path: Path, names: Sequence[tuple[int, list[str]]]) -> None:
    """Refuse inferred class names that look like misspellings of one another ('tumour'/'tumor', 'Stroma'/'stroma')."""
    lines: dict[str, list[int]] = {}
    for line, tags in names:
        for n in tags:
            lines.setdefault(n, []).append(line)
    seen = sorted(lines)
    for i, a in enumerate(seen):
        for b in seen[i + 1 :]:
            if a.casefold() == b.casefold() or difflib.SequenceMatcher(None, a, b).ratio() >= 0.8:
                rare, common = sorted((a, b), key=lambda n: (len(lines[n]), n))
                raise DataError(
                    f"{csv_path}, line {lines[rare][0]}: label {rare!r} ({len(lines[rare])} row(s)) looks like a typo "
                    f"of {common!r} ({len(lines[common])} row(s)); fix it, or pass classes naming both if both are real"
                )


def from_csv(csv_path: str, output: str, classes: Sequence[str] | str | None = None) -> str:
    """Users' own tiles: a CSV with ``path`` (relative to the CSV) and ``labels`` (comma-separated class
    names), optional ``split`` (training/validation/test, default training) and ``mask`` (ground truth).

    Classes default to the sorted names seen; names that look like misspellings of one another are then refused
    (pass ``classes`` to confirm them). With ``classes`` given, a label not among them is an error. A mask may hold
    the class indices and 255 (unlabelled); other values are an error.
    """
    csv_path = Path(csv_path)
    rows = read_csv_rows(csv_path, ("path", "labels"))
    _no_duplicates(csv_path, rows, "path")
    names = [(line, [n.strip() for n in row["labels"].split(",") if n.strip()]) for line, row in rows]
    if classes is None:
        _typo(csv_path, names)
        classes = check_classes(sorted({n for _, tags in names for n in tags}), str(csv_path))
    else:
        classes = check_classes(parse_names(classes, "classes"), "classes")
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for (line, row), (_, tags) in zip(rows, names):
        where = f"{csv_path}, line {line}"
        if not tags:
            raise DataError(f"{where}: no labels for {row['path']}")
        unknown = [n for n in tags if n not in classes]
        if unknown:
            raise DataError(f"{where}: unknown class(es) {unknown}; classes are {classes} (add real ones to classes)")
        split = row.get("split") or "training"
        if split not in SPLITS:
            raise DataError(f"{where}: split {split!r} is not one of {SPLITS}")
        image = csv_path.parent / row["path"]
        entry = {"image": str(image), "label": [int(c in tags) for c in classes]}
        if row.get("mask"):
            entry["mask"] = str(csv_path.parent / row["mask"])
            mask = read_mask(entry["mask"])
            if mask.shape != read_rgb(image).shape[:2]:
                raise DataError(f"{entry['mask']}: mask size differs from its image {image}")
            check_mask(entry["mask"], mask, classes, allow_255=True, tagged=entry["label"], tagged_by=f"{where} is")
        else:
            read_rgb(image)
        splits[split].append(entry)
    write_datalist(output, classes, splits)
    _log_summary(output, classes, splits)
    return str(output)


def _log_summary(output, classes, splits) -> None:
    for split, entries in splits.items():
        if entries:
            frac = np.mean([e["label"] for e in entries], axis=0)
            tags = ", ".join(f"{c} {f:.1%}" for c, f in zip(classes, frac))
            logger.info("%s: %s %d entries; tagged with %s", output, split, len(entries), tags)
