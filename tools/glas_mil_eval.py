"""GlaS acceptance of the MIL pseudo-masks (``mil_pseudo_label.json``): mIoU of the training images' masks against their
ground truth, for one or more runs' output folders (e.g. ``label_with`` student and teacher), with the protocol of
``glas_pseudo_eval.py`` so the rows compare with its CAM rows:

- ``miou``: ignore (255) pixels take the MIL map's arg-max over the tagged classes (every pixel labelled);
- ``miou_argmax``: that arg-max alone (no threshold);
- ``miou_labelled`` and ``labelled``: ignore pixels left out, and the fraction labelled (what stage 3 learns from).

    python tools/glas_mil_eval.py --datalist GLAS_DATALIST OUT_STUDENT OUT_TEACHER

Ground truth is read here only, to score; the MIL stage never sees it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bundle"))

from monai.data import load_decathlon_datalist  # noqa: E402

from scripts.constants import IGNORE  # noqa: E402
from scripts.data.datalist import read_classes  # noqa: E402
from scripts.images import read_mask  # noqa: E402
from scripts.mil.masks import MILOutputs  # noqa: E402
from scripts.sam.outputs import pseudo_items  # noqa: E402
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datalist", required=True)
    ap.add_argument("output_dirs", nargs="+", help="output_dir of mil_pseudo_label.json runs")
    args = ap.parse_args()
    print(json.dumps({d: evaluate(args.datalist, d) for d in args.output_dirs}, indent=1))


if __name__ == "__main__":
    main()
