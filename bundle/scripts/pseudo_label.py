"""Stage 2: pseudo-masks of the training images. CAM -> prompts -> SAM -> IDS filter -> fused class map (EP-SAM),
the CAM-only mask of every CAM layer (MLPS), and EP-SAM's rounds of fine-tuning SAM's mask decoder on its own masks.

The unit of work is a whole image: the patch entries of a tile are grouped and its tags are the union of theirs
(the image has a class if any of its patches has it); :class:`scripts.cam.WholeImageCAM` reads it in windows of the
training patch size, the scale the classifier learned. A slide-patch entry (``level``) is its own unit. Masks are
written per unit; the segmentation stage crops a tile's mask at each patch entry's ``location``.

Under ``output_dir``::

    cams/NAME.npy            uint8 (C, H, W): the first layer's CAM x 255 (tagged classes only), the prompts' source
    cam_layers/NAME_L.png    MLPS: CAM-only mask of layer L            -> "pseudo_layers"
    sam_iter0/NAME.png       CAM prompts into SAM as shipped
    sam_iterK/NAME.png       the same prompts after K rounds of decoder fine-tuning (the last one -> "pseudo")
    sam_decoder_iterK.pt     the mask decoder's state dict after round K
    datalist_pseudo.json

Every file is written atomically and a re-run skips what exists, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.data import load_decathlon_datalist
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceLoss
from torch import nn

from . import tta as augment
from .atomic import atomic_output
from .datalist import SPLITS, read_classes, write_datalist
from .errors import DataError
from .images import read_mask
from .prompts import Prompts, cam_prompts
from .pseudo_masks import IGNORE, cam_pseudo_mask, sam_pseudo_mask, save_pseudo_mask
from .checkpoints import read_state
from .sam import Embedding, SegmentAnything
from .transforms import LoadPatchd

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
            units[key] = {"image": entry["image"], "label": np.zeros(len(entry["label"]), np.uint8), "name": name, **keep}
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
    """The units of work of a datalist split (see the module docstring)."""
    entries = load_decathlon_datalist(str(datalist), False, split)
    if not entries:
        raise DataError(f"{datalist}: no '{split}' entries to pseudo-label")
    return list(_units(entries).values())


def patch_size(datalist: str | os.PathLike, split: str = "training") -> int | None:
    """The side of the square patches the classifier was trained on (the entries' ``size``), the CAM window for whole
    images; None when the entries are whole images (the classifier saw each one whole, resized)."""
    sizes = {tuple(e["size"]) for e in load_decathlon_datalist(str(datalist), False, split) if "size" in e}
    if not sizes:
        return None
    if len(sizes) > 1 or any(h != w for h, w in sizes):
        raise DataError(f"{datalist}: '{split}' patches have sizes {sorted(sizes)}; set cam_window to the one the CAM saw")
    return sizes.pop()[0]


def cam_cell(stride: int, window: int | None, input_size: int) -> float:
    """Image pixels per CAM cell: the network's output ``stride`` at the scale the CAM inferer reads the image
    (a ``window`` resized to ``input_size``; for whole images, those at ``input_size``). Nothing finer than a cell
    is resolved, so two objects are told apart only by peaks at least two cells apart with a dip between them."""
    return stride * (window or input_size) / input_size


def object_classes(classes: Sequence[str], names: Sequence[str] | None) -> list[int] | None:
    """Indices of the classes SAM is prompted for (``sam_classes``), None for all; an unknown name is a DataError."""
    if names is None:
        return None
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise DataError(f"sam_classes {unknown} are not among the datalist's classes {list(classes)}")
    return [list(classes).index(n) for n in names]


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


@dataclass
class Rules:
    """How CAMs become prompts and SAM masks become a pseudo-mask; one object shared by the first pass, every
    refinement round and the reports, so they all use the same prompts (seeded per image name, not per run order).

    A class's CAM region (the prompts' components, the IDS filter's reference) is ``cam >= cam_threshold``; with
    ``cam_threshold`` None it is where the class has the highest tagged CAM, the CAM-only arg-max labelling: no
    threshold to choose, and SAM then redraws the boundaries of the arg-max blobs (every pixel of an H&E tile is
    some class, so the arg-max is the CAM's own answer).

    ``objects``: the classes SAM is prompted for (None: every class). SAM outlines objects (a gland, a nucleus, a
    tumour nest); a background-like class (stroma, lumen, "not gland") is no object and a box around it is the
    whole image. Such classes get no prompts, in the first pass or in refinement; they keep the pixels no kept SAM
    mask covers where their CAM wins, and SAM's masks of the object classes draw their boundary.
    """

    cam_threshold: float | None = None
    ids_threshold: float = 0.9  # EP-SAM: keep a SAM mask only if this fraction of it lies in its class's CAM region
    confidence: float = 0.0  # uncovered pixels: the CAM's class where its CAM reaches this (and is > 0), else ignore
    disagreement: float = 0.5
    box_rule: bool = True  # inside a kept mask's prompt box SAM draws the boundary (see scripts.pseudo_masks.fuse)
    prompt_args: dict = field(default_factory=dict)  # of scripts.prompts.cam_prompts: margin, min_distance, ...
    objects: Sequence[int] | None = None
    seed: int = 0

    def rng(self, name: str, *extra: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(name.encode()), *extra])

    def regions(self, cams: np.ndarray, tags) -> tuple[np.ndarray, float]:
        """The CAMs the prompts and the filter read, and the threshold that gives the regions."""
        if self.cam_threshold is not None:
            return cams, self.cam_threshold
        tagged = np.where(np.asarray(tags, bool)[:, None, None], cams, -np.inf)
        wins = np.arange(len(cams))[:, None, None] == tagged.argmax(0)
        return np.where(wins, cams, 0.0).astype(np.float32), float(np.finfo(np.float32).tiny)

    def prompts(self, name: str, cams: np.ndarray, tags) -> Prompts:
        cams, threshold = self.regions(cams, tags)
        return cam_prompts(cams, tags, threshold=threshold, objects=self.objects, rng=self.rng(name),
                           **self.prompt_args)

    def mask_prompts(self, name: str, pseudo: np.ndarray, tags, round_: int) -> Prompts:
        """Training prompts for the decoder: the connected components of each object class of a pseudo-mask (a flat
        one-hot map has no peaks to split at)."""
        onehot = np.stack([pseudo == c for c in range(len(tags))]).astype(np.float32)
        args = {**self.prompt_args, "min_distance": None}
        return cam_prompts(onehot, tags, threshold=0.5, objects=self.objects, rng=self.rng(name, round_), **args)

    def sam_mask(self, sam: SegmentAnything, embedding: Embedding | None, cams: np.ndarray, tags, prompts: Prompts):
        """The fused pseudo-mask; no prompts (an empty CAM) -> the CAM-only mask (ignore where the CAM is unsure)."""
        cams, threshold = self.regions(cams, tags)
        if not len(prompts):
            return cam_pseudo_mask(cams, tags, self.confidence)
        masks = sam.predict(embedding, prompts.boxes, prompts.points, prompts.labels).probs > 0.5
        return sam_pseudo_mask(masks, prompts.classes, cams, tags, threshold, self.ids_threshold, self.disagreement,
                               self.confidence, prompts.boxes if self.box_rule else None)[0]


class SegmentationMaps:
    """Inferer for self-training (``relabel.json``): a trained segmentation network's class probabilities stand in for
    the CAMs, as one layer (B, 1, C, H, W), so the next round's prompts come from its sharper, better separated regions.
    Images are scaled to [0, 1] and read in ``roi_size`` windows with Gaussian blending, as the network was trained;
    ``tta`` averages each window over flips (:mod:`scripts.tta`), as the CAMs of the first round are."""

    def __init__(self, roi_size: int, sw_batch_size: int = 16, overlap: float = 0.5, tta: str = "none"):
        self.inferer = SlidingWindowInferer(roi_size, sw_batch_size, overlap=overlap, mode="gaussian")
        augment.transforms(tta)  # an unknown name is refused here, not at the first image
        self.tta = tta

    def __call__(self, inputs: torch.Tensor, network: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(self.inferer(inputs.float() / 255, augment.Averaged(network, self.tta)), 1)[:, None]


def load_cams(path: Path) -> np.ndarray:
    return np.load(path).astype(np.float32) / 255


class Embeddings:
    """SAM image embeddings by item name. The encoder stays frozen, so an image is encoded once for the first pass
    and every refinement round (``cache``: kept in memory, ~4 MB per image for LiteMedSAM; off -> re-encoded)."""

    def __init__(self, sam: SegmentAnything, cache: bool = True, slide_backend: str = "cucim"):
        self.sam, self.cache, self.store = sam, cache, {}
        self.load = LoadPatchd(keys="image", backend=slide_backend)

    def __call__(self, item: dict, image: np.ndarray | None = None) -> Embedding:
        if item["name"] in self.store:
            return self.store[item["name"]]
        if image is None:
            image = self.load(item)["image"].transpose(1, 2, 0)
        embedding = self.sam.embed(image)
        if self.cache:
            self.store[item["name"]] = embedding
        return embedding


class PseudoLabelHandler:
    """ignite handler for an evaluator whose inferer is :class:`scripts.cam.WholeImageCAM` and whose loader gives
    :meth:`pending` items one per batch, with no augmentation (masks belong to the image as stored). Per image it
    writes the CAM, the CAM-only mask of every layer and the SAM pseudo-mask of round 0."""

    def __init__(self, items: Sequence[dict], output_dir: str | os.PathLike, sam: SegmentAnything, rules: Rules,
                 num_layers: int, embeddings: Embeddings):
        self.items, self.out, self.sam, self.rules = list(items), Outputs(output_dir), sam, rules
        self.num_layers, self.embeddings = num_layers, embeddings

    def done(self, item: dict) -> bool:
        name = item["name"]
        paths = [self.out.cam(name), self.out.sam(name, 0), *(self.out.layer(name, i) for i in range(self.num_layers))]
        return all(p.exists() for p in paths)

    def pending(self) -> list[dict]:
        """Items without all their outputs; a resumed run processes only these."""
        todo = [item for item in self.items if not self.done(item)]
        logger.info(f"pseudo-labels: {len(self.items) - len(todo)} of {len(self.items)} images done, {len(todo)} to go")
        return todo

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        batch, cams = engine.state.batch, engine.state.output["pred"]
        if len(batch["name"]) != 1:
            raise DataError(f"pseudo-labelling needs batch_size 1 (whole images differ in size), got {len(batch['name'])}")
        tags = batch["label"][0].cpu().numpy().astype(bool)
        if cams.shape[1] != self.num_layers:
            raise DataError(f"the CAM inferer gave {cams.shape[1]} layers, the handler expects {self.num_layers}")
        image = batch["image"][0].permute(1, 2, 0).cpu().numpy().astype(np.uint8)
        self.label(batch["name"][0], image, cams[0].cpu().numpy(), tags)

    def label(self, name: str, image: np.ndarray, cams: np.ndarray, tags: np.ndarray) -> None:
        """``cams`` (L, C, H, W) in [0, 1]. The SAM mask is written last: it marks the image done."""
        cams = np.where(tags[None, :, None, None], np.nan_to_num(cams), 0.0)
        stored = np.round(cams[0] * 255).astype(np.uint8)  # what later rounds and reports read back
        with atomic_output(self.out.cam(name)) as tmp:
            np.save(tmp, stored)
        for i, layer in enumerate(cam_pseudo_mask(cams, tags, self.rules.confidence)):
            save_pseudo_mask(self.out.layer(name, i), layer)
        cams = stored.astype(np.float32) / 255
        prompts = self.rules.prompts(name, cams, tags)
        embedding = self.embeddings({"name": name}, image) if len(prompts) else None
        save_pseudo_mask(self.out.sam(name, 0), self.rules.sam_mask(self.sam, embedding, cams, tags, prompts))


def _as_is(item):
    return item


class DecoderRefinement:
    """EP-SAM's iterative refinement: ``iterations`` rounds of (fine-tune SAM's mask decoder on the current
    pseudo-masks, prompted with boxes and points from their components; regenerate the masks from the CAM prompts).

    The image and prompt encoders stay frozen (their outputs do not depend on the decoder), so the cached embeddings
    serve every round. Loss: soft Dice + binary cross-entropy of each prompt's mask against the pixels of its class
    inside its box, ignore pixels excluded. Each round's decoder is saved; a finished round is loaded, not retrained.
    """

    def __init__(self, sam: SegmentAnything, items: Sequence[dict], output_dir: str | os.PathLike, rules: Rules,
                 embeddings: Embeddings, iterations: int = 3, epochs: int = 2, learning_rate: float = 1e-4,
                 prompts_per_step: int = 8, progress_bar: bool = True):
        if iterations < 0 or epochs < 1 or prompts_per_step < 1:
            raise DataError(f"refinement needs iterations >= 0, epochs >= 1, prompts_per_step >= 1; got {iterations}, "
                            f"{epochs}, {prompts_per_step}")
        self.sam, self.items, self.out, self.rules, self.embeddings = sam, list(items), Outputs(output_dir), rules, embeddings
        self.iterations, self.epochs, self.lr, self.per_step = iterations, epochs, learning_rate, prompts_per_step
        self.progress_bar = progress_bar
        self.dice = DiceLoss(reduction="mean")

    def run(self) -> int:
        """Runs the missing rounds; returns the last round, whose masks are the final pseudo-masks."""
        for frozen in (self.sam.image_encoder, self.sam.prompt_encoder):
            frozen.requires_grad_(False)
        for k in range(1, self.iterations + 1):
            path = self.out.decoder(k)
            if path.exists():
                self.sam.mask_decoder.load_state_dict(read_state(path, f"SAM mask decoder of round {k}"))
            else:
                self._fine_tune(k)
                with atomic_output(path) as tmp:
                    torch.save(self.sam.mask_decoder.state_dict(), tmp)
            self._regenerate(k)
        return self.iterations

    def _fine_tune(self, k: int) -> None:
        data = []
        for item in self.items:
            pseudo, tags = read_mask(self.out.sam(item["name"], k - 1)), np.asarray(item["label"], bool)
            prompts = self.rules.mask_prompts(item["name"], pseudo, tags, k)
            if len(prompts):
                data.append((item, pseudo, prompts))
        if not data:
            logger.warning(f"refinement round {k}: no pseudo-mask has a labelled component; the decoder is unchanged")
            return
        decoder = self.sam.mask_decoder.train().requires_grad_(True)
        optimizer = torch.optim.AdamW(decoder.parameters(), lr=self.lr, weight_decay=1e-4)

        def step(engine: Engine, sample) -> float:
            item, pseudo, prompts = sample
            embedding = self.embeddings(item)
            rng = self.rules.rng(item["name"], k, engine.state.iteration)
            pick = np.sort(rng.choice(len(prompts), min(self.per_step, len(prompts)), replace=False))
            logits, _ = self.sam.decode_logits(embedding, prompts.boxes[pick], prompts.points[pick], prompts.labels[pick])
            logits = self.sam.to_image(logits, embedding.frame)
            target, valid = self._targets(pseudo, prompts, pick, logits.device)
            loss = self.dice(torch.sigmoid(logits) * valid, target * valid)
            loss = loss + F.binary_cross_entropy_with_logits(logits, target, weight=valid)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return loss.item()

        trainer = Engine(step)
        if self.progress_bar:
            ProgressBar(persist=False).attach(trainer, output_transform=lambda loss: {"loss": loss})
        order = torch.Generator().manual_seed(self.rules.seed + k)
        loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=True, generator=order, collate_fn=_as_is)
        amp, self.sam.amp = self.sam.amp, False  # fp16 gradients would need a GradScaler; the decoder is small
        try:
            trainer.run(loader, max_epochs=self.epochs)
        finally:
            self.sam.amp = amp
        logger.info(f"refinement round {k}: {len(data)} images x {self.epochs} epoch(s), last loss {trainer.state.output:.4f}")
        decoder.eval()

    @staticmethod
    def _targets(pseudo: np.ndarray, prompts: Prompts, pick: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per prompt the pixels of its class inside its box (N, 1, H, W), and where the pseudo-mask is labelled."""
        rows, cols = np.arange(pseudo.shape[0])[:, None], np.arange(pseudo.shape[1])[None]
        target = []
        for (y0, x0, y1, x1), c in zip(prompts.boxes[pick], prompts.classes[pick]):
            target.append((pseudo == c) & (rows >= y0) & (rows <= y1) & (cols >= x0) & (cols <= x1))
        target = torch.as_tensor(np.stack(target)[:, None], dtype=torch.float32, device=device)
        valid = torch.as_tensor(pseudo != IGNORE, dtype=torch.float32, device=device)
        return target, valid.expand_as(target)

    def _regenerate(self, k: int) -> None:
        todo = [item for item in self.items if not self.out.sam(item["name"], k).exists()]
        for item in todo:
            name, tags = item["name"], np.asarray(item["label"], bool)
            cams = load_cams(self.out.cam(name))
            prompts = self.rules.prompts(name, cams, tags)
            embedding = self.embeddings(item) if len(prompts) else None
            save_pseudo_mask(self.out.sam(name, k), self.rules.sam_mask(self.sam, embedding, cams, tags, prompts))
        logger.info(f"refinement round {k}: wrote {len(todo)} pseudo-masks to {self.out.sam('', k).parent}")


def write_pseudo_datalist(datalist: str | os.PathLike, output_dir: str | os.PathLike, iteration: int,
                          num_layers: int) -> Path:
    """``output_dir/datalist_pseudo.json``: the input datalist (classes, every split, top-level extras) whose training
    entries gain ``pseudo`` (the SAM mask of round ``iteration``) and ``pseudo_layers`` (the CAM-only masks),
    all paths relative to the new file. Refuses to point at a mask that was not written."""
    out, target = Outputs(output_dir), Path(output_dir) / "datalist_pseudo.json"
    raw = json.loads(Path(datalist).read_text())
    splits = {s: load_decathlon_datalist(str(datalist), False, s) for s in SPLITS if raw.get(s)}
    names = {key: unit["name"] for key, unit in _units(splits.get("training", [])).items()}
    root = target.parent.resolve()
    for entry in splits["training"]:
        name = names[_unit_key(entry)]
        pseudo, layers = out.sam(name, iteration), [out.layer(name, i) for i in range(num_layers)]
        missing = [str(p) for p in (pseudo, *layers) if not p.exists()]
        if missing:
            raise DataError(f"{entry['image']}: pseudo-mask(s) {missing} missing; run the pseudo-label stage to the end")
        entry["pseudo"] = str(pseudo)
        entry["pseudo_layers"] = [os.path.relpath(p.resolve(), root) for p in layers]
    extra = {k: v for k, v in raw.items() if k not in ("classes", *SPLITS)}
    write_datalist(target, read_classes(datalist), splits, **extra)
    return target
