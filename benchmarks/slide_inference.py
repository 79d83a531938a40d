"""Whole-slide inference throughput with each inference backend against a naive loop, label agreement between the
backends, and peak memory against slide area.

One run (about 4-6 minutes on 2 busy CPU cores, slide generation included):

    OMP_NUM_THREADS=1 python benchmarks/slide_inference.py [--work /tmp/wsss_bench] [--roi 128] [--device cpu] \
        [--checkpoint bundle/models/model.pt] [--backends torch onnxruntime openvino openvino:bf16] [--num-workers 1]

On a GPU (``--device cuda``) the backends to compare are ``torch`` (autocast, inference.json's default there) and
``torch:fp32``; give ``--num-workers`` inference.json's value for the machine's cores (4 from 16 cores).

1. Generates two synthetic pyramidal slides (JPEG tiles, 0.25 um/px, about 30 % tissue): 20480 x 20480 and a quarter
   of that area, 10240 x 10240 (kept in ``--work`` for reruns). The tissue is rendered by ``scripts.data.render`` at
   1 um/px and level 0 repeats each pixel 4 x 4, so the generation streams and stays within a few GB.
2. Infers the large slide at the model's 1 um/px (pyramid level 2, a 5120 x 5120 grid) with the bundle's network
   (FlexibleUNet + EfficientNet-Lite0; ``--checkpoint``'s weights, else random weights: speed does not depend on
   them), ``--roi`` windows (default 128, the demo's training patch size) with inference.json's overlap and windows
   per call, once per ``--backends`` entry (:func:`scripts.export.exported`: PyTorch, or the ONNX export in ONNX
   Runtime / OpenVINO; ``NAME:bf16`` is that backend at ``precision="bf16"``):
   (a) ours (:class:`scripts.wsi.inference.SlideInference`: tissue tiles only, DataLoader worker, batched Gaussian
   sliding window, all outputs written), timed after a warm-up inference of the small slide, as the second slide of a
   run is; (b) a naive loop over the same window grid (PyTorch): OpenSlide
   ``read_region`` per window, batch 1, every window of the slide, reading and network one after the other; (c) ours'
   reading alone (the DataLoader over the tissue tiles) and each backend's network alone (as many windows as ours
   inferred, random input). Throughput is tissue megapixels (at the inference grid) per second of wall time for all
   of them; each backend's labels are compared with PyTorch's on the tissue pixels.
3. A run over ``--run-slides`` slides (links to the large one) with the fastest backend, each slide's outputs written
   while the next slide is predicted (inference.json's ``overlap_writes``, the default) and one phase after the
   other: seconds per slide, as a user's run over many slides sees them.
4. Peak RSS of ours on each slide in a fresh subprocess (main process and DataLoader worker), for PyTorch and the
   fastest other backend.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
sys.path.insert(0, str(BUNDLE))

import tifffile  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402
from monai.networks.nets import FlexibleUNet  # noqa: E402

import scripts.seg.net  # noqa: E402,F401  (registers efficientnet-lite0)
from scripts.checkpoints import checkpoint_classes, load_network  # noqa: E402
from scripts.data.render import CLASSES, make_slide_array  # noqa: E402
from scripts.export import BACKENDS, PRECISIONS, exported  # noqa: E402
from scripts.wsi.inference import SlideInference  # noqa: E402
from scripts.wsi.pyramid_tiff import write_pyramidal_tiff  # noqa: E402

SLIDE_MPP, MODEL_MPP, RENDER_FACTOR, TISSUE = 0.25, 1.0, 4, 0.3


class Upsampled:
    """Level 0 of a benchmark slide: ``canvas`` with each pixel repeated ``factor`` x ``factor``, built per block
    when the TIFF writer asks (never the whole level in memory)."""

    dtype = np.dtype(np.uint8)

    def __init__(self, canvas: np.ndarray, factor: int):
        self.canvas, self.factor = canvas, factor
        self.shape = (canvas.shape[0] * factor, canvas.shape[1] * factor, 3)

    def __getitem__(self, index):
        rows, cols = index
        ys = np.arange(*rows.indices(self.shape[0])) // self.factor
        xs = np.arange(*cols.indices(self.shape[1])) // self.factor
        return self.canvas[ys[:, None], xs[None, :]]


def make_slide(path: Path, size: int, seed: int) -> Path:
    if not path.exists():
        start = time.time()
        canvas, _ = make_slide_array(
            np.random.default_rng(seed), size // RENDER_FACTOR, size // RENDER_FACTOR, tissue_fraction=TISSUE, scale=0.5
        )
        write_pyramidal_tiff(
            path,
            Upsampled(canvas, RENDER_FACTOR),
            mpp=SLIDE_MPP,
            quality=80,
            description=f"synthetic benchmark slide {size} x {size}",
        )
        print(
            f"generated {path.name} ({size} x {size}, {path.stat().st_size / 1e6:.0f} MB) "
            f"in {time.time() - start:.0f} s",
            flush=True,
        )
    return path


def network(device, checkpoint: str | None) -> torch.nn.Module:
    """The bundle's network with ``checkpoint``'s weights, or seeded random ones."""
    torch.manual_seed(0)
    net = FlexibleUNet(3, len(checkpoint_classes(checkpoint) or CLASSES), "efficientnet-lite0", pretrained=False)
    net = load_network(net, checkpoint, "segmentation model") if checkpoint else net
    return net.to(device).eval()


def ours(device, roi: int, backend: str = "torch", checkpoint: str | None = None, num_workers: int = 1):
    """Slide inference with the input scaling and activation of the bundle's inference.json, the network run by
    ``backend`` (``NAME`` or ``NAME:PRECISION``) as inference.json's ``slide_inference#network`` runs it. On CUDA,
    ``torch`` autocasts (inference.json's ``amp``, on by default there) and ``torch:fp32`` does not."""
    config = ConfigParser(ConfigParser.load_config_file(BUNDLE / "configs" / "inference.json"))
    config["roi_size"] = [roi, roi]
    name, _, precision = backend.partition(":")
    return SlideInference(
        exported(network(device, checkpoint), checkpoint, name, (roi, roi), precision=precision or "fp32"),
        config.get_parsed_content("inferer"),  # its windows per call and overlap
        checkpoint_classes(checkpoint) or CLASSES,
        config.get_parsed_content("scale_intensity"),
        config.get_parsed_content("activation"),
        device=device,
        mpp=MODEL_MPP,
        num_workers=num_workers,
        amp=device.type == "cuda" and precision != "fp32",
        progress=False,
        overwrite=True,
    )


def naive(path: Path, si: SlideInference, limit: int | None) -> tuple[float, int, int]:
    """OpenSlide read_region + network, one window at a time, over the whole grid ours uses (same window positions).
    Returns seconds for the windows done (all, and reading), windows done, windows in the grid."""
    import openslide

    slide = openslide.OpenSlide(str(path))
    plan_grid = si.plan(str(path)).grid
    level, ds = plan_grid.level, plan_grid.level_downsample
    roi = si.roi
    stride = roi - 2 * si.margin
    ys = range(-si.margin, plan_grid.height - si.margin, stride)
    xs = range(-si.margin, plan_grid.width - si.margin, stride)
    windows = [(y, x) for y in ys for x in xs]
    done = windows[:limit] if limit else windows
    net, reading = naive_network(si), 0.0
    start = time.time()
    with torch.inference_mode():
        for y, x in done:
            read_start = time.time()
            region = slide.read_region((int(x * ds), int(y * ds)), level, (roi, roi)).convert("RGB")
            image = torch.from_numpy(np.asarray(region).copy()).permute(2, 0, 1)[None].float().div(255).to(si.device)
            reading += time.time() - read_start
            with torch.autocast(si.device.type, enabled=si.device.type == "cuda"):
                torch.softmax(net(image).float(), 1).argmax(1).cpu()
    return time.time() - start, reading, len(done), len(windows)


def naive_network(si: SlideInference) -> torch.nn.Module:
    """The same weights in the default memory layout (ours, with the torch backend, converts its copy to
    channels-last)."""
    torch.manual_seed(0)
    net = FlexibleUNet(3, len(si.classes), "efficientnet-lite0", pretrained=False).to(si.device).eval()
    net.load_state_dict(si.network.state_dict())
    return net


def reading_only(si: SlideInference, path: Path) -> float:
    plan = si.plan(str(path))
    start = time.time()
    for _ in si.loader(plan):
        pass
    return time.time() - start


def network_only(si: SlideInference, windows: int) -> float:
    batch = si.model.inferer.sw_batch_size
    x = torch.rand(batch, 3, si.roi, si.roi, device=si.device)
    with torch.inference_mode():
        si.network(x)  # warm-up: a runtime's first call allocates
        start = time.time()
        for i in range(0, windows, batch):
            with torch.autocast(si.device.type, enabled=si.model.amp):
                torch.softmax(si.network(x[: min(batch, windows - i)]).float(), 1).cpu()
    return time.time() - start


def agreement(summary: dict, reference: dict, out: Path, reference_out: Path) -> float:
    """The fraction of tissue pixels (PyTorch's label not 255) that two runs' label TIFFs label alike."""
    ours_labels = tifffile.imread(out / summary["outputs"]["labels"], level=0)
    theirs = tifffile.imread(reference_out / reference["outputs"]["labels"], level=0)
    tissue = theirs != 255
    return float((ours_labels[tissue] == theirs[tissue]).mean())


def run_of_slides(si: SlideInference, large: Path, work: Path, count: int, overlap: bool) -> float:
    """Seconds per slide of one run over ``count`` links to ``large`` (names must differ: they name the outputs)."""
    paths = []
    for i in range(count):
        link = work / f"run_{i}.tif"
        link.unlink(missing_ok=True)
        link.symlink_to(large.name)
        paths.append(link)
    si.overlap_writes = overlap
    start = time.time()
    si(paths, work / f"run_overlap_{overlap}")
    return (time.time() - start) / count


def rss_child(path: str, out: str, device: str, roi: int, backend: str, checkpoint: str | None, workers: int) -> None:
    """One inference in this process; prints peak RSS (MB) of this process and of its DataLoader worker.

    This process's peak is VmHWM: ``ru_maxrss`` survives exec on Linux, so it would report the parent's peak (the
    slide generation) whenever that is higher."""
    ours(torch.device(device), roi, backend, checkpoint, workers)([path], out)
    status = Path("/proc/self/status").read_text()
    own = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"main_mb": round(own, 1), "worker_mb": round(worker, 1)}))


