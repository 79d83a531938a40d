"""Tune the pseudo-label rules (prompts, IDS filter, fusion) on GlaS **dev**, from CAMs a pseudo-label run saved.

SAM's first pass (round 0, the decoder as shipped) is recomputed from ``OUTPUT_DIR/cams`` for each variant, so a
variant costs one SAM decode per image instead of a whole pseudo-label run; each image is encoded once for all.

    # CAMs of the dev images: the pseudo-label stage on a datalist whose training split is GlaS dev, no refinement
    python -c "import json; d = json.load(open('data/glas/datalist.json')); d['training'] = d['validation']; \\
        json.dump(d, open('data/glas/datalist_dev.json', 'w'))"
    python -m monai.bundle run --bundle_root bundle \\
        --config_file "['bundle/configs/common.json','bundle/configs/pseudo_label.json']" \\
        --datalist data/glas/datalist_dev.json --cam_checkpoint CAM.pt --cam_input_size 112 --sam_classes "['gland']" \\
        --refine_iterations 0 --output_dir OUT
    python tools/glas_prompt_tuning.py --datalist data/glas/datalist_dev.json --output_dir OUT \\
        --set '{"sam_classes": ["gland"], "cam_input_size": 112}' --variants '[{}, {"ids_threshold": 0.5}]'

Each variant is a JSON object of config overrides (keys of ``common.json`` or ``pseudo_label.json``; ``prompts#margin``
style keys reach nested ones), applied on top of ``--set``; only ``rules`` is rebuilt per variant (SAM and its cached
embeddings come from ``--set``, so a SAM setting belongs there). For a self-training round the maps are a
segmentation network's: make them with
``--config_file "['bundle/configs/common.json','bundle/configs/pseudo_label.json','bundle/configs/relabel.json']"
--seg_checkpoint MODEL.pt`` and pass the same three files to ``--config``. Ground truth is read only to score (OEEM
mIoU, ignore pixels take the CAM arg-max, as in ``glas_pseudo_eval.py``); choose on dev. On the training images its
scores are a report, never a reason to choose.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundle" / "configs"
sys.path.insert(0, str(ROOT / "bundle"))
sys.path.insert(0, str(ROOT / "tools"))

from glas_cam_eval import confusion  # noqa: E402
from glas_pseudo_eval import miou  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402
from monai.data import load_decathlon_datalist  # noqa: E402

from scripts.data.datalist import read_classes  # noqa: E402
from scripts.images import read_mask  # noqa: E402
from scripts.sam.labeler import load_cams  # noqa: E402
from scripts.sam.masks import IGNORE  # noqa: E402
from scripts.sam.outputs import Outputs, pseudo_items  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datalist", required=True, help="its training split: the images the CAMs were made for (dev)")
    ap.add_argument("--output_dir", required=True, help="the pseudo-label run's output_dir (its cams/ are read)")
    ap.add_argument(
        "--config",
        nargs="+",
        default=[str(CONFIGS / "common.json"), str(CONFIGS / "pseudo_label.json")],
        help="the run's config files, merged in order, e.g. common.json pseudo_label.json relabel.json for "
        "a self-training round",
    )
    ap.add_argument("--set", default="{}", help="JSON of the run's config overrides")
    ap.add_argument("--variants", default="[{}]", help="JSON list of override objects, one per variant")
    ap.add_argument("--report", default=None, help="default: OUTPUT_DIR/glas_prompt_tuning.json")
    args = ap.parse_args()

    base = {
        "bundle_root": str(ROOT / "bundle"),
        "datalist": args.datalist,
        "output_dir": args.output_dir,
        **json.loads(args.set),
    }
    parser = ConfigParser(ConfigParser.load_config_files(args.config))
    parser.update(base)
    sam, embeddings = parser.get_parsed_content("sam"), parser.get_parsed_content("embeddings")
    classes = read_classes(args.datalist)
    n, out = len(classes), Outputs(args.output_dir)
    masks = {e["image"]: e["mask"] for e in load_decathlon_datalist(args.datalist, False, "training")}
    items = pseudo_items(args.datalist)
    cams = {item["name"]: load_cams(out.cam(item["name"])) for item in items}
    truth = {item["name"]: read_mask(masks[item["image"]]) for item in items}
    argmax = {
        item["name"]: np.where(np.asarray(item["label"], bool)[:, None, None], cams[item["name"]], -np.inf).argmax(0)
        for item in items
    }
    cam_miou = miou(sum(confusion(argmax[name], truth[name], n) for name in cams))[0]

    results = []
    for variant in json.loads(args.variants):
        parser = ConfigParser(ConfigParser.load_config_files(args.config))
        parser.update({**base, **variant})
        rules = parser.get_parsed_content("rules")
        cm, n_prompts = np.zeros((n, n), np.int64), 0
        for item in items:
            name, tags = item["name"], np.asarray(item["label"], bool)
            prompts = rules.prompts(name, cams[name], tags)
            n_prompts += len(prompts)
            pred = rules.sam_mask(sam, embeddings(item) if len(prompts) else None, cams[name], tags, prompts)
            cm += confusion(np.where(pred != IGNORE, pred, argmax[name]), truth[name], n)
        score, per_class = miou(cm)
        row = {
            "variant": variant,
            "miou": score,
            "iou": per_class,
            "cam_miou": cam_miou,
            "prompts_per_image": n_prompts / len(items),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    path = Path(args.report or Path(args.output_dir) / "glas_prompt_tuning.json")
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
