"""What the pseudo-label stage reads and writes: its units of work (whole images), file names, and
``datalist_pseudo.json``.

The unit of work is a whole image: the patch entries of a tile are grouped and its tags are the union of theirs
(the image has a class if any of its patches has it). A slide-patch entry (``level``) is its own unit. Masks are
written per unit; the segmentation stage crops a tile's mask at each patch entry's ``location``.

Under ``output_dir``::

    cams/NAME.npy            uint8 (C, H, W): the first layer's CAM x 255 (tagged classes only), the prompts' source
    cam_layers/NAME_L.png    MLPS: CAM-only mask of layer L            -> "pseudo_layers"
    sam_iter0/NAME.png       CAM prompts into SAM as shipped
    sam_iterK/NAME.png       the same prompts after K rounds of decoder fine-tuning (the last one -> "pseudo")
    sam_decoder_iterK.pt     the mask decoder's state dict after round K
    multires_sam.pt          WSI-SAM's trained parts (``sam_refiner: multires``; its masks are round 1)
    datalist_pseudo.json

Every file is written atomically and a re-run skips what exists, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from monai.data import load_decathlon_datalist

from ..data.datalist import SPLITS, read_classes, write_datalist
from ..errors import DataError

logger = logging.getLogger(__name__)


def _unit_key(entry: dict) -> tuple:
    """Entries with the same key are one unit of work: a tile's patches, or one slide patch."""
    if "level" in entry:
        return (entry["image"], int(entry["level"]), *map(int, entry["location"]))
    return (entry["image"],)


def _units(entries: Sequence[dict]) -> dict[tuple, dict]:
    """Unit key -> ``{"image", "label" (union of the tags), "name"}`` plus ``location``/``size``/``level`` for a slide
    patch, in first-seen order. Names are file stems, made unique with a hash where two folders share one."""
    units: dict[tuple, dict] = {}
    for entry in entries:
        key = _unit_key(entry)
        if key not in units:
            stem = Path(entry["image"]).stem
            name = stem if len(key) == 1 else f"{stem}_l{key[1]}_y{key[2]}_x{key[3]}"
            keep = {k: entry[k] for k in ("location", "size", "level") if len(key) > 1}
            units[key] = {
                "image": entry["image"],
                "label": np.zeros(len(entry["label"]), np.uint8),
                "name": name,
                **keep,
            }
        units[key]["label"] |= np.asarray(entry["label"], np.uint8)
    counts: dict[str, int] = {}
    for unit in units.values():
        counts[unit["name"]] = counts.get(unit["name"], 0) + 1
    for key, unit in units.items():
        if counts[unit["name"]] > 1:
            unit["name"] += "_" + format(zlib.crc32(str(key).encode()), "08x")
        unit["label"] = unit["label"].tolist()
    return units


def pseudo_items(datalist: str | os.PathLike, split: str = "training") -> list[dict]:
    """The units of work of a datalist split (see the module docstring).

    Args:
        datalist: the datalist JSON.
        split: the split to pseudo-label.

    Returns:
        Per unit ``{"image", "label" (the union of its tags), "name" (a unique file stem)}``, plus
        ``location``/``size``/``level`` for a slide patch, in first-seen order.
    """
    entries = load_decathlon_datalist(str(datalist), False, split)
    if not entries:
        raise DataError(f"{datalist}: no '{split}' entries to pseudo-label")
    return list(_units(entries).values())


def patch_size(datalist: str | os.PathLike, split: str = "training") -> int | None:
    """The side of the square patches the classifier was trained on (the entries' ``size``), the CAM window for whole
    images; None when the entries are whole images (the classifier saw each one whole, resized).

    Args:
        datalist: the datalist JSON.
        split: the split the classifier was trained on.

    Returns:
        The patch side in pixels, or None.
    """
    sizes = {tuple(e["size"]) for e in load_decathlon_datalist(str(datalist), False, split) if "size" in e}
    if not sizes:
        return None
    if len(sizes) > 1 or any(h != w for h, w in sizes):
        raise DataError(
            f"{datalist}: '{split}' patches have sizes {sorted(sizes)}; set cam_window to the one the CAM saw"
        )
    return sizes.pop()[0]


