"""Datalist views for stage 3: the held-back images for model selection, pseudo-mask layers as loader keys, and
whole images for evaluation. Plain functions over :func:`monai.data.load_decathlon_datalist` entries."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from monai.data import Dataset

from ..errors import DataError


def hold_out(entries: Sequence[dict], fraction: float = 0.1) -> tuple[list[dict], list[dict]]:
    """(kept, held back): about ``fraction`` of the images, with all their patches, held back from training.

    Images are ranked by a hash of their file name, so the split is the same on every run and machine and does not
    depend on entry order; at least one image is held back when ``fraction`` > 0 and there are two or more. Model
    selection on the held-back part compares predictions with pseudo-masks, never with ground truth.

    Args:
        entries: training entries (patches of images).
        fraction: share of the images to hold back, in [0, 1).

    Returns:
        ``(kept, held_back)`` entry lists; an image's patches are all in one of them.
    """
    if not 0 <= fraction < 1:
        raise DataError(f"holdout fraction must be in [0, 1), got {fraction}")
    images = sorted(
        {e["image"] for e in entries}, key=lambda p: (hashlib.sha256(os.path.basename(p).encode()).hexdigest(), p)
    )
    count = round(fraction * len(images))
    if fraction > 0 and len(images) > 1:
        count = min(max(count, 1), len(images) - 1)
    held = set(images[:count])
    return [e for e in entries if e["image"] not in held], [e for e in entries if e["image"] in held]


def layer_keys(num_layers: int) -> list[str]:
    """The keys :func:`pseudo_targets` gives the pseudo-mask layers, in loss-weight order.

    Args:
        num_layers: pseudo-mask layers, the loss's weight count.

    Returns:
        ``["pseudo_0", ..., "pseudo_{num_layers - 1}"]``.
    """
    return [f"pseudo_{i}" for i in range(num_layers)]


def training_targets(entries: Sequence[dict], num_layers: int) -> list[dict]:
    """Each entry with its target masks under :func:`layer_keys`, which ``LoadPatchd`` reads and ``ConcatItemsd``
    stacks into the (L, H, W) target of :class:`scripts.seg.losses.PseudoSupervisionLoss`: the pseudo-mask layers
    of ``datalist_pseudo.json`` (``pseudo_layers``, or ``pseudo`` for one layer), or, for an entry of MONAI Label's
    datastore (``label`` a mask file, not tags), that mask in every layer, the entry marked ``viewer_label`` for
    :class:`scripts.viewer.FromViewerLabeld`.

    Args:
        entries: training entries of ``datalist_pseudo.json`` or MONAI Label's ``{"image", "label"}``.
        num_layers: pseudo-mask layers per entry, the loss's weight count.

    Returns:
        Copies of the entries with the mask paths under :func:`layer_keys`.
    """
    keys = layer_keys(num_layers)
    out = []
    for entry in entries:
        if isinstance(entry.get("label"), (str, os.PathLike)):
            label = os.fspath(entry["label"])
            out.append({**entry, **dict.fromkeys(keys, label), "viewer_label": label})
            continue
        layers = [entry["pseudo"]] if num_layers == 1 and "pseudo" in entry else entry.get("pseudo_layers", [])
        if len(layers) != num_layers:
            raise DataError(
                f"{entry.get('image')}: {len(layers)} pseudo-mask layer(s) ('pseudo' / 'pseudo_layers'), "
                f"but the loss has {num_layers} layer weight(s); "
                "run the pseudo-label stage or set layer_weights to match"
            )
        out.append({**entry, **dict(zip(keys, layers))})
    return out


class TargetDataset(Dataset):
    """A :class:`monai.data.Dataset` of :func:`training_targets`: MONAI Label replaces ``train#dataset#data`` with
    its datastore's entries, so the targets are made here, after any override.

    Args:
        data: training entries (pseudo-labelled, or MONAI Label's image + label mask).
        num_layers: pseudo-mask layers per entry, the loss's weight count.
        transform: the loading and augmentation chain.
    """

    def __init__(self, data: Sequence[dict], num_layers: int, transform=None):
        super().__init__(training_targets(data, num_layers), transform)


def whole_images(entries: Sequence[dict]) -> list[dict]:
    """One ``{"image", "mask", "name"}`` entry per image, in first-seen order: patch entries (``location``/``size``) of
    an image collapse into the full image, for sliding-window evaluation. Every image needs a ground-truth mask;
    slide patches (``level``) are refused: slides are evaluated through whole-slide inference.

    Args:
        entries: the entries of the evaluated split.

    Returns:
        One entry per image; ``name`` is the file stem, unique.
    """
    images: dict[str, dict] = {}
    names: dict[str, str] = {}
    for entry in entries:
        if "level" in entry:
            raise DataError(f"{entry['image']}: a slide patch; evaluation runs on whole tile images, not slides")
        if "mask" not in entry:
            raise DataError(f"{entry['image']}: no ground-truth 'mask'; evaluation needs a mask for every image")
        if entry["image"] in images:
            continue
        name = os.path.splitext(os.path.basename(entry["image"]))[0]
        if name in names:
            raise DataError(
                f"{entry['image']} and {names[name]} share the name {name!r}; "
                "per-image rows and overlays need unique names"
            )
        names[name] = entry["image"]
        images[entry["image"]] = {"image": entry["image"], "mask": entry["mask"], "name": name}
    if not images:
        raise DataError("no images to evaluate: the datalist split is empty")
    return list(images.values())


def eval_split(datalist: str | os.PathLike) -> str:
    """The split evaluation reports on: ``test`` when its entries carry masks, else ``validation`` (GlaS dev).

    Args:
        datalist: the datalist JSON.

    Returns:
        ``"test"`` or ``"validation"``.
    """
    data = json.loads(Path(datalist).read_text())
    test = data.get("test") or []
    return "test" if test and all("mask" in e for e in test) else "validation"
