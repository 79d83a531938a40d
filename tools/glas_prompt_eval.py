"""GlaS dev glands segmented from prompts (issue 18's acceptance): LiteMedSAM zero-shot, stage 2's fine-tuned mask
decoder, and WSI-SAM checkpoints (e.g. with and without the LR view), each given the same prompts made from the
ground-truth gland instances: the tight box, the box with each edge moved by up to ``--jitter`` of its side (a
human's box), and 3 / 5 / 10 positive points drawn inside the gland.

    python tools/glas_prompt_eval.py --datalist data/glas/datalist.json \\
        --decoder bundle/pseudo_labels/sam_decoder_iter3.pt \\
        --multires wsi_sam=OUT/multires_sam.pt hr_only=OUT/multires_sam_hr.pt --output OUT/prompt_eval.json

Scores per model and prompt: mean Dice and IoU over all glands (each prompt's mask, probability > 0.5, against its
gland), and the OEEM mIoU of the images (gland = the union of the masks, summed over images). Ground truth is read
only to make the prompts and to score: no model here was trained or chosen on it. Each image is encoded once per view
for every model (they share the frozen LiteMedSAM encoder).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bundle"))

from monai.data import load_decathlon_datalist  # noqa: E402
from skimage.measure import regionprops  # noqa: E402

from scripts.checkpoints import read_state  # noqa: E402
from scripts.images import read_mask  # noqa: E402
from scripts.sam.model import Embedding, load_sam  # noqa: E402
from scripts.sam.multires import MultiResSAM, Region, load_multires  # noqa: E402
from scripts.sam.multires_train import RegionReader, move_box_edges, points_inside  # noqa: E402
from scripts.seg.metrics import confusion_matrix, scores  # noqa: E402

POINTS = (3, 5, 10)


def gland_prompts(instances: np.ndarray, rng: np.random.Generator, jitter: float) -> tuple[dict, np.ndarray]:
    """Per gland instance: ``{"box", "jittered box", "3 points", ...}`` as (boxes, points, labels), and the targets."""
    glands = regionprops(instances)
    boxes = np.array([[r.bbox[0], r.bbox[1], r.bbox[2] - 1, r.bbox[3] - 1] for r in glands], np.float64)
    moved = move_box_edges(boxes, rng.uniform(-jitter, jitter, boxes.shape), instances.shape)
    prompts = {"box": (boxes, None, None), "jittered box": (moved, None, None)}
    for k in POINTS:
        points = np.stack([points_inside(r.coords, rng, k) for r in glands])
        prompts[f"{k} points"] = (None, points.astype(np.float64), np.ones((len(glands), k), np.int64))
    return prompts, np.stack([instances == r.label for r in glands])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datalist", required=True, help="GlaS datalist; its validation images are scored")
    ap.add_argument("--instances", default=str(ROOT.parent / "shared/data/glas/masks_instance"), help="instance masks")
    ap.add_argument("--decoder", help="stage 2's fine-tuned mask decoder (sam_decoder_iter<k>.pt)")
    ap.add_argument("--multires", nargs="*", default=[], help="NAME=PATH WSI-SAM checkpoints")
    ap.add_argument("--jitter", type=float, default=0.1, help="box edges move by up to this fraction of the side")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, help="score only the first N images")
    ap.add_argument("--output", help="write the scores as JSON")
    args = ap.parse_args()

    sam = load_sam("litemedsam")
    models = {"LiteMedSAM zero-shot": sam}
    if args.decoder:
        tuned = copy.deepcopy(sam)
        tuned.mask_decoder.load_state_dict(read_state(args.decoder, "SAM mask decoder"))
        models["fine-tuned decoder"] = tuned
    multires = {}
    for spec in args.multires:
        name, path = spec.split("=", 1)
        multires[name] = models[name] = load_multires(sam, "litemedsam", path)
    encoder = next(iter(multires.values()), None) or MultiResSAM(sam, "litemedsam")  # encode() is the frozen SAM's
    use_lr = any(m.use_lr for m in multires.values())

    images = sorted({e["image"] for e in load_decathlon_datalist(args.datalist, False, "validation")})
    images = images[: args.limit] if args.limit else images
    read, rng = RegionReader(), np.random.default_rng(args.seed)
    dice, iou, cms = {}, {}, {}
    start = time.perf_counter()
    for path in images:
        instances = read_mask(str(Path(args.instances) / Path(path).name))
        hr_image, window, lr_image = read({"image": path})
        lr = encoder.encode(lr_image, window.context()) if use_lr else None
        region = Region(encoder.encode(hr_image, window), lr)
        prompts, targets = gland_prompts(instances, rng, args.jitter)
        truth = (instances > 0).astype(np.int64)
        for name, model in models.items():
            for kind, (boxes, points, labels) in prompts.items():
                if name in multires:
                    probs = model.predict(region, boxes, points, labels).probs
                else:
                    probs = model.predict(Embedding(region.hr.features, region.hr.frame), boxes, points, labels).probs
                masks = probs > 0.5
                inter = (masks & targets).sum((1, 2))
                total = masks.sum((1, 2)) + targets.sum((1, 2))
                key = (name, kind)
                dice.setdefault(key, []).extend(2 * inter / np.maximum(total, 1))
                iou.setdefault(key, []).extend(inter / np.maximum(total - inter, 1))
                cms[key] = cms.get(key, 0) + confusion_matrix(masks.any(0).astype(np.int64), truth, 2)
    seconds = time.perf_counter() - start

    rows = [
        {
            "model": name,
            "prompt": kind,
            "dice": float(np.mean(dice[name, kind])),
            "iou": float(np.mean(iou[name, kind])),
            "miou": float(scores(cms[name, kind])["miou"]),
        }
        for name, kind in dice
    ]
    glands = len(dice[next(iter(dice))])
    print(f"{len(images)} GlaS dev images, {glands} glands, {seconds:.0f} s\n")
    print("| model | prompt | gland Dice | gland IoU | image mIoU |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['prompt']} | {r['dice']:.4f} | {r['iou']:.4f} | {r['miou']:.4f} |")
    if args.output:
        report = {"images": len(images), "glands": glands, "seconds": seconds, "rows": rows, "args": vars(args)}
        Path(args.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
