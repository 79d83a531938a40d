"""Dataset adapter "slides + annotations": whole-slide images with slide-level labels or polygon annotations
become a datalist of tissue patches (``location`` (y, x) at level 0, ``size``, ``level``, multi-hot ``label``).

The slide list is a CSV beside the slides::

    slide,labels,annotation,split
    a.svs,"tumor,stroma",,training          # slide-level labels: every patch inherits them
    b.svs,,b.geojson,validation              # polygons (QuPath GeoJSON or ASAP XML): tags per patch

Locations are the patch's top-left corner; read them with ``PatchWSIDataset(..., center_location=False)``
(MONAI's default treats a location as the patch centre).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..wsi.reader import level_downsample, open_slide, slide_mpp, tissue_mask, to_level0
from .annotations import IGNORE, Polygon, rasterize, read_annotations
from .datalist import SPLITS, parse_names, patch_grid, patch_tags, write_datalist

log = logging.getLogger(__name__)

EXCLUDE = 254  # painted by groups mapped to "ignore"; becomes 255 after unannotated tissue got the background
IGNORE_NAMES = ("", "ignore", "exclude", "none", "null")
SPLIT_ALIASES = {"train": "training", "val": "validation", "valid": "validation", "testing": "test"}


def _names(value, what: str) -> list[str] | None:
    """A list of names from a list/tuple or a comma-separated string (the command line gives either)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{what}: expected a list of names or a comma-separated string, got {value!r}")
    return [str(v).strip() for v in value if str(v).strip()]


def _group_map(value) -> dict[str, str | None]:
    """``{"annotation group": "class" | None}``; a JSON string or ``"a=b,c=ignore"`` is accepted too."""
    if value is None:
        return {}
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"group_map: not valid JSON ({e})") from e
        else:
            pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise DataError(f"group_map: expected 'group=class,...' or a JSON object, got {value!r}")
            value = {k.strip(): v.strip() for k, v in pairs}
    if not isinstance(value, Mapping):
        raise DataError(f"group_map: expected a mapping from annotation group to class, got {value!r}")
    return {
        str(k): None if v is None or str(v).strip().lower() in IGNORE_NAMES else str(v).strip()
        for k, v in value.items()
    }


def _read_slide_list(slide_list: Path, group_map: dict) -> list[dict]:
    """Rows of the slide list with paths resolved and annotations parsed (cheap; slides are opened later)."""
    if not slide_list.is_file():
        raise DataError(f"{slide_list}: slide list not found")
    try:
        with open(slide_list, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, skipinitialspace=True)
            fields = [c.strip() for c in reader.fieldnames or []]
            reader.fieldnames = fields
            rows = [(reader.line_num, row) for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{slide_list}: cannot read the CSV ({e})") from e
    if "slide" not in fields or not ({"labels", "annotation"} & set(fields)):
        raise DataError(
            f"{slide_list}: needs a 'slide' column and a 'labels' and/or 'annotation' column; found {fields}"
        )
    root = slide_list.parent
    out = []
    for line, row in rows:
        where = f"{slide_list} row {line}"
        slide = (row.get("slide") or "").strip()
        if not slide:
            raise DataError(f"{where}: empty 'slide'")
        labels = _names(row.get("labels") or "", where)
        annotation = (row.get("annotation") or "").strip()
        if labels and annotation:
            raise DataError(f"{where}: give either 'labels' or 'annotation' for a slide, not both")
        if not labels and not annotation:
            raise DataError(f"{where}: no 'labels' and no 'annotation' for {slide}")
        split = (row.get("split") or "").strip().lower() or "training"
        split = SPLIT_ALIASES.get(split, split)
        if split not in SPLITS:
            raise DataError(f"{where}: unknown split {row.get('split')!r}; use one of {SPLITS}")
        path = (root / slide).resolve() if not os.path.isabs(slide) else Path(slide)
        if not path.is_file():
            raise DataError(f"{where}: slide file not found: {path}")
        twice = next((o["where"] for o in out if o["slide"] == path), None)
        if twice:
            raise DataError(f"{where}: slide {slide} is already listed ({twice}); a slide appears once")
        entry = {"where": where, "csv": slide_list, "slide": path, "split": split, "labels": labels, "polygons": None}
        if annotation:
            ann = (root / annotation).resolve() if not os.path.isabs(annotation) else Path(annotation)
            polygons = []
            for p in read_annotations(ann):
                name = group_map.get(p.class_name, p.class_name) if group_map else p.class_name
                polygons.append(Polygon(name if name is not None else "", p.exterior, p.holes))
            entry["polygons"], entry["annotation"] = polygons, ann
        out.append(entry)
    if not out:
        raise DataError(f"{slide_list}: no slides listed")
    return out


def _check_extent(item: dict, width0: int, height0: int) -> None:
    """Refuse annotations that cannot be level-0 pixels of this slide: a polygon wholly outside the slide, or every
    polygon smaller than a pixel (coordinates in another CRS, e.g. lon/lat degrees, or in micrometres/another level)."""
    polygons = item["polygons"]
    if not polygons:
        return
    lo = np.array([p.exterior.min(0) for p in polygons])
    hi = np.array([p.exterior.max(0) for p in polygons])
    span = f"x {lo[:, 0].min():g}..{hi[:, 0].max():g}, y {lo[:, 1].min():g}..{hi[:, 1].max():g}"
    slide = f"the slide {item['slide'].name} ({width0} x {height0} px at level 0)"
    outside = (hi[:, 0] < 0) | (hi[:, 1] < 0) | (lo[:, 0] > width0) | (lo[:, 1] > height0)
    if outside.any():
        raise DataError(
            f"{item['annotation']}: {int(outside.sum())} of {len(polygons)} polygon(s) lie outside {slide}; the "
            f"annotations span {span}: coordinates must be level-0 pixels of this slide (wrong slide, or another "
            f"CRS such as lon/lat?)"
        )
    if ((hi - lo).max(1) < 1).all():
        raise DataError(
            f"{item['annotation']}: every polygon is smaller than one pixel of {slide} (they span {span}); "
            "coordinates must be level-0 pixels, not lon/lat degrees or millimetres"
        )


def _tissue_on_grid(mask: np.ndarray, mask_ds: float, shape: tuple[int, int], ds: float) -> np.ndarray:
    """The tissue mask resampled (nearest, by pixel centre) onto a grid of ``shape`` at downsample ``ds``."""
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * ds / mask_ds).astype(int), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * ds / mask_ds).astype(int), mask.shape[1] - 1)
    return mask[np.ix_(rows, cols)]


