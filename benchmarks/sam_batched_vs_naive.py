"""Pseudo-labels per second: one SAM encoding + one batched decoder call per image, against a naive loop that
re-encodes the image and decodes one prompt per call (what the original EP-SAM code did), on the same GlaS
images and prompts, in one process. Also the per-gland IoU when SAM is prompted with ground-truth gland boxes
(evaluation only: it checks the coordinate mapping, nothing is tuned on it).

So that it runs without a trained classifier, the "CAM" is a coarse colour map: the smoothed haematoxylin density
(glands are rims of dark nuclei) for "gland" and its complement for "non-gland"; only the number of prompts matters
for the speed.

    python benchmarks/sam_batched_vs_naive.py --images 8
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from skimage.color import rgb2hed
from skimage.filters import gaussian
from skimage.measure import regionprops

ROOT = Path(__file__).resolve().parents[1]
MIN_AREA = 1000  # glands at 20x cover >= ~1000 px; gives ~20 prompts per image, about twice the glands present
sys.path.insert(0, str(ROOT / "bundle"))

from scripts.atomic import atomic_output  # noqa: E402
from scripts.images import read_mask, read_rgb  # noqa: E402
from scripts.sam.masks import sam_pseudo_mask  # noqa: E402
from scripts.sam.model import load_sam  # noqa: E402
from scripts.sam.prompts import cam_prompts  # noqa: E402


def colour_cams(image: np.ndarray, sigma: float = 6.0) -> np.ndarray:
    """(2, H, W) stand-in CAMs (non-gland, gland) from the haematoxylin channel, scaled to [0, 1]."""
    h = gaussian(rgb2hed(image)[..., 0], sigma)
    lo, hi = np.percentile(h, [5, 95])
    gland = np.clip((h - lo) / max(hi - lo, 1e-8), 0, 1).astype(np.float32)
    return np.stack([1 - gland, gland])


def pseudo_label(sam, image, cams, prompts, batched: bool) -> tuple[np.ndarray, np.ndarray]:
    """SAM masks for all prompts, then the IDS filter and fusion; batched or one prompt (and encoding) at a time."""
    if batched:
        probs = sam.predict(sam.embed(image), prompts.boxes, prompts.points, prompts.labels).probs
    else:
        one = [slice(i, i + 1) for i in range(len(prompts))]
        probs = np.concatenate(
            [sam.predict(sam.embed(image), prompts.boxes[i], prompts.points[i], prompts.labels[i]).probs for i in one]
        )
    return sam_pseudo_mask(probs > 0.5, prompts.classes, cams, [1, 1])[0], probs


def gt_box_iou(sam, image, instances) -> list[float]:
    """IoU of SAM's mask with each ground-truth gland when prompted with that gland's box."""
    props = regionprops(instances)
    boxes = np.array([[p.bbox[0], p.bbox[1], p.bbox[2] - 1, p.bbox[3] - 1] for p in props], np.float32)
    probs = sam.predict(sam.embed(image), boxes=boxes).probs
    ious = []
    for p, prob in zip(props, probs):
        gt, pred = instances == p.label, prob > 0.5
        ious.append(float((gt & pred).sum() / (gt | pred).sum()))
    return ious


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "glas"))
    parser.add_argument("--images", type=int, default=8, help="first N training images of labels.csv")
    parser.add_argument("--backend", default="litemedsam")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "sam_batched_vs_naive.json"))
    args = parser.parse_args(argv)

    data = Path(args.data)
    with open(data / "labels.csv") as f:
        names = [r["name"] for r in csv.DictReader(f) if r["split"] == "train"][: args.images]
    sam = load_sam(args.backend, args.checkpoint, device=args.device, amp=True)
    sync = torch.cuda.synchronize if sam.device.type == "cuda" else (lambda: None)
    images = [read_rgb(data / "images" / f"{n}.png") for n in names]
    sam.embed(images[0])  # warm-up: first-call allocations are not part of either path

    seconds = {"batched": 0.0, "naive": 0.0}
    n_prompts, max_diff, same_pixels, ious = 0, 0.0, [], []
    for name, image in zip(names, images):
        cams = colour_cams(image)
        prompts = cam_prompts(cams, [1, 1], min_area=MIN_AREA, rng=0)
        results = {}
        for mode in ("batched", "naive"):  # interleaved, so load from other processes hits both alike
            sync()
            start = time.perf_counter()
            results[mode] = pseudo_label(sam, image, cams, prompts, batched=mode == "batched")
            sync()
            seconds[mode] += time.perf_counter() - start
        n_prompts += len(prompts)
        max_diff = max(max_diff, float(np.abs(results["batched"][1] - results["naive"][1]).max(initial=0)))
        same_pixels.append(float((results["batched"][0] == results["naive"][0]).mean()))
        ious += gt_box_iou(sam, image, read_mask(data / "masks_instance" / f"{name}.png"))
        print(f"{name}: {image.shape[1]}x{image.shape[0]}, {len(prompts)} prompts", flush=True)

    figures = {
        "backend": args.backend,
        "device": str(sam.device) if sam.device.type == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "images": len(names),
        "prompts": n_prompts,
        "pseudo_labels_per_s": {mode: len(names) / s for mode, s in seconds.items()},
        "seconds": seconds,
        "speedup": seconds["naive"] / seconds["batched"],
        "max_abs_prob_difference": max_diff,
        "identical_pseudo_mask_pixels": float(np.mean(same_pixels)),
        "gt_box_glands": len(ious),
        "gt_box_mean_iou_per_gland": float(np.mean(ious)),
    }
    print(json.dumps(figures, indent=1))
    print(f"batched is {figures['speedup']:.1f}x the naive loop (target >= 3x)")
    with atomic_output(args.output) as tmp:
        tmp.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
