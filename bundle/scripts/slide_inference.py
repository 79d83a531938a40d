"""Whole-slide inference at the model's magnification, tissue only, with memory bounded by the tile size.

Why not ``PatchInferer`` + ``WSISlidingWindowSplitter`` + ``AvgMerger``: the merger holds the whole level's float
output in RAM (it grows with the slide; ``ZarrAvgMerger`` needs zarr, which is not a requirement), the mergers
average windows without Gaussian weights, windows skipped by the splitter's filter leave NaN, and the splitter reads
patch after patch in the calling thread, so reading never overlaps compute. The equivalent MONAI path used here:

1. the inference grid is the pyramid level nearest to the model's ``mpp`` (resampled from the next finer level when
   none is within ``mpp_tolerance``), cut into tiles a whole number of window strides wide. Each tile is read with a
   margin of (roi - stride) / 2, so the windows of all tiles lie on one global sliding-window grid: no window is
   computed twice, and no output pixel lies at a window's outer edge;
2. only tiles that touch the low-resolution tissue mask are read, by ``DataLoader`` workers (reading overlaps the
   network), batched; the tissue mask travels with each tile as a fourth channel;
3. MONAI's ``SlidingWindowInferer`` (Gaussian blending, ``sw_batch_size`` windows per network call) runs on each
   batch of tiles through :class:`TissueWindows`, which calls the network only on windows holding tissue;
4. each tile's centre goes straight to disk (:class:`scripts.slide_outputs.LabelStore`, a ``.npy`` memory map of
   the reduced probabilities); the pyramidal label TIFF, GeoJSON, overlay and summary are made from those.

Label values are class indices, 255 where there is no tissue (as in the demo slide's mask). Plain tiles (PNG/JPEG)
go through the same code as one-level slides; they record no pixel size and are taken to be at the model's ``mpp``.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .atomic import atomic_output
from .checkpoints import load_network
from .errors import DataError
from .images import read_rgb
from .pyramid_tiff import write_pyramidal_tiff
from .slide_outputs import LabelStore, geojson, label_polygons, overlay_png, write_json
from .wsi import level_downsample, open_slide, pick_level, read_lowres, slide_mpp, tissue_mask, to_level0

log = logging.getLogger(__name__)

TILE_SUFFIXES = (".png", ".jpg", ".jpeg")
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
NO_TISSUE = 255
THUMBNAIL = 1024  # longest side of the overlay


# ------------------------------------------------------------------------------------------------ inputs


def find_inputs(input=None, input_dir=None) -> list[str]:
    """Slides and tiles named by ``input`` (a path, a glob, a folder, or a list of them) and/or ``input_dir``
    (a folder: its files with a slide or tile suffix), sorted, duplicates removed."""
    specs = [] if input is None else [input] if isinstance(input, (str, os.PathLike)) else list(input)
    specs += [] if input_dir is None else [input_dir]
    if not specs:
        raise DataError("no input: pass --input (a slide, a list, a glob or a folder) or --input_dir")
    found = []
    for spec in map(os.fspath, specs):
        if os.path.isdir(spec):
            names = sorted(os.listdir(spec))
            paths = [os.path.join(spec, n) for n in names if n.lower().endswith(SLIDE_SUFFIXES + TILE_SUFFIXES)]
            if not paths:
                raise DataError(f"{spec}: no slides or tiles ({', '.join(SLIDE_SUFFIXES + TILE_SUFFIXES)}) in the folder")
        elif glob.has_magic(spec):
            paths = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
            if not paths:
                raise DataError(f"{spec}: the pattern matches no file")
        else:
            paths = [spec]  # a missing file is reported, with the others, when its turn comes
        found += paths
    return list(dict.fromkeys(found))


def shard(items) -> list:
    """This process's share of ``items`` under ``torchrun``: every WORLD_SIZE-th item from RANK (all of them in a
    single process). The process group's rank is used when one is initialised, else torchrun's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return list(items)[rank::world]