def peak_rss(args, path: Path, out: Path, backend: str) -> dict:
    command = [sys.executable, __file__, "--device", args.device, "--roi", str(args.roi), "--backends", backend]
    command += ["--num-workers", str(args.num_workers)]
    command += ["--checkpoint", args.checkpoint] if args.checkpoint else []
    command += ["--rss-child", str(path), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    child = subprocess.run(command, capture_output=True, text=True, env=env)
    if child.returncode:
        raise SystemExit(child.stderr[-3000:])
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    installed = [b for b in BACKENDS if b == "torch" or importlib.util.find_spec(b)]
    choices = [*BACKENDS, "torch:fp32", *(f"{b}:{p}" for b in BACKENDS for p in PRECISIONS if p != "fp32")]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/wsss_bench")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--roi", type=int, default=128, help="the network's input (window) size")
    parser.add_argument("--checkpoint", default=None, help="a trained model.pt (default: random weights)")
    parser.add_argument("--backends", nargs="+", default=installed, choices=choices, help="the first is the baseline")
    parser.add_argument("--run-slides", type=int, default=3, help="slides in the run of (3); 0: skip it")
    parser.add_argument("--naive-windows", type=int, default=None, help="time the naive loop on this many windows only")
    parser.add_argument("--num-workers", type=int, default=1, help="tile-reading DataLoader workers")
    parser.add_argument("--rss-child", nargs=2, metavar=("SLIDE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.rss_child:
        return rss_child(*args.rss_child, args.device, args.roi, args.backends[0], args.checkpoint, args.num_workers)
    started, device, work = time.time(), torch.device(args.device), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    large, small = make_slide(work / "large.tif", 20480, 1), make_slide(work / "small.tif", 10240, 2)

    runs = {}
    for backend in args.backends:
        si = ours(device, args.roi, backend, args.checkpoint, args.num_workers)
        si([small], work / f"warm_{backend}")  # warm-up, as in a run over many slides: the runtime's first calls
        start = time.time()
        summary = si([large], work / f"out_{backend}")[0]
        runs[backend] = {"si": si, "summary": summary, "path": time.time() - start}
        runs[backend]["network"] = network_only(si, summary["windows_inferred"])
    base = args.backends[0]
    summary, si = runs[base]["summary"], runs[base]["si"]
    tissue_mp = summary["tissue_pixels"] / 1e6
    t_read = reading_only(si, large)
    t_naive, t_naive_read, done, total = naive(
        large,
        runs["torch"]["si"] if "torch" in runs else ours(device, args.roi, "torch", args.checkpoint, args.num_workers),
        args.naive_windows,
    )
    t_naive_all = t_naive * total / done
    fastest = min(runs, key=lambda b: runs[b]["path"])
    per_slide = {
        overlap: run_of_slides(runs[fastest]["si"], large, work, args.run_slides, overlap)
        for overlap in (True, False)
        if args.run_slides
    }
    rss = {
        (backend, name): peak_rss(args, path, work / f"rss_{backend}_{name}", backend)
        for backend in dict.fromkeys([base, fastest])
        for name, path in (("small", small), ("large", large))
    }

    grid = summary["grid_size"]
    rate = lambda seconds: tissue_mp / seconds  # noqa: E731
    print(
        f"\nslide {large.name}: 20480 x 20480 at {SLIDE_MPP} um/px; inference grid {grid[0]} x {grid[1]} (level "
        f"{summary['level']}, {summary['mpp']} um/px); tissue {tissue_mp:.2f} MP "
        f"({100 * tissue_mp / (grid[0] * grid[1] / 1e6):.0f} % of the grid); device {device}, "
        f"{torch.get_num_threads()} torch thread(s); windows {si.roi} px, overlap {si.model.inferer.overlap}, "
        f"{si.model.inferer.sw_batch_size} per call; "
        f"weights: {args.checkpoint or 'random'}"
    )
    print(
        f"tiles inferred {summary['tiles_inferred']} of {summary['tiles_total']}, "
        f"windows {summary['windows_inferred']} of {total}"
    )
    print(
        f"{'backend':12s} {'(a) ours s':>10s} {'MP/s':>7s} {'network s':>10s} {'MP/s':>7s} {'ours/network':>12s} "
        f"{'ours/' + base:>12s} {'labels = ' + base:>14s}"
    )
    for backend, run in runs.items():
        same = agreement(run["summary"], summary, work / f"out_{backend}", work / f"out_{base}")
        print(
            f"{backend:12s} {run['path']:10.1f} {rate(run['path']):7.3f} {run['network']:10.1f} "
            f"{rate(run['network']):7.3f} {run['network'] / run['path']:12.2f} "
            f"{runs[base]['path'] / run['path']:12.2f} {100 * same:13.3f}%"
        )
    note = "" if done == total else f"  (timed on {done} of {total} windows, extrapolated)"
    print(f"(b) naive (torch)       {t_naive_all:7.1f} s  {rate(t_naive_all):6.3f} tissue MP/s{note}")
    speedup = t_naive_all / runs[base]["path"]
    print(f"    of which reading {100 * t_naive_read / t_naive:.0f} %; speed-up (a, {base})/(b) {speedup:.2f} x")
    print(f"(c) reading only        {t_read:7.1f} s  {rate(t_read):6.3f} tissue MP/s")
    if per_slide:
        network_s = runs[fastest]["network"]
        print(
            f"(d) a run of {args.run_slides} slides, {fastest}: "
            + "; ".join(
                f"{what} {per_slide[overlap]:.1f} s a slide, {rate(per_slide[overlap]):.3f} tissue MP/s, "
                f"ours/network {network_s / per_slide[overlap]:.2f}"
                for overlap, what in ((False, "phases one after the other"), (True, "written while the next predicts"))
            )
        )
    for backend in dict.fromkeys([base, fastest]):
        small_mb, large_mb = rss[backend, "small"], rss[backend, "large"]
        print(
            f"peak RSS main process, {backend}: small {small_mb['main_mb']:.0f} MB, large (4x area) "
            f"{large_mb['main_mb']:.0f} MB, ratio {large_mb['main_mb'] / small_mb['main_mb']:.3f}; "
            f"DataLoader worker: {small_mb['worker_mb']:.0f} / {large_mb['worker_mb']:.0f} MB"
        )
    print(f"whole run {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
