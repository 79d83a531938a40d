"""Training WSI-SAM without ground truth: its tokens, MLPs and fusion learn from the pipeline's own pseudo-masks.

Each training image (a tile, or a slide patch) is one region: the HR view is the image at its own pixels, the LR view
its surroundings at half the resolution, read from the slide for a slide patch (padded only at the slide border) and
for a tile from the tile itself, padded with glass where the tile ends (a tile has no surroundings). Prompts per step
(HQ-SAM's recipe): the connected components of each prompted class of the pseudo-mask, each as its box with every
edge moved by up to ``box_noise`` of the box's side, and/or points drawn inside it; the target is the component,
the loss Dice + binary cross-entropy over the labelled pixels (ignore excluded). The same module gives the stage-2
refiner (:class:`MultiResRefinement`): train on the first pass's masks, then redraw them from the CAM prompts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine
from monai.data import load_decathlon_datalist
from monai.losses import DiceLoss
from skimage.measure import label, regionprops

from ..constants import IGNORE
from ..errors import DataError
from ..images import read_mask
from ..wsi.reader import level_downsample
from .labeler import load_cams
from .masks import save_pseudo_mask
from .multires import MultiResSAM, Region
from .outputs import Outputs
from .refine import fit_prompts
from .rules import Rules
from .views import ImageSource, Window

logger = logging.getLogger(__name__)
PROMPT_TYPES = ("box", "points", "box+points")


def pseudo_units(datalist: str | os.PathLike) -> list[dict]:
    """The training regions of a ``datalist_pseudo.json``: one per tile (its patch entries share one pseudo-mask) or
    per slide patch, ``{"name", "image", "pseudo", "label" (union of the tags)}`` plus ``location``/``size``/``level``
    for a slide patch."""
    entries = load_decathlon_datalist(str(datalist), False, "training")
    units: dict[tuple, dict] = {}
    for entry in entries:
        if "pseudo" not in entry:
            raise DataError(f"{datalist}: training entry {entry['image']} has no 'pseudo' mask; run pseudo_label first")
        slide = "level" in entry
        key = (entry["image"], entry["pseudo"], *(map(int, entry["location"]) if slide else ()))
        if key not in units:
            keep = {k: entry[k] for k in ("location", "size", "level")} if slide else {}
            name = f"{Path(entry['pseudo']).stem}_{len(units)}"
            units[key] = {"name": name, "image": entry["image"], "pseudo": entry["pseudo"], "label": 0, **keep}
        units[key]["label"] = np.asarray(entry["label"], bool) | units[key]["label"]
    return list(units.values())


class RegionReader:
    """The two views of a training or stage-2 image, sources opened once (see the module docstring)."""

    def __init__(self, slide_backend: str = "cucim"):
        self.backend, self.sources = slide_backend, {}

    def source(self, path: str) -> ImageSource:
        if path not in self.sources:
            self.sources[path] = ImageSource(path, self.backend)
        return self.sources[path]

    def __call__(self, item: dict) -> tuple[np.ndarray, Window, np.ndarray]:
        """HR pixels, HR window and LR pixels of ``item`` (a tile whole, or a slide patch)."""
        source = self.source(os.fspath(item["image"]))
        if "level" in item:
            reader, wsi = source.slide
            ds = level_downsample(reader, wsi, int(item["level"]))
            window = Window(tuple(float(v) for v in item["location"]), ds, tuple(int(v) for v in item["size"]))
        else:
            window = Window((0.0, 0.0), 1.0, source.size)
        return source.read(window), window, source.read(window.context())


def move_box_edges(boxes, offsets, shape) -> np.ndarray:
    """HQ-SAM's noisy boxes: boxes (..., 4) (y0, x0, y1, x1), end inclusive, with every edge moved by its ``offsets``
    (..., 4) times the box's side, clipped to an image of ``shape`` (h, w), re-ordered so that y0 <= y1, x0 <= x1."""
    boxes = np.asarray(boxes, np.float64)
    side = np.concatenate([boxes[..., 2:] - boxes[..., :2] + 1] * 2, axis=-1)
    moved = np.clip(boxes + offsets * side, 0, np.array([*shape, *shape]) - 1)
    return np.concatenate([np.minimum(moved[..., :2], moved[..., 2:]), np.maximum(moved[..., :2], moved[..., 2:])], -1)


