"""GlaS acceptance of the MIL pseudo-masks (``mil_pseudo_label.json``): mIoU of the training images' masks against their
ground truth, for one or more runs' output folders (e.g. ``label_with`` student and teacher), with the protocol of
``glas_pseudo_eval.py`` so the rows compare with its CAM rows:

- ``miou``: ignore (255) pixels take the MIL map's arg-max over the tagged classes (every pixel labelled);
- ``miou_argmax``: that arg-max alone (no threshold);
- ``miou_labelled`` and ``labelled``: ignore pixels left out, and the fraction labelled (what stage 3 learns from).

``--dev NAME=CHECKPOINT ...`` also scores MIL networks on the dev patches as the MIL literature scores gland patches:
the gland map (fused, smoothed, > 0.5) of each whole dev image cut to the datalist's patches; over the patches tagged
gland, the mean gland F1 (Dice) and Hausdorff distance between the boundaries (px; the patch edge bounds a region
that reaches it; a patch with no predicted gland counts its diagonal), over the untagged ones the mean F1 of the
non-gland class.

    python tools/glas_mil_eval.py --datalist GLAS_DATALIST OUT_STUDENT OUT_TEACHER \
        [--dev teacher=OUT/models/mil_teacher_best.pt student=OUT/models/mil_student_best.pt] [--mil_input_size 224]

Ground truth is read here only, to score; the MIL stage never sees it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from skimage.metrics import hausdorff_distance
from skimage.segmentation import find_boundaries

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bundle"))

from monai.data import load_decathlon_datalist  # noqa: E402

from scripts.checkpoints import load_network  # noqa: E402
from scripts.constants import IGNORE  # noqa: E402
from scripts.data.datalist import read_classes  # noqa: E402
from scripts.images import read_mask, read_rgb  # noqa: E402
from scripts.mil.masks import FusedMaps, MILOutputs  # noqa: E402
from scripts.sam.outputs import patch_size, pseudo_items  # noqa: E402
from scripts.seg.metrics import confusion_matrix as confusion  # noqa: E402
from scripts.seg.metrics import scores  # noqa: E402


def evaluate(datalist: str, output_dir: str) -> dict:
    n = len(read_classes(datalist))
    out = MILOutputs(output_dir)
    masks = {e["image"]: e["mask"] for e in load_decathlon_datalist(datalist, False, "training")}
    items = pseudo_items(datalist)
    cms = {k: np.zeros((n, n), np.int64) for k in ("miou", "miou_argmax", "miou_labelled")}
    for item in items:
        tags = np.asarray(item["label"], bool)
        gt, pred = read_mask(masks[item["image"]]), read_mask(out.mask(item["name"]))
        argmax = np.where(tags[:, None, None], np.load(out.map(item["name"])).astype(np.float32), -1).argmax(0)
        known = pred != IGNORE
        cms["miou"] += confusion(np.where(known, pred, argmax), gt, n)
        cms["miou_argmax"] += confusion(argmax, gt, n)
        cms["miou_labelled"] += confusion(pred[known], gt[known], n)
    report = {k: float(scores(cm)["miou"]) for k, cm in cms.items()}
    report["iou"] = scores(cms["miou"])["iou"].tolist()
    report["labelled"] = float(cms["miou_labelled"].sum() / cms["miou"].sum())
    report["images"] = len(items)
    return report


def dev_patches(datalist: str, checkpoint: str, threshold: float = 0.5, input_size: int | None = None) -> dict:
    parser = ConfigParser(ConfigParser.load_config_file(ROOT / "bundle" / "configs" / "common.json"))
    parser.update({"bundle_root": str(ROOT / "bundle"), "datalist": datalist, "pretrained": False})
    classes = read_classes(datalist)
    gland = classes.index("gland")
    net = load_network(parser.get_parsed_content("mil_network_def"), checkpoint, "MIL network", "cpu", classes)
    cfg, sigma = net.pretrained_cfg, parser.get_parsed_content("mil_sigma")
    fused = FusedMaps(cfg["mean"], cfg["std"], window=patch_size(datalist), sigma=sigma, input_size=input_size)
    patches: dict[str, list[dict]] = {}
    for entry in load_decathlon_datalist(datalist, False, "validation"):
        patches.setdefault(entry["image"], []).append(entry)
    f1 = {"positive": [], "negative": []}
    hausdorff = []
    for image, entries in patches.items():
        rgb = torch.from_numpy(read_rgb(image).copy()).permute(2, 0, 1)[None]
        with torch.no_grad():
            pred = fused(rgb, net)[0, gland].numpy() > threshold
        truth = read_mask(entries[0]["mask"]) == gland
        for e in entries:
            (y, x), (h, w) = e["location"], e["size"]
            p, t = pred[y : y + h, x : x + w], truth[y : y + h, x : x + w]
            non_gland_f1, gland_f1 = scores(confusion(p, t, 2))["class_dice"]
            if e["label"][gland]:
                f1["positive"].append(gland_f1)
                hd = hausdorff_distance(*(find_boundaries(np.pad(m, 1), mode="inner") for m in (p, t)))
                hausdorff.append(hd if np.isfinite(hd) else float(np.hypot(h, w)))
            else:
                f1["negative"].append(non_gland_f1)
    return {
        "f1_positive": float(np.mean(f1["positive"])),
        "f1_negative": float(np.mean(f1["negative"])),
        "hausdorff_positive": float(np.mean(hausdorff)),
        "patches": {k: len(v) for k, v in f1.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datalist", required=True)
    ap.add_argument("output_dirs", nargs="*", help="output_dir of mil_pseudo_label.json runs")
    ap.add_argument("--dev", nargs="*", default=[], metavar="NAME=CHECKPOINT", help="MIL networks to score on dev")
    ap.add_argument("--mil_input_size", type=int, default=None, help="the --mil_input_size they were trained with")
    args = ap.parse_args()
    report = {d: evaluate(args.datalist, d) for d in args.output_dirs}
    dev = (n.split("=", 1) for n in args.dev)
    report |= {name: dev_patches(args.datalist, path, input_size=args.mil_input_size) for name, path in dev}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
