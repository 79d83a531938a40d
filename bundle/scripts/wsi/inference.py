"""Whole-slide inference at the model's magnification, tissue only, with memory bounded by the tile size.

Why not ``PatchInferer`` + ``WSISlidingWindowSplitter`` + ``AvgMerger``: the merger holds the whole level's float
output in RAM (it grows with the slide; ``ZarrAvgMerger`` needs zarr, which is not a requirement), the mergers
average windows without Gaussian weights, windows skipped by the splitter's filter leave NaN, and the splitter reads
patch after patch in the calling thread, so reading never overlaps compute. The equivalent MONAI path used here runs
in three phases, each testable alone:

1. plan (:mod:`scripts.wsi.plan`): the inference grid at the model's ``mpp``, cut into tiles whose windows all lie on
   one global sliding-window grid, and the tiles that touch the low-resolution tissue mask;
2. predict (:mod:`scripts.wsi.predict`): those tiles, read by ``DataLoader`` workers so that reading overlaps the
   network, through MONAI's ``SlidingWindowInferer`` (Gaussian blending) on the windows that hold tissue; each
   tile's centre goes straight to disk (labels and reduced probabilities, plain writes: no memory map);
3. write (:mod:`scripts.wsi.outputs`): the pyramidal label TIFF, GeoJSON, overlay and summary made from those.
   Over several slides this phase runs in a thread while the next slide is predicted (``overlap_writes``): it is
   NumPy, GEOS and compression work, which the network phase leaves idle on a fast backend. At most one slide is
   written at a time, so at most two slides' scratch files exist.

Failures: before any tile of a slide is read its outputs' disk space is checked (the output folder's is checked once,
before the first slide); everything of a slide is made in one hidden folder, ``.NAME.partial/``, moved into place when
the slide is done and removed otherwise (a re-run removes what a killed run left); a full disk is a one-line error
naming the output, a NaN network output one naming the checkpoint. A failing input is logged and the others go on;
the run then ends with a DataError "N of M inputs failed" listing each failed input and why.

The input scaling and the activation are not defined here: they are the config's ``scale_intensity`` and
``activation``, the same items MONAI Label's ``preprocessing`` and ``postprocessing`` apply, so the two paths cannot
drift apart. Labels are the activation's argmax (as ``postprocessing``'s ``AsDiscreted``), 255 where there is no
tissue (as in the demo slide's mask). Plain tiles (PNG/JPEG) go through the same code as one-level slides.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from ..atomic import writable_folder
from ..checkpoints import load_network
from ..constants import NO_TISSUE
from ..errors import DataError
from .outputs import (
    LabelStore,
    ProbabilityStore,
    check_free_space,
    disk_needs,
    output_paths,
    partial_outputs,
    reduced_labels,
    remove_leftovers,
    slide_summary,
    write_json,
    write_maps,
)
from .plan import SLIDE_SUFFIXES, TILE_SUFFIXES, Plan, TileDataset, plan_slide, tiling
from .predict import TileModel, predict

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ inputs


def find_inputs(input=None, input_dir=None) -> list[str]:
    """Slides and tiles to infer, sorted, duplicates removed.

    Args:
        input: a path, a glob, a folder, or a list of them.
        input_dir: a folder: its files with a slide or tile suffix.

    Returns:
        The paths (a missing file is kept, and reported when its turn comes).
    """
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
                suffixes = ", ".join(SLIDE_SUFFIXES + TILE_SUFFIXES)
                raise DataError(f"{spec}: no slides or tiles ({suffixes}) in the folder")
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
    single process). The process group's rank is used when one is initialised, else torchrun's environment.

    Args:
        items: the whole list (the same in every process).

    Returns:
        This rank's items.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return list(items)[rank::world]


def load_weights(network: nn.Module, path, device) -> nn.Module:
    """Load a state-dict checkpoint; ``path=None`` keeps the random weights (development only, said in the log).
    A checkpoint holding NaN or infinite weights is refused (it would label every pixel one class).

    Args:
        network: the network to load into.
        path: the checkpoint file, or None.
        device: where to map the checkpoint's tensors.

    Returns:
        ``network``, loaded.
    """
    if path is None:
        log.warning("no checkpoint (ckpt_path=None): running a randomly initialised network")
        return network
    if not os.path.isfile(path):
        raise DataError(
            f"{path}: model checkpoint not found; train first, or pass --ckpt_path '$None' to run a "
            "randomly initialised network (development only)"
        )
    network = load_network(network, path, "segmentation model", device)
    broken = [
        key
        for key, value in network.state_dict().items()
        if value.is_floating_point() and not torch.isfinite(value).all()
    ]
    if broken:
        raise DataError(
            f"{path}: the segmentation model checkpoint holds NaN or infinite weights ({len(broken)} "
            f"tensors, e.g. {broken[0]}): its training diverged; use an earlier checkpoint or retrain"
        )
    return network


# ------------------------------------------------------------------------------------------- inference


class SlideInference:
    """Whole-slide inference over a list of slides/tiles in three phases (see the module docstring); the config's
    ``slide_inference``.

    Args:
        network: the segmentation network (logits), e.g. the config's ``network`` wrapped for test-time augmentation.
        inferer: the config's ``SlidingWindowInferer``; its ``roi_size`` and ``overlap`` set the tiling.
        classes: the class names, in label order.
        scale_intensity: a dictionary transform on key ``"image"`` scaling the uint8 RGB for the network: the
            config's ``scale_intensity``, which MONAI Label's ``preprocessing`` also applies.
        activation: logits (B x C x h x w) to per-class probabilities, kept as the probability maps; the labels are
            their argmax. The config's ``activation``, which MONAI Label's ``postprocessing`` also applies.
        device: where the network runs.
        mpp: the model's pixel size in micrometres (None: level 0 as it is).
        slide_mpp: the pixel size of slides that record none (a recorded one wins).
        mpp_tolerance: a pyramid level within this ratio of ``mpp`` is used as it is; otherwise the grid is resampled.
        backend: the slide reader's backend (``"cucim"`` or ``"openslide"``).
        tile_size: the tile side in grid pixels, rounded to a whole number of window strides and of
            ``prob_downsample``.
        batch_size: tiles per batch.
        num_workers: DataLoader workers reading tiles (0: read in this process).
        prob_downsample: the probability map's reduction relative to the grid.
        amp: autocast the network (CUDA only).
        progress: show a progress bar per slide.
        overwrite: redo slides whose summary exists.
        overlap_writes: write a slide's outputs in a thread while the next slide is predicted (False: one after
            the other, e.g. to time the phases apart).
        checkpoint: the checkpoint the network's weights come from (None: random weights), named by the error on a
            NaN network output.
    """

    def __init__(
        self,
        network: nn.Module,
        inferer,
        classes,
        scale_intensity: Callable,
        activation: Callable,
        device="cpu",
        mpp: float | None = 0.5,
        slide_mpp: float | None = None,
        mpp_tolerance: float = 0.1,
        backend: str = "cucim",
        tile_size: int = 1024,
        batch_size: int = 2,
        num_workers: int = 1,
        prob_downsample: int = 8,
        amp: bool = False,
        progress: bool = True,
        overwrite: bool = False,
        overlap_writes: bool = True,
        checkpoint: str | os.PathLike | None = None,
    ):
        if mpp is not None and not mpp > 0 or slide_mpp is not None and not slide_mpp > 0:
            raise DataError(f"mpp and slide_mpp must be positive (or None), got mpp={mpp}, slide_mpp={slide_mpp}")
        if prob_downsample < 1 or tile_size < 1 or batch_size < 1 or num_workers < 0:
            raise DataError("prob_downsample, tile_size and batch_size must be >= 1 and num_workers >= 0")
        self.classes, self.device = list(classes), torch.device(device)
        self.roi, self.margin, self.tile = tiling(inferer.roi_size, inferer.overlap, tile_size, prob_downsample)
        self.model = TileModel(
            network, inferer, scale_intensity, activation, len(self.classes), amp and self.device.type == "cuda"
        )
        self.mpp, self.slide_mpp, self.mpp_tolerance = mpp, slide_mpp, mpp_tolerance
        self.backend, self.batch_size, self.num_workers = backend, batch_size, num_workers
        self.prob_downsample, self.progress, self.overwrite = prob_downsample, progress, overwrite
        self.overlap_writes = overlap_writes
        self.network_name = os.fspath(checkpoint) if checkpoint else "the network (no checkpoint: random weights)"

    def __call__(self, inputs, output_dir) -> list[dict]:
        """Infer every input; a failing input is logged (with its traceback when it is not a DataError) and the others
        go on. The output folder is checked before the first input is read.

        Args:
            inputs: slide and tile paths (their names must differ: they name the outputs).
            output_dir: the output folder, created if needed.

        Returns:
            The slides' summaries, when all succeeded.

        Raises:
            DataError: at the end, after every other input is done: "N of M inputs failed:", then a line per failed
                input, its path and why. The error's ``failed`` attribute maps those paths to the reasons, its
                ``summaries`` holds the summaries of the others.
        """
        output_dir = writable_folder(output_dir)
        inputs = [os.fspath(p) for p in inputs]
        stems = [Path(p).stem for p in inputs]
        twice = sorted({s for s in stems if stems.count(s) > 1})
        if twice:
            raise DataError(
                f"several inputs share the name {twice}: their outputs would collide; infer them separately"
            )
        summaries, failed = [], {}

        def attempt(path: str, step: Callable, *args):
            """``step(*args)``, or None with the failure logged and recorded against ``path``."""
            try:
                return step(*args)
            except DataError as e:
                log.error("%s", e)
                failed[path] = str(e)
            except Exception as e:  # anything else: this input's traceback in the log, the others go on
                log.exception("%s: failed", path)
                failed[path] = f"{type(e).__name__}: {e}"

        def finish(writing) -> None:
            summary = attempt(writing[0], writing[1].result) if writing else None
            if summary is not None:
                summaries.append(summary)

        with ThreadPoolExecutor(1, thread_name_prefix="slide-outputs") as writer:
            writing = None  # (path, future) of the slide whose outputs are being written
            for path in inputs:
                write = attempt(path, self.predict_slide, path, output_dir)
                finish(writing)
                writing = None if write is None else (path, writer.submit(write))
                if not self.overlap_writes:
                    finish(writing)
                    writing = None
            finish(writing)
        skipped = sum(bool(s.get("skipped")) for s in summaries)
        log.info(
            "%d inputs: %d inferred, %d done before, %d failed",
            len(inputs),
            len(summaries) - skipped,
            skipped,
            len(failed),
        )
        if failed:
            lines = [reason if reason.startswith(path) else f"{path}: {reason}" for path, reason in failed.items()]
            error = DataError(f"{len(failed)} of {len(inputs)} inputs failed:\n" + "\n".join(lines))
            error.failed, error.summaries = failed, summaries
            raise error
        return summaries

    @property
    def network(self) -> nn.Module:
        return self.model.network

    def plan(self, path: str) -> Plan:
        """Phase 1 (:func:`scripts.wsi.plan.plan_slide`) with this inference's tiling and pixel sizes."""
        return plan_slide(
            path,
            tile=self.tile,
            margin=self.margin,
            model_mpp=self.mpp,
            slide_mpp=self.slide_mpp,
            mpp_tolerance=self.mpp_tolerance,
            backend=self.backend,
        )

    def loader(self, plan: Plan) -> torch.utils.data.DataLoader:
        """The plan's tissue tiles, batched, read by ``num_workers`` workers."""
        workers = self.num_workers if plan.tiles else 0
        return torch.utils.data.DataLoader(
            TileDataset(plan, self.backend),
            batch_size=self.batch_size,
            num_workers=workers,
            prefetch_factor=4 if workers else None,
        )

    def infer(self, path: str, output_dir: str | os.PathLike) -> dict:
        """Infer one slide or tile and write its five outputs (as a set: all or none, see
        :func:`scripts.wsi.outputs.partial_outputs`); returns the summary."""
        return self.predict_slide(path, output_dir)()

    def predict_slide(self, path: str, output_dir: str | os.PathLike) -> Callable[[], dict]:
        """Phases 1 and 2 of one slide or tile; returns phase 3, which writes the outputs and returns the summary (it
        may run in another thread). Until it has run, the slide's partial outputs stay open; if it is never called
        they are left for the next run to remove.

        The free disk space is checked (:func:`scripts.wsi.outputs.disk_needs`) before any tile is read."""
        start, output_dir, name = time.time(), Path(output_dir), Path(path).stem
        out = output_paths(output_dir, name)
        with contextlib.suppress(DataError):  # a live run writing this slide keeps its files
            remove_leftovers(output_dir, name)  # what a killed run left, even of a slide that is done
        if out["summary"].exists() and not self.overwrite:
            log.info("%s: done before (%s exists); pass --overwrite True to redo", path, out["summary"])
            return lambda: {"slide": path, "skipped": True}
        plan = self.plan(path)
        grid, f = plan.grid, self.prob_downsample
        shape = (len(self.classes), -(-grid.height // f), -(-grid.width // f))
        check_free_space(output_dir, path, disk_needs(grid.height, grid.width, len(self.classes), f))
        if not plan.tiles:
            log.warning("%s: no tissue found; writing empty outputs (all labels %d)", path, NO_TISSUE)
        windows_before = self.model.windows
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(partial_outputs(output_dir, name, path))
            labels = stack.enter_context(LabelStore(tmp["scratch"], grid.height, grid.width))
            probabilities = stack.enter_context(ProbabilityStore(tmp["probabilities"], shape))
            self.network.eval()
            counts = predict(
                plan,
                self.loader(plan),
                self.model,
                labels,
                probabilities,
                f,
                self.device,
                self.progress,
                self.network_name,
            )
            windows, outputs = self.model.windows - windows_before, stack.pop_all()

        def write() -> dict:
            with outputs:
                reduced = reduced_labels(probabilities, band=max(1, plan.tile // f))
                probabilities.close()
                polygons = write_maps(tmp, plan, labels, reduced, self.classes, f)
                labels.close()  # the scratch file's space back before the next slide
                summary = slide_summary(
                    plan,
                    self.classes,
                    counts,
                    model_mpp=self.mpp,
                    prob_downsample=f,
                    windows=windows,
                    polygons=polygons,
                    seconds=time.time() - start,
                    outputs=out,
                )
                write_json(tmp["summary"], summary)
            log.info("%s: %s", path, summary["message"])
            return summary

        return write
