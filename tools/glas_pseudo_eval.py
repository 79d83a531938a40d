"""GlaS acceptance of the pseudo-label stage: mIoU of the training images' pseudo-masks against their ground truth for
(a) the CAM alone, (b) CAM -> LiteMedSAM, (c) each decoder refinement round, all from one run's output_dir, and the
figure (image, CAM, prompts, masks, ground truth).

    python -m monai.bundle run --bundle_root bundle \\
        --config_file "['bundle/configs/common.json','bundle/configs/pseudo_label.json']" \\
        --datalist GLAS_DATALIST --cam_checkpoint CAM.pt --cam_input_size 112 --output_dir OUT --sam_classes "['gland']"
    python tools/glas_pseudo_eval.py --datalist GLAS_DATALIST --output_dir OUT \\
        --set '{"sam_classes": ["gland"], "cam_input_size": 112}' [--figure bundle/docs/pseudo_labels_glas.png]

``--config`` takes the run's config files (default ``common.json pseudo_label.json``; add ``relabel.json`` for a
self-training round). ``--set`` repeats every override of the run that changes the prompts (the figure and
``prompts_per_image`` redraw them from the saved CAMs), ``cam_input_size`` included: it sets the CAM cell that
``min_area`` (and ``min_distance``, when set) derive from.
In GlaS a gland is the object SAM outlines; "non-gland" is the stroma and lumen around it.
OEEM protocol: per class, intersection and union summed over all images, then the mean over the classes.
- ``miou``: ignore (255) pixels take the CAM's arg-max over the tagged classes, so every row labels every pixel and
  (a) is that arg-max itself: two rows differ exactly where the methods decide differently.
- ``miou_labelled`` and ``labelled``: ignore pixels left out, and the fraction labelled (what stage 3 learns from).
- ``agreement`` (SAM rounds): :func:`scripts.sam.refine.prompt_agreement`, what ``refine_select agreement`` ranks the
  rounds by (no ground truth in it).
Ground truth is read here only, to score; the pseudo-label stage never sees it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundle" / "configs"
sys.path.insert(0, str(ROOT / "bundle"))
sys.path.insert(0, str(ROOT / "tools"))

from figures import save_png  # noqa: E402
from glas_cam_eval import confusion, heat  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402
from monai.data import load_decathlon_datalist  # noqa: E402

from scripts.data.datalist import read_classes  # noqa: E402
from scripts.images import read_mask, read_rgb  # noqa: E402
from scripts.sam.labeler import load_cams  # noqa: E402
from scripts.sam.masks import IGNORE  # noqa: E402
from scripts.sam.outputs import Outputs, pseudo_items  # noqa: E402
from scripts.sam.refine import prompt_agreement  # noqa: E402
from scripts.seg.metrics import scores  # noqa: E402

COLOURS = np.array([[255, 255, 255], [0, 150, 60]], np.uint8)  # non-gland white, gland green; ignore grey
PANEL = 220


def miou(cm: np.ndarray) -> tuple[float, list[float]]:
    result = scores(cm)
    return result["miou"], result["iou"].tolist()


def coloured(mask: np.ndarray) -> np.ndarray:
    out = np.full((*mask.shape, 3), 128, np.uint8)
    known = mask != IGNORE
    out[known] = COLOURS[np.minimum(mask[known], len(COLOURS) - 1)]
    return out


def blend(rgb, top, alpha=0.5):
    return (rgb * (1 - alpha) + top * alpha).astype(np.uint8)


def prompts_panel(rgb: np.ndarray, prompts) -> np.ndarray:
    """Boxes (gland green, non-gland blue), positive points filled, negative points hollow, drawn at panel scale."""
    scale = PANEL / rgb.shape[1]
    panel = Image.fromarray(rgb).resize((PANEL, round(rgb.shape[0] * scale)), Image.BILINEAR)
    draw = ImageDraw.Draw(panel)
    colours = [(40, 90, 255), (0, 200, 70)]
    for box, points, labels, c in zip(prompts.boxes, prompts.points, prompts.labels, prompts.classes):
        y0, x0, y1, x1 = box * scale
        draw.rectangle((x0, y0, x1, y1), outline=colours[c % 2], width=2)
        for (y, x), lab in zip(points * scale, labels):
            if lab >= 0:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colours[c % 2] if lab else None, outline=(200, 0, 0))
    return np.asarray(panel)


def row(panels: list[np.ndarray]) -> np.ndarray:
    h = round(panels[0].shape[0] * PANEL / panels[0].shape[1])
    return np.concatenate([np.asarray(Image.fromarray(p).resize((PANEL, h), Image.NEAREST)) for p in panels], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datalist", required=True)
    ap.add_argument("--output_dir", required=True, help="the pseudo-label run's output_dir")
    ap.add_argument(
        "--config",
        nargs="+",
        default=[str(CONFIGS / "common.json"), str(CONFIGS / "pseudo_label.json")],
        help="the run's config files, merged in order, e.g. common.json pseudo_label.json relabel.json for "
        "a self-training round",
    )
    ap.add_argument("--set", default="{}", help="JSON of the run's config overrides that change the prompts")
    ap.add_argument("--report", default=None, help="default: OUTPUT_DIR/glas_pseudo_eval.json")
    ap.add_argument("--figure", default=None, help="where to save the figure (none without it)")
    ap.add_argument("--figure_images", type=int, default=4, help="the first N training images")
    args = ap.parse_args()

    parser = ConfigParser(ConfigParser.load_config_files(args.config))
    parser.update(
        {
            "bundle_root": str(ROOT / "bundle"),
            "datalist": args.datalist,
            "output_dir": args.output_dir,
            **json.loads(args.set),
        }
    )
    rules, rounds = parser.get_parsed_content("rules"), parser.get_parsed_content("refine_iterations")
    num_layers = len(parser.get_parsed_content("layers"))
    classes = read_classes(args.datalist)
    n, gland = len(classes), classes.index("gland")
    out = Outputs(args.output_dir)
    masks = {e["image"]: e["mask"] for e in load_decathlon_datalist(args.datalist, False, "training")}
    items = pseudo_items(args.datalist)

    methods = ["cam", *(f"cam_layer{i}" for i in range(num_layers)), *(f"sam_iter{k}" for k in range(rounds + 1))]
    filled = {m: np.zeros((n, n), np.int64) for m in methods}
    labelled = {m: np.zeros((n, n), np.int64) for m in methods}
    n_prompts, rows = 0, []
    for i, item in enumerate(items):
        name, tags = item["name"], np.asarray(item["label"], bool)
        gt, cams = read_mask(masks[item["image"]]), load_cams(out.cam(name))
        argmax = np.where(tags[:, None, None], cams, -np.inf).argmax(0)
        preds = {
            "cam": argmax,
            **{f"cam_layer{j}": read_mask(out.layer(name, j)) for j in range(num_layers)},
            **{f"sam_iter{k}": read_mask(out.sam(name, k)) for k in range(rounds + 1)},
        }
        for m, pred in preds.items():
            known = pred != IGNORE
            filled[m] += confusion(np.where(known, pred, argmax), gt, n)
            labelled[m] += confusion(pred[known], gt[known], n)
        prompts = rules.prompts(name, cams, tags)
        n_prompts += len(prompts)
        if args.figure and i < args.figure_images:
            rgb = read_rgb(item["image"])
            rows.append(
                row(
                    [
                        rgb,
                        blend(rgb, heat(cams[gland])),
                        prompts_panel(rgb, prompts),
                        *(blend(rgb, coloured(preds[m]), 0.6) for m in ("cam", "sam_iter0", f"sam_iter{rounds}")),
                        blend(rgb, coloured(gt), 0.6),
                    ]
                )
            )

    report = {"images": len(items), "prompts_per_image": n_prompts / len(items), "classes": classes, "scores": {}}
    for m in methods:
        score, per_class = miou(filled[m])
        score_labelled, _ = miou(labelled[m])
        report["scores"][m] = {
            "miou": score,
            "iou": per_class,
            "miou_labelled": score_labelled,
            "labelled": float(labelled[m].sum() / filled[m].sum()),
        }
    for k, agreement in enumerate(prompt_agreement(args.output_dir, items, rounds)):
        report["scores"][f"sam_iter{k}"]["agreement"] = agreement
    best = max(report["scores"][f"sam_iter{k}"]["miou"] for k in range(rounds + 1))
    report["gain_over_cam_points"] = 100 * (best - report["scores"]["cam"]["miou"])
    print(json.dumps(report, indent=1))
    path = Path(args.report or Path(args.output_dir) / "glas_pseudo_eval.json")
    path.write_text(json.dumps(report, indent=1))

    print(f"wrote {path}")
    if args.figure:
        titles = [
            "image",
            "CAM (gland)",
            "prompts",
            "(a) CAM arg-max",
            "(b) LiteMedSAM",
            f"(c) round {rounds}",
            "ground truth",
        ]
        header = np.full((22, rows[0].shape[1], 3), 255, np.uint8)
        figure = Image.fromarray(np.concatenate([header, *rows], 0))
        draw = ImageDraw.Draw(figure)
        for j, title in enumerate(titles):
            draw.text((j * PANEL + 6, 5), title, fill=(0, 0, 0))
        save_png(figure, args.figure)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