def _slide_patches(
    item: dict,
    class_index: dict,
    classes: list[str],
    patch_size: int,
    level: int,
    stride: int,
    min_fraction: float,
    min_tissue: float,
    background_class: str | None,
    backend: str,
    mask_downsample: float,
) -> list[dict]:
    path = item["slide"]
    t0 = time.perf_counter()
    reader, wsi = open_slide(path, backend)
    levels = reader.get_level_count(wsi)
    if level >= levels:
        raise DataError(f"{path}: level {level} requested but the slide has {levels} level(s) (0-{levels - 1})")
    mask, mask_ds = tissue_mask(reader, wsi, mask_downsample)
    if not mask.any():
        raise DataError(
            f"{path}: no tissue found (the tissue mask at downsample {mask_ds:g} is empty); "
            f"remove the slide from {item['csv']}"
        )
    height0, width0 = (int(v) for v in reader.get_size(wsi, 0))
    if item["polygons"] is not None:
        _check_extent(item, width0, height0)
    ds = level_downsample(reader, wsi, level)
    grid = patch_grid(*(int(v) for v in reader.get_size(wsi, level)), patch_size, stride)

    # a grid on which a patch is exactly k x k cells, no coarser than the tissue mask
    extent0 = patch_size * ds
    k = max(1, math.ceil(extent0 / mask_ds - 1e-6))
    cell = extent0 / k
    shape = (math.ceil(height0 / cell), math.ceil(width0 / cell))
    tissue = _tissue_on_grid(mask, mask_ds, shape, cell)
    loc0 = [(to_level0(y, ds), to_level0(x, ds)) for y, x in grid]
    cells = [(min(round(y / cell), shape[0] - 1), min(round(x / cell), shape[1] - 1)) for y, x in loc0]
    integral = np.pad(tissue.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    keep = []
    for i, (r, c) in enumerate(cells):
        r1, c1 = min(r + k, shape[0]), min(c + k, shape[1])
        inside = integral[r1, c1] - integral[r, c1] - integral[r1, c] + integral[r, c]
        if inside >= min_tissue * (r1 - r) * (c1 - c) and inside > 0:
            keep.append(i)

    num = len(classes)
    dropped = 0
    if item["polygons"] is None:
        onehot = np.zeros(num, np.uint8)
        onehot[[class_index[n] for n in item["labels"]]] = 1
        tags = np.repeat(onehot[None], len(keep), 0)
    else:
        label = rasterize(item["polygons"], class_index, shape, cell)
        if background_class is not None:
            label[(label == IGNORE) & tissue] = class_index[background_class]
        label[(label == EXCLUDE) | ~tissue] = IGNORE
        tags = patch_tags(label, [cells[i] for i in keep], k, num, min_fraction, ignore_index=IGNORE)
        annotated = tags.any(1)
        dropped = int((~annotated).sum())
        keep = [i for i, a in zip(keep, annotated) if a]
        tags = tags[annotated]
    entries = [
        {
            "image": str(path),
            "location": [int(loc0[i][0]), int(loc0[i][1])],
            "size": [patch_size, patch_size],
            "level": level,
            "label": [int(v) for v in t],
        }
        for i, t in zip(keep, tags)
    ]
    if not entries:
        hint = " and the annotation" if item["polygons"] is not None else ""
        log.warning("%s: no patch kept (check min_tissue%s)", path, hint)
    mpp = slide_mpp(path, reader, wsi)
    log.info(
        "%s: %d patches of %d on the grid (level %d, %d px, tissue >= %.0f%%%s); mpp %s; %.1f s",
        path.name,
        len(entries),
        len(grid),
        level,
        patch_size,
        100 * min_tissue,
        f", {dropped} without annotated tissue dropped" if item["polygons"] is not None else "",
        f"{mpp:g}" if mpp else "not recorded",
        time.perf_counter() - t0,
    )
    return entries


def from_slides(
    slide_list: str,
    output: str,
    classes: Sequence[str] | str | None = None,
    patch_size: int = 224,
    level: int = 0,
    stride: int | None = None,
    min_fraction: float = 0.05,
    min_tissue: float = 0.5,
    background_class: str | None = None,
    backend: str = "cucim",
    group_map: Mapping[str, str | None] | str | None = None,
    mask_downsample: float = 32,
) -> str:
    """Write a patch datalist for the slides listed in ``slide_list`` (a CSV; paths relative to it).

    Columns: ``slide``; ``labels`` (comma-separated class names, quoted) or ``annotation`` (a QuPath
    ``.geojson``/``.json`` or ASAP ``.xml`` file); optional ``split`` (training/validation/test, default
    training). Patches of ``patch_size`` at ``level`` on a grid with ``stride`` (default: no overlap) are
    kept where the tissue mask covers at least ``min_tissue`` of them. A slide-level label tags every patch;
    with polygons a patch is tagged with each class covering more than ``min_fraction`` of its annotated
    tissue, tissue outside every polygon counting as ``background_class`` when given (e.g. ``normal`` for
    CAMELYON); patches without annotated tissue are dropped. ``group_map`` renames annotation groups
    (``{"_0": "tumor", "_1": "tumor", "_2": "ignore"}``: ``ignore``/``None`` marks exclusion regions).
    ``classes`` defaults to the sorted union of names seen. Nothing is written if any slide fails.
    Returns the datalist written.
    """
    t0 = time.perf_counter()
    slide_list = Path(slide_list)
    patch_size = int(patch_size)
    stride = int(stride) if stride is not None else patch_size
    level = int(level)
    if patch_size <= 0 or stride <= 0 or level < 0:
        raise DataError(f"patch_size and stride must be positive and level >= 0, got {patch_size}, {stride}, {level}")
    if not 0 <= float(min_tissue) <= 1 or not 0 <= float(min_fraction) < 1:
        raise DataError(f"min_tissue must be in [0, 1] and min_fraction in [0, 1), got {min_tissue}, {min_fraction}")
    if backend not in ("cucim", "openslide"):
        raise DataError(f"unknown slide backend {backend!r}; use 'cucim' or 'openslide'")
    gmap = _group_map(group_map)
    items = _read_slide_list(slide_list, gmap)

    given = parse_names(classes, "classes")
    if given is not None:
        given_set = set(given)
        for item in items:
            names = item["labels"] or [p.class_name for p in item["polygons"] if p.class_name]
            unknown = sorted(set(names) - given_set)
            if unknown:
                src = f" (annotation {item['annotation']})" if item["polygons"] is not None else ""
                raise DataError(f"{item['where']}{src}: unknown class(es) {unknown}; the classes are {given}")
        if background_class is not None and background_class not in given_set:
            raise DataError(f"background_class {background_class!r} is not one of the classes {given}")
        classes = given
    else:
        seen = {n for item in items for n in (item["labels"] or [p.class_name for p in item["polygons"]]) if n}
        if background_class is not None:
            seen.add(background_class)
        classes = sorted(seen)
    if len(classes) >= EXCLUDE:
        raise DataError(f"{slide_list}: {len(classes)} classes; at most {EXCLUDE - 1} are supported")
    class_index = {c: i for i, c in enumerate(classes)}
    class_index[""] = EXCLUDE  # groups mapped to "ignore"

    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for item in items:
        splits[item["split"]].extend(
            _slide_patches(
                item,
                class_index,
                list(classes),
                patch_size,
                level,
                stride,
                float(min_fraction),
                float(min_tissue),
                background_class,
                backend,
                float(mask_downsample),
            )
        )
    for split in SPLITS:
        listed = [item for item in items if item["split"] == split]
        if listed and not splits[split]:
            raise DataError(
                f"{slide_list}: the {split} split's {len(listed)} slide(s) gave no patch (first: {listed[0]['where']}, "
                f"{listed[0]['slide'].name}); check min_tissue, the annotations and background_class"
            )
    data = write_datalist(output, classes, splits)
    log.info(
        "%s: %s patches from %d slides in %.1f s",
        output,
        ", ".join(f"{len(data[s])} {s}" for s in SPLITS),
        len(items),
        time.perf_counter() - t0,
    )
    return str(output)