def load_weights(network: nn.Module, path, device) -> nn.Module:
    """Load a state-dict checkpoint; ``path=None`` keeps the random weights (development only, said in the log)."""
    if path is None:
        log.warning("no checkpoint (ckpt_path=None): running a randomly initialised network")
        return network
    if not os.path.isfile(path):
        raise DataError(f"{path}: model checkpoint not found; train first, or pass --ckpt_path '$None' to run a randomly "
                        "initialised network (development only)")
    return load_network(network, path, "segmentation model", device)


# ------------------------------------------------------------------------------------------ plain tiles


class _Tile:
    """A plain RGB tile in memory, with what :class:`_TileReader` needs."""

    def __init__(self, path: str):
        self.path, self.rgb = path, read_rgb(path)


class _TileReader:
    """The :class:`monai.data.WSIReader` calls used here, on a one-level in-memory tile: tiles take the slide code."""

    def get_level_count(self, wsi) -> int:
        return 1

    def get_size(self, wsi, level: int) -> tuple[int, int]:
        return wsi.rgb.shape[:2]

    def get_file_path(self, wsi) -> str:
        return wsi.path

    def get_data(self, wsi, location, size, level=0):
        (y, x), (h, w) = location, size
        return np.moveaxis(wsi.rgb[y : y + h, x : x + w], -1, 0), {}


def open_input(path: str, backend: str = "cucim"):
    """``(reader, wsi)`` for a slide (:func:`scripts.wsi.open_slide`) or a plain tile."""
    if path.lower().endswith(TILE_SUFFIXES):
        return _TileReader(), _Tile(path)
    return open_slide(path, backend)


# --------------------------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Grid:
    """The pixel grid the network sees: ``downsample`` of level 0, read from pyramid ``level`` (``level_downsample``)
    and resampled when the two differ; ``mpp`` in micrometres per grid pixel (None when unknown)."""

    level: int
    level_downsample: float
    downsample: float
    height: int
    width: int
    mpp: float | None

    @property
    def scale(self) -> float:
        """Level pixels per grid pixel (1 when a level matches the model's mpp)."""
        return self.downsample / self.level_downsample


def choose_grid(reader, wsi, slide_mpp: float | None, model_mpp: float | None, tolerance: float = 0.1) -> Grid:
    """The pyramid level whose pixel size is nearest (in ratio) to ``model_mpp``, used as is when within
    ``tolerance``; otherwise the model's pixel size, resampled from the finest level not coarser than it (level 0,
    upsampled, when the slide is coarser than the model). ``model_mpp=None``: level 0 as it is."""
    if model_mpp is not None and slide_mpp is None:
        raise DataError("no slide pixel size")  # the caller names the file and the way out
    height0, width0 = (int(v) for v in reader.get_size(wsi, 0))
    target = 1.0 if model_mpp is None else model_mpp / slide_mpp
    downsamples = [level_downsample(reader, wsi, level) for level in range(reader.get_level_count(wsi))]
    nearest = min(range(len(downsamples)), key=lambda level: abs(math.log(downsamples[level] / target)))
    if abs(downsamples[nearest] / target - 1) <= tolerance:
        level, level_ds, downsample = nearest, downsamples[nearest], downsamples[nearest]
        height, width = (int(v) for v in reader.get_size(wsi, level))
    else:
        level, level_ds = pick_level(reader, wsi, target)
        downsample = target
        height, width = max(1, round(height0 / target)), max(1, round(width0 / target))
    return Grid(level, level_ds, downsample, height, width, None if slide_mpp is None else slide_mpp * downsample)


def _rgb(array) -> np.ndarray:
    """H x W x 3 uint8 from the reader's channel-first data (grey levels repeated, alpha dropped: MONAI's reader
    already composites RGBA)."""
    array = np.asarray(array)
    array = np.repeat(array[:1], 3, 0) if array.shape[0] < 3 else array[:3]
    return np.moveaxis(array, 0, -1).astype(np.uint8, copy=False)