@dataclass
class Outputs:
    """File names under ``output_dir`` (see the module docstring)."""

    root: Path

    def __post_init__(self):
        self.root = Path(self.root)

    def cam(self, name: str) -> Path:
        return self.root / "cams" / f"{name}.npy"

    def layer(self, name: str, layer: int) -> Path:
        return self.root / "cam_layers" / f"{name}_{layer}.png"

    def sam(self, name: str, iteration: int) -> Path:
        return self.root / f"sam_iter{iteration}" / f"{name}.png"

    def decoder(self, iteration: int) -> Path:
        return self.root / f"sam_decoder_iter{iteration}.pt"

    @property
    def datalist(self) -> Path:
        return self.root / "datalist_pseudo.json"

    def work_files(self) -> list[str]:
        """Glob patterns of everything the stage writes here, removed before a run from nothing; nothing else under
        ``root`` (a self-training round's folder, the user's files) is touched."""
        return [
            str(self.root / p)
            for p in (
                "cams",
                "cam_layers",
                "sam_iter*",
                "sam_decoder_iter*.pt",
                "multires_sam.pt",
                "datalist_pseudo.json",
            )
        ]


def write_pseudo_datalist(
    datalist: str | os.PathLike, output_dir: str | os.PathLike, iteration: int, num_layers: int
) -> Path:
    """``output_dir/datalist_pseudo.json``: the input datalist (classes, every split, top-level extras) whose training
    entries gain ``pseudo`` (the SAM mask of round ``iteration``) and ``pseudo_layers`` (the CAM-only masks),
    all paths relative to the new file. Refuses to point at a mask that was not written.

    Args:
        datalist: the input datalist JSON.
        output_dir: the stage's output folder, holding the masks; the new datalist is written there.
        iteration: the refinement round whose SAM masks become ``pseudo`` (0: the first pass's).
        num_layers: CAM layers, i.e. ``pseudo_layers`` masks per entry.

    Returns:
        The path of the written ``datalist_pseudo.json``.
    """
    out = Outputs(output_dir)
    return write_mask_datalist(
        datalist, out.datalist, lambda name: (out.sam(name, iteration), [out.layer(name, i) for i in range(num_layers)])
    )


def write_mask_datalist(
    datalist: str | os.PathLike, target: str | os.PathLike, masks: Callable[[str], tuple[Path, Sequence[Path]]]
) -> Path:
    """``target``: the input datalist (classes, every split, top-level extras) whose training entries gain ``pseudo``
    and ``pseudo_layers``, the files ``masks(unit name)`` gives, all paths relative to ``target``. Refuses to point at
    a mask that was not written. The one writer of ``datalist_pseudo.json`` for every source of pseudo-masks.

    Args:
        datalist: the input datalist JSON.
        target: the ``datalist_pseudo.json`` to write.
        masks: unit name (:func:`pseudo_items`) -> (its ``pseudo`` mask, its ``pseudo_layers`` masks).

    Returns:
        ``target`` as a Path.
    """
    target = Path(target)
    raw = json.loads(Path(datalist).read_text())
    splits = {s: load_decathlon_datalist(str(datalist), False, s) for s in SPLITS if raw.get(s)}
    names = {key: unit["name"] for key, unit in _units(splits.get("training", [])).items()}
    root = target.parent.resolve()
    for entry in splits["training"]:
        pseudo, layers = masks(names[_unit_key(entry)])
        missing = [str(p) for p in (pseudo, *layers) if not Path(p).exists()]
        if missing:
            raise DataError(
                f"{entry['image']}: pseudo-mask(s) {missing} missing; run the pseudo-label stage to the end"
            )
        entry["pseudo"] = str(pseudo)
        entry["pseudo_layers"] = [os.path.relpath(Path(p).resolve(), root) for p in layers]
    extra = {k: v for k, v in raw.items() if k not in ("classes", *SPLITS)}
    write_datalist(target, read_classes(datalist), splits, **extra)
    return target