def points_inside(coords: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` of a region's pixel ``coords`` (K, 2) drawn at random, repeating pixels only when it has fewer than n."""
    return coords[rng.choice(len(coords), n, replace=len(coords) < n)]


def component_prompts(
    pseudo: np.ndarray,
    classes: Sequence[int],
    rng: np.random.Generator,
    kind: str = "box",
    box_noise: float = 0.2,
    n_points: int = 3,
    min_area: int = 16,
    max_prompts: int | None = None,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, np.ndarray]:
    """Training prompts from a pseudo-mask: per connected component (of at least ``min_area`` pixels) of each class
    in ``classes``, a noisy box and/or ``n_points`` points inside it (``kind``: one of :data:`PROMPT_TYPES`); at most
    ``max_prompts`` components, drawn at random. Returns boxes (N, 4), points (N, P, 2), point labels (N, P) (None
    where ``kind`` has none) and the targets (N, H, W) bool: each component."""
    if kind not in PROMPT_TYPES:
        raise DataError(f"WSI-SAM prompt type {kind!r} is unknown; use one of {PROMPT_TYPES}")
    found = [r for c in classes for r in regionprops(label(pseudo == c, connectivity=2)) if r.area >= min_area]
    if max_prompts is not None and len(found) > max_prompts:
        found = [found[i] for i in np.sort(rng.choice(len(found), max_prompts, replace=False))]
    h, w = pseudo.shape
    boxes, points, targets = [], [], []
    for r in found:
        y0, x0, y1, x1 = r.bbox
        boxes.append(move_box_edges([y0, x0, y1 - 1, x1 - 1], rng.uniform(-1, 1, 4) * box_noise, (h, w)))
        points.append(points_inside(r.coords, rng, n_points))
        target = np.zeros((h, w), bool)
        target[tuple(r.coords.T)] = True
        targets.append(target)
    targets = np.stack(targets) if targets else np.zeros((0, h, w), bool)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4) if "box" in kind else None
    if "points" not in kind:
        return boxes, None, None, targets
    points = np.asarray(points, np.float32).reshape(len(targets), n_points, 2)
    return boxes, points, np.ones(points.shape[:2], np.int64), targets


class MultiResTrainer:
    """Trains WSI-SAM's tokens, MLPs and fusion on pseudo-masks (see the module docstring) and saves them.

    Args:
        model: the WSI-SAM model; only its trainable parts change.
        units: the regions (:func:`pseudo_units`): ``name``, ``image``, ``pseudo``, ``label``, slide patch keys.
        checkpoint: where the trained parts are saved (:meth:`MultiResSAM.save`).
        objects: the class indices prompted (None: every tagged class).
        epochs: passes over the regions, >= 1.
        learning_rate: AdamW learning rate.
        prompts_per_step: components drawn per region and step, >= 1.
        box_noise: each box edge moves by up to this fraction of the box's side (HQ-SAM, WSI-SAM: 0.2).
        n_points: points per point prompt.
        prompt_types: the kinds of prompt drawn per step (:data:`PROMPT_TYPES`).
        min_area: components smaller than this (pixels) are no objects.
        seed: the seed of the order and the prompts.
        cache: keep each region's encoded views in memory (about 24 MB per region with LiteMedSAM).
        slide_backend: slide reader for slide patches.
        progress_bar: show a progress bar.
    """

    def __init__(
        self,
        model: MultiResSAM,
        units: Sequence[dict],
        checkpoint: str | os.PathLike,
        objects: Sequence[int] | None = None,
        epochs: int = 10,
        learning_rate: float = 1e-3,
        prompts_per_step: int = 8,
        box_noise: float = 0.2,
        n_points: int = 3,
        prompt_types: Sequence[str] = PROMPT_TYPES,
        min_area: int = 16,
        seed: int = 0,
        cache: bool = True,
        slide_backend: str = "cucim",
        progress_bar: bool = True,
    ):
        if epochs < 1 or prompts_per_step < 1 or not 0 <= box_noise < 1 or n_points < 1 or not prompt_types:
            raise DataError(
                f"WSI-SAM training needs epochs >= 1, prompts_per_step >= 1, box_noise in [0, 1), n_points >= 1 and "
                f"prompt types; got {epochs}, {prompts_per_step}, {box_noise}, {n_points}, {prompt_types}"
            )
        for kind in prompt_types:
            if kind not in PROMPT_TYPES:
                raise DataError(f"WSI-SAM prompt type {kind!r} is unknown; use one of {PROMPT_TYPES}")
        self.model, self.units, self.checkpoint = model, list(units), Path(checkpoint)
        self.objects, self.epochs, self.lr, self.per_step = objects, epochs, learning_rate, prompts_per_step
        self.box_noise, self.n_points, self.prompt_types, self.min_area = box_noise, n_points, prompt_types, min_area
        self.seed, self.cache, self.progress_bar = seed, cache, progress_bar
        self.read, self.regions = RegionReader(slide_backend), {}
        self.dice = DiceLoss(reduction="mean")

    def region(self, unit: dict) -> Region:
        if unit["name"] in self.regions:
            return self.regions[unit["name"]]
        hr_image, window, lr_image = self.read(unit)
        region = self.model.region(hr_image, window, lr_image)
        if self.cache:
            self.regions[unit["name"]] = region
        return region

    def classes(self, unit: dict) -> list[int]:
        tags = np.asarray(unit["label"], bool)
        return [c for c in np.flatnonzero(tags) if self.objects is None or c in self.objects]

    def loss(self, unit: dict, pseudo: np.ndarray, rng: np.random.Generator) -> torch.Tensor | None:
        """Dice + BCE of one step's prompts on one region; None when its pseudo-mask has no object to prompt."""
        kind = self.prompt_types[rng.integers(len(self.prompt_types))]
        boxes, points, labels, targets = component_prompts(
            pseudo, self.classes(unit), rng, kind, self.box_noise, self.n_points, self.min_area, self.per_step
        )
        if not len(targets):
            return None
        region = self.region(unit)
        logits = self.model.sam.to_image(self.model(region, boxes, points, labels), region.hr.frame)
        device = logits.device
        target = torch.as_tensor(targets[:, None], dtype=torch.float32, device=device)
        valid = torch.as_tensor(pseudo != IGNORE, dtype=torch.float32, device=device).expand_as(target)
        loss = self.dice(torch.sigmoid(logits) * valid, target * valid)
        return loss + F.binary_cross_entropy_with_logits(logits, target, weight=valid)

    def run(self) -> Path:
        """Train and save; returns the checkpoint."""
        data = [u for u in self.units if self.classes(u)]
        if not data:
            raise DataError("WSI-SAM training: no training image is tagged with a prompted class")
        model = self.model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=1e-4)

        def loss_of(engine: Engine, unit: dict) -> torch.Tensor | None:
            rng = np.random.default_rng([self.seed, engine.state.iteration])
            return self.loss(unit, read_mask(unit["pseudo"]), rng)

        last = fit_prompts(loss_of, optimizer, data, self.epochs, self.seed, model.sam, self.progress_bar)
        model.eval()
        model.save(self.checkpoint)
        logger.info(
            f"WSI-SAM: {len(data)} regions x {self.epochs} epoch(s), last loss {last:.4f}; saved {self.checkpoint}"
        )
        return self.checkpoint


class MultiResRefinement:
    """Stage 2 with WSI-SAM instead of EP-SAM's decoder rounds (``sam_refiner: multires``): train WSI-SAM on the first
    pass's pseudo-masks, then redraw every mask from the same CAM prompts with it, as round 1 (``sam_iter1``); the
    trained parts are saved as ``multires_sam.pt`` beside the masks and a finished training is loaded, not repeated.

    Args:
        trainer: the :class:`MultiResTrainer` (its units: the stage's items with their round-0 masks).
        items: the stage's units of work (:func:`scripts.sam.outputs.pseudo_items`).
        output_dir: the stage's output folder.
        rules: the stage's prompt and fusion rules.
    """

    def __init__(self, trainer: MultiResTrainer, items: Sequence[dict], output_dir: str | os.PathLike, rules: Rules):
        self.trainer, self.items, self.out, self.rules = trainer, list(items), Outputs(output_dir), rules

    @staticmethod
    def units(items: Sequence[dict], output_dir: str | os.PathLike) -> list[dict]:
        out = Outputs(output_dir)
        return [{**item, "pseudo": str(out.sam(item["name"], 0))} for item in items]

    def run(self) -> int:
        """Returns the round whose masks are final (1)."""
        path = self.trainer.checkpoint
        if path.exists():
            self.trainer.model.load(path)
        else:
            self.trainer.run()
        model = self.trainer.model.eval()
        todo = [item for item in self.items if not self.out.sam(item["name"], 1).exists()]
        for item in todo:
            name, tags = item["name"], np.asarray(item["label"], bool)
            cams = load_cams(self.out.cam(name))
            prompts = self.rules.prompts(name, cams, tags)
            region = self.trainer.region(item) if len(prompts) else None
            save_pseudo_mask(self.out.sam(name, 1), self.rules.sam_mask(model, region, cams, tags, prompts))
        logger.info(f"WSI-SAM refinement: wrote {len(todo)} pseudo-masks to {self.out.sam('', 1).parent}")
        return 1


REFINERS = ("decoder", "multires")


def refiner(kind: str, decoder, multires):
    """Stage 2's refinement by name (``sam_refiner``): EP-SAM's decoder rounds or WSI-SAM."""
    if kind not in REFINERS:
        raise DataError(f"sam_refiner {kind!r} is unknown; use one of {REFINERS}")
    return multires if kind == "multires" else decoder