def read_region(reader, wsi, grid: Grid, y: int, x: int, size: int) -> np.ndarray:
    """Grid pixels ``[y, y + size) x [x, x + size)`` as size x size x 3 uint8; outside the slide the edge repeats.
    Resampled regions are read from the grid's level and resized with antialiasing (within a level pixel)."""
    level_h, level_w = (int(v) for v in reader.get_size(wsi, grid.level))
    s = grid.scale
    y0, x0 = math.floor(y * s), math.floor(x * s)
    y1, x1 = max(y0 + 1, math.ceil((y + size) * s)), max(x0 + 1, math.ceil((x + size) * s))
    cy0, cx0 = min(max(y0, 0), level_h - 1), min(max(x0, 0), level_w - 1)
    cy1, cx1 = max(min(y1, level_h), cy0 + 1), max(min(x1, level_w), cx0 + 1)
    location = (to_level0(cy0, grid.level_downsample), to_level0(cx0, grid.level_downsample))
    try:
        data, _ = reader.get_data(wsi, location=location, size=(cy1 - cy0, cx1 - cx0), level=grid.level)
    except Exception as e:  # the backends raise ValueError, RuntimeError, OpenSlideError ...
        raise DataError(f"{reader.get_file_path(wsi)}: cannot decode level {grid.level} at rows {cy0}-{cy1} ({e})") from e
    rgb = _rgb(data)
    pad = ((max(0, cy0 - y0), max(0, y1 - cy1)), (max(0, cx0 - x0), max(0, x1 - cx1)), (0, 0))
    rgb = np.pad(rgb, pad, mode="edge")[: y1 - y0, : x1 - x0]
    if rgb.shape[:2] != (size, size):
        chw = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float()[None]
        chw = torch.nn.functional.interpolate(chw, size=(size, size), mode="bilinear", antialias=s > 1, align_corners=False)
        rgb = chw[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return rgb


def _mask_indices(start: int, count: int, limit: int, grid_ds: float, mask_ds: float, mask_len: int):
    """Mask row (or column) of each grid pixel in ``[start, start + count)``, and whether it lies on the slide."""
    pixels = np.arange(start, start + count)
    index = np.clip((pixels * grid_ds / mask_ds).astype(np.int64), 0, mask_len - 1)
    return index, (pixels >= 0) & (pixels < limit)


@dataclass
class Plan:
    """One slide made ready: its grid, tissue mask and the tiles (core top-left, grid pixels) that touch tissue."""

    path: str
    reader: object
    wsi: object
    slide_mpp: float | None
    grid: Grid
    mask: np.ndarray
    mask_downsample: float
    tile: int
    margin: int
    tiles: list = field(default_factory=list)
    total_tiles: int = 0


class TileDataset(torch.utils.data.Dataset):
    """A tissue tile with its margin: 4 x S x S uint8 (RGB and the tissue mask as 0/1), read in the worker process
    (each opens the slide once)."""

    def __init__(self, plan: Plan, backend: str):
        self.opener = partial(open_input, plan.path, backend)
        self.grid, self.mask, self.mask_ds = plan.grid, plan.mask, plan.mask_downsample
        self.tiles, self.size, self.margin = plan.tiles, plan.tile + 2 * plan.margin, plan.margin
        self._slide, self._pid = (plan.reader, plan.wsi), os.getpid()

    def __len__(self) -> int:
        return len(self.tiles)

    def __getstate__(self) -> dict:  # spawned workers open their own handle
        return {**self.__dict__, "_slide": None, "_pid": None}

    def __getitem__(self, index: int) -> dict:
        if self._pid != os.getpid():  # a worker: its own handle (cuCIM and OpenSlide handles are per process)
            self._slide, self._pid = self.opener(), os.getpid()
        y, x = self.tiles[index][0] - self.margin, self.tiles[index][1] - self.margin
        rgb = read_region(*self._slide, self.grid, y, x, self.size)
        rows, row_ok = _mask_indices(y, self.size, self.grid.height, self.grid.downsample, self.mask_ds, self.mask.shape[0])
        cols, col_ok = _mask_indices(x, self.size, self.grid.width, self.grid.downsample, self.mask_ds, self.mask.shape[1])
        tissue = self.mask[rows[:, None], cols[None, :]] & row_ok[:, None] & col_ok[None, :]
        image = np.concatenate([rgb.transpose(2, 0, 1), tissue[None].astype(np.uint8)])
        return {"image": torch.from_numpy(np.ascontiguousarray(image)), "tile": index}


class TissueWindows(nn.Module):
    """The network's softmax on the windows that hold tissue, zeros on the others (their pixels are all background,
    so the zeros never reach a tissue pixel's blend). Input: RGB in [0, 1] and a tissue channel."""

    def __init__(self, network: nn.Module, num_classes: int, amp: bool = False):
        super().__init__()
        self.network, self.num_classes, self.amp = network, num_classes, amp
        self.windows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = x[:, 3].flatten(1).amax(1) > 0
        out = x.new_zeros((x.shape[0], self.num_classes, *x.shape[2:]))
        if keep.any():
            with torch.autocast(x.device.type, enabled=self.amp):
                out[keep] = torch.softmax(self.network(x[keep, :3]).float(), 1)
            self.windows += int(keep.sum())
        return out


# ------------------------------------------------------------------------------------------- inference


class SlideInference:
    """Whole-slide inference over a list of slides/tiles; see the module docstring. ``inferer`` is the config's
    ``SlidingWindowInferer`` (its ``roi_size`` and ``overlap`` set the tiling); ``mpp`` is the model's pixel size
    (None: level 0 as it is); ``slide_mpp`` is used for slides that record none (a recorded one wins)."""

    def __init__(
        self, network: nn.Module, inferer, classes, device="cpu", mpp: float | None = 0.5,
        slide_mpp: float | None = None, mpp_tolerance: float = 0.1, backend: str = "cucim", tile_size: int = 1024,
        batch_size: int = 2, num_workers: int = 1, prob_downsample: int = 8, amp: bool = False,
        progress: bool = True, overwrite: bool = False,
    ):
        if mpp is not None and not mpp > 0 or slide_mpp is not None and not slide_mpp > 0:
            raise DataError(f"mpp and slide_mpp must be positive (or None), got mpp={mpp}, slide_mpp={slide_mpp}")
        if prob_downsample < 1 or tile_size < 1 or batch_size < 1 or num_workers < 0:
            raise DataError("prob_downsample, tile_size and batch_size must be >= 1 and num_workers >= 0")
        self.classes, self.device = list(classes), torch.device(device)
        network.to(memory_format=torch.channels_last)  # same weights; measured 1.2x faster on CPU, and AMP likes it on CUDA
        self.windows = TissueWindows(network, len(self.classes), amp and self.device.type == "cuda")
        self.inferer, self.mpp, self.slide_mpp, self.mpp_tolerance = inferer, mpp, slide_mpp, mpp_tolerance
        self.backend, self.batch_size, self.num_workers = backend, batch_size, num_workers
        self.prob_downsample, self.progress, self.overwrite = prob_downsample, progress, overwrite
        roi, overlap = np.atleast_1d(inferer.roi_size), np.atleast_1d(inferer.overlap)
        if len(set(roi.tolist())) != 1 or len(set(overlap.tolist())) != 1:
            raise DataError(f"whole-slide inference needs a square roi_size and one overlap, got {roi}, {overlap}")
        self.roi = int(roi[0])
        stride = max(1, int(self.roi * (1 - float(overlap[0]))))  # MONAI's scan interval
        self.margin = (self.roi - stride) // 2
        unit = math.lcm(stride, prob_downsample)
        self.tile = unit * max(1, round(tile_size / unit))

    def __call__(self, inputs, output_dir) -> list[dict]:
        """Infer every input; a failing input is logged and the others go on; raises DataError at the end naming
        the ones that failed. Returns the summaries."""
        output_dir = _writable(output_dir)
        inputs = [os.fspath(p) for p in inputs]
        stems = [Path(p).stem for p in inputs]
        twice = sorted({s for s in stems if stems.count(s) > 1})
        if twice:
            raise DataError(f"several inputs share the name {twice}: their outputs would collide; infer them separately")
        summaries, failed = [], []
        for path in inputs:
            try:
                summaries.append(self.infer(path, output_dir))
            except DataError as e:
                log.error("%s", e)
                failed.append(str(e))
        if failed:
            raise DataError(f"{len(failed)} of {len(inputs)} inputs failed:\n" + "\n".join(failed))
        return summaries

    def plan(self, path: str) -> Plan:
        """Open ``path``, choose its grid, compute its tissue mask and list the tiles that touch tissue."""
        reader, wsi = open_input(path, self.backend)
        is_tile = isinstance(wsi, _Tile)
        mpp = slide_mpp(path, reader, wsi) if not is_tile else None
        mpp = mpp or self.slide_mpp or (self.mpp if is_tile else None)
        if self.mpp is not None and mpp is None:
            raise DataError(f"{path}: the slide records no pixel size (mpp), needed to infer at the model's "
                            f"{self.mpp} um/px; state it with --slide_mpp <um per level-0 pixel>, or pass --mpp '$None' "
                            "to infer at level 0 as it is")
        grid = choose_grid(reader, wsi, mpp, self.mpp, self.mpp_tolerance)
        height0, width0 = (int(v) for v in reader.get_size(wsi, 0))
        mask, mask_ds = tissue_mask(reader, wsi, min(32.0, max(1.0, max(height0, width0) / 1024)))
        plan = Plan(path, reader, wsi, mpp, grid, mask, mask_ds, self.tile, self.margin)
        for ty in range(0, grid.height, self.tile):
            for tx in range(0, grid.width, self.tile):
                plan.total_tiles += 1
                r0, c0 = (int(v * grid.downsample / mask_ds) for v in (ty, tx))
                r1 = math.ceil(min(ty + self.tile, grid.height) * grid.downsample / mask_ds)
                c1 = math.ceil(min(tx + self.tile, grid.width) * grid.downsample / mask_ds)
                if mask[r0 : max(r1, r0 + 1), c0 : max(c1, c0 + 1)].any():
                    plan.tiles.append((ty, tx))
        return plan

    def loader(self, plan: Plan) -> torch.utils.data.DataLoader:
        workers = self.num_workers if plan.tiles else 0
        return torch.utils.data.DataLoader(TileDataset(plan, self.backend), batch_size=self.batch_size,
                                           num_workers=workers, prefetch_factor=4 if workers else None)

    def infer(self, path: str, output_dir: str | os.PathLike) -> dict:
        """Infer one slide or tile and write its five outputs (atomically, as a set); returns the summary."""
        start, output_dir, name = time.time(), Path(output_dir), Path(path).stem
        out = {key: output_dir / f"{name}{suffix}" for key, suffix in (
            ("labels", "_labels.tif"), ("probabilities", "_probabilities.npy"), ("geojson", ".geojson"),
            ("overlay", "_overlay.png"), ("summary", "_summary.json"))}
        if out["summary"].exists() and not self.overwrite:
            log.info("%s: done before (%s exists); pass --overwrite True to redo", path, out["summary"])
            return {"slide": path, "skipped": True}
        plan = self.plan(path)
        grid, f = plan.grid, self.prob_downsample
        if not plan.tiles:
            log.warning("%s: no tissue found; writing empty outputs (all labels %d)", path, NO_TISSUE)
        counts, windows_before = np.zeros(256, np.int64), self.windows.windows
        with contextlib.ExitStack() as stack:
            tmp = {key: stack.enter_context(atomic_output(p)) for key, p in reversed(out.items())}  # summary last
            fd, scratch = tempfile.mkstemp(dir=output_dir, prefix=f".{name}.", suffix=".labels.tmp")
            os.close(fd)
            labels = LabelStore(scratch, grid.height, grid.width)
            stack.callback(labels.close)
            probabilities = np.lib.format.open_memmap(
                tmp["probabilities"], "w+", np.float16, (len(self.classes), -(-grid.height // f), -(-grid.width // f)))
            self.network.eval()
            with torch.inference_mode():
                for batch in tqdm(self.loader(plan), desc=name, disable=not self.progress, unit="batch"):
                    image = batch["image"].to(self.device)
                    x = torch.cat([image[:, :3].float() / 255, image[:, 3:].float()], 1)
                    result = self.inferer(x, self.windows).float().cpu().numpy()
                    for b, index in enumerate(batch["tile"].tolist()):
                        self._write_tile(plan, plan.tiles[index], result[b], batch["image"][b, 3].numpy(), labels,
                                         probabilities, counts)
            probabilities.flush()
            reduced = np.where(probabilities.sum(0) > 0, np.asarray(probabilities).argmax(0), NO_TISSUE).astype(np.uint8)
            del probabilities
            write_pyramidal_tiff(tmp["labels"], labels, mpp=grid.mpp, compression="lzw", min_size=256,
                                 description=f"pathology_wsss labels: {', '.join(self.classes)}; {NO_TISSUE} = no tissue")
            height0, width0 = (int(v) for v in plan.reader.get_size(plan.wsi, 0))
            polygons = label_polygons(reduced, self.classes, f * grid.downsample, (width0, height0))
            write_json(tmp["geojson"], geojson(polygons, self.classes))
            thumbnail, _ = read_lowres(plan.reader, plan.wsi, max(1.0, max(height0, width0) / THUMBNAIL))
            overlay_png(tmp["overlay"], thumbnail, reduced, self.classes)
            summary = self._summary(plan, counts, len(polygons), time.time() - start, out, windows_before)
            write_json(tmp["summary"], summary)
        log.info("%s: %s", path, summary["message"])
        return summary

    @property
    def network(self) -> nn.Module:
        return self.windows.network

    def _write_tile(self, plan, origin, probs, tissue, labels, probabilities, counts) -> None:
        """Crop a tile's centre, label it (NO_TISSUE off the tissue mask) and write labels and reduced probabilities."""
        (ty, tx), grid, m, f = origin, plan.grid, self.margin, self.prob_downsample
        h, w = min(self.tile, grid.height - ty), min(self.tile, grid.width - tx)
        probs, tissue = probs[:, m : m + h, m : m + w], tissue[m : m + h, m : m + w].astype(bool)
        probs = probs * tissue
        label = np.where(tissue, probs.argmax(0), NO_TISSUE).astype(np.uint8)
        labels.write(ty, tx, label)
        counts += np.bincount(label.ravel(), minlength=256)
        rh, rw = -(-h // f), -(-w // f)
        padded = np.zeros((probs.shape[0], rh * f, rw * f), np.float32)
        padded[:, :h, :w] = probs
        area = np.zeros((rh * f, rw * f), np.float32)
        area[:h, :w] = 1
        block = padded.reshape(-1, rh, f, rw, f).sum((2, 4)) / area.reshape(rh, f, rw, f).sum((1, 3))
        probabilities[:, ty // f : ty // f + rh, tx // f : tx // f + rw] = block

    def _summary(self, plan: Plan, counts, n_polygons, seconds, out, windows_before) -> dict:
        grid = plan.grid
        tissue = int(counts[: len(self.classes)].sum())
        mm2 = None if grid.mpp is None else (grid.mpp / 1000) ** 2
        areas = {c: int(counts[i]) for i, c in enumerate(self.classes)}
        message = (f"{len(plan.tiles)} of {plan.total_tiles} tiles inferred, {tissue / 1e6:.2f} tissue MP in {seconds:.1f} s"
                   if plan.tiles else "no tissue found: empty outputs written")
        return {
            "slide": plan.path, "message": message, "classes": self.classes,
            "slide_mpp": plan.slide_mpp, "model_mpp": self.mpp, "level": grid.level,
            "level_downsample": grid.level_downsample, "downsample": grid.downsample,
            "resampled": abs(grid.scale - 1) > 1e-9, "grid_size": [grid.height, grid.width], "mpp": grid.mpp,
            "tiles_total": plan.total_tiles, "tiles_inferred": len(plan.tiles),
            "windows_inferred": self.windows.windows - windows_before, "tile_size": self.tile, "margin": self.margin,
            "class_pixels": areas, "tissue_pixels": tissue,
            "class_area_mm2": None if mm2 is None else {c: n * mm2 for c, n in areas.items()},
            "tissue_area_mm2": None if mm2 is None else tissue * mm2,
            "polygons": n_polygons, "probability_downsample": self.prob_downsample * grid.downsample,
            "seconds": round(seconds, 3), "outputs": {k: p.name for k, p in out.items()},
        }


def _writable(output_dir) -> Path:
    """The output folder, created; DataError when it cannot be written (checked before any slide is read)."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        raise DataError(f"{output_dir}: the output folder cannot be written ({e.strerror or e})") from e
    return output_dir
