"""GlaS acceptance of the CAM classifier: dev classification metrics, dev mIoU of CAM-only masks next to two
baselines that learn nothing, and the overlay figure.

    python tools/glas_cam_eval.py --datalist GLAS_DATALIST --checkpoint models/cam_best.pt [--input_size 112]
        [--tta none] [--output eval/glas_cam.json] [--figure bundle/docs/cam_overlay.png]

``--input_size`` is the training run's ``cam_input_size`` (``--cam_input_size 112`` of
``python -m monai.bundle run --config_file "['bundle/configs/common.json','bundle/configs/train_cam.json']"``).

- Classification: the bundle's own ``validate#evaluator`` from ``common.json`` + ``train_cam.json`` (``--config``) on
  the validation patches.
- Segmentation, OEEM protocol (intersection and union of each class summed over all dev images, then the
  mean), plus the mean per-image Dice of the gland class:
  * CAM: each dev image in 112-px windows with stride 56 (the training patch grid); per window the maps of
    the classes the network predicts (p >= 0.5; no ground truth), un-normalised so that windows compare,
    merged with Gaussian weights (window borders, where padding makes spurious peaks, count least), then
    each class divided by its maximum over the image; the pixel's class is the arg-max. A fixed rule:
    nothing is tuned on masks.
  * everything = gland;
  * Otsu on the haematoxylin channel (``skimage.color.rgb2hed``, Gaussian sigma 4 px, about one nucleus):
    haematoxylin above the threshold = gland (epithelium is where nuclei crowd).
Pixel masks are read only to score; the checkpoint was chosen on validation F1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundle" / "configs"
sys.path.insert(0, str(ROOT / "bundle"))
sys.path.insert(0, str(ROOT / "tools"))
os.environ.setdefault("CUFILE_LOGFILE_PATH", os.devnull)

from figures import save_png  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402
from monai.data import load_decathlon_datalist  # noqa: E402

from scripts.cam.maps import WholeImageCAM  # noqa: E402
from scripts.checkpoints import load_network  # noqa: E402
from scripts.images import read_mask, read_rgb  # noqa: E402
from scripts.seg.metrics import confusion_matrix as confusion  # noqa: E402
from scripts.seg.metrics import scores as cm_scores  # noqa: E402

LAYERS = ("classifier", "backbone.blocks.5", "backbone.blocks.4")


def scores(cm: np.ndarray, dice: list[float], classes: list[str]) -> dict:
    s = cm_scores(cm)
    return {
        "miou": s["miou"],
        "oeem_dice": s["dice"],
        **{f"iou_{c}": float(v) for c, v in zip(classes, s["iou"])},
        "gland_dice_per_image": float(np.mean(dice)),
    }


def dice(pred: np.ndarray, gt: np.ndarray, c: int) -> float:
    p, g = pred == c, gt == c
    return float(2 * (p & g).sum() / max(p.sum() + g.sum(), 1))


def otsu_haematoxylin(rgb: np.ndarray) -> np.ndarray:
    h = ndimage.gaussian_filter(rgb2hed(rgb)[..., 0], 4)
    return h > threshold_otsu(h)


def heat(values: np.ndarray) -> np.ndarray:
    """A blue-cyan-yellow-red colour map for values in [0, 1] (matplotlib is not a dependency)."""
    stops = np.array([[0, 0, 128], [0, 160, 255], [255, 230, 0], [220, 0, 0]], np.float32)
    x = np.clip(values, 0, 1) * (len(stops) - 1)
    i = np.minimum(x.astype(int), len(stops) - 2)
    f = (x - i)[..., None]
    return (stops[i] * (1 - f) + stops[i + 1] * f).astype(np.uint8)


def overlay_row(rgb, cam, pred, gt, width=260):
    colours = np.array([[255, 255, 255], [0, 150, 60]], np.uint8)  # non-gland white, gland green

    def blend(a, b, alpha=0.5):
        return (a * (1 - alpha) + b * alpha).astype(np.uint8)

    panels = [rgb, blend(rgb, heat(cam)), blend(rgb, colours[pred], 0.45), blend(rgb, colours[gt], 0.45)]
    h = round(rgb.shape[0] * width / rgb.shape[1])
    return np.concatenate([np.asarray(Image.fromarray(p).resize((width, h), Image.BILINEAR)) for p in panels], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datalist", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument(
        "--config",
        nargs="+",
        default=[str(CONFIGS / "common.json"), str(CONFIGS / "train_cam.json")],
        help="the training run's config files, merged in order",
    )
    ap.add_argument(
        "--input_size", type=int, default=224, help="the network input size it was trained with (its cam_input_size)"
    )
    ap.add_argument("--window", type=int, default=112)
    ap.add_argument("--tta", default="none")
    ap.add_argument("--output", default=str(ROOT / "eval" / "glas_cam.json"))
    ap.add_argument("--figure", default=str(ROOT / "bundle" / "docs" / "cam_overlay.png"))
    ap.add_argument("--figure_images", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    parser = ConfigParser(ConfigParser.load_config_files(args.config))
    parser.update(
        {
            "bundle_root": str(ROOT / "bundle"),
            "datalist": args.datalist,
            "pretrained": False,
            "cam_input_size": args.input_size,
            "progress_bar": False,
            "num_workers": 1,
            "validate#handlers": [],
        }
    )
    network = load_network(parser.get_parsed_content("network"), args.checkpoint, "CAM classifier")
    classes = parser.get_parsed_content("classes")
    gland = classes.index("gland")
    result = {"checkpoint": args.checkpoint, "input_size": args.input_size, "tta": args.tta, "window": args.window}

    t = time.time()
    evaluator = parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    result["classification"] = {k: float(v) for k, v in evaluator.state.metrics.items()}
    result["classification_seconds"] = round(time.time() - t, 1)
    print(json.dumps(result["classification"], indent=1))

    norm = parser.get_parsed_content("normalization")
    cam = WholeImageCAM(LAYERS, args.input_size, norm["mean"], norm["std"], window=args.window, tta=args.tta)
    entries = load_decathlon_datalist(args.datalist, False, "validation")
    images = sorted({(e["image"], e["mask"]) for e in entries})
    n = len(classes)
    cms = {name: np.zeros((n, n), np.int64) for name in [*LAYERS, "all_gland", "otsu_haematoxylin"]}
    dices = {name: [] for name in cms}
    rows = []
    t = time.time()
    for k, (image_path, mask_path) in enumerate(images):
        rgb, gt = read_rgb(image_path), read_mask(mask_path)
        maps = cam(torch.from_numpy(rgb.transpose(2, 0, 1).copy())[None], network)[0]  # (layers, C, H, W)
        preds = {name: m.argmax(0).numpy() for name, m in zip(LAYERS, maps)}
        preds["all_gland"] = np.full(gt.shape, gland, np.int64)
        preds["otsu_haematoxylin"] = np.where(otsu_haematoxylin(rgb), gland, 1 - gland)
        for name, pred in preds.items():
            cms[name] += confusion(pred, gt, n)
            dices[name].append(dice(pred, gt, gland))
        if k < args.figure_images:
            rows.append(
                overlay_row(
                    rgb, maps[0, gland].numpy(), (preds[LAYERS[0]] == gland).astype(int), (gt == gland).astype(int)
                )
            )
        print(f"{k + 1}/{len(images)} {Path(image_path).name}: CAM gland Dice {dices[LAYERS[0]][-1]:.3f}", flush=True)
    result["segmentation_seconds"] = round(time.time() - t, 1)
    result["segmentation"] = {name: scores(cm, dices[name], classes) for name, cm in cms.items()}
    result["dev_images"] = len(images)
    print(json.dumps(result["segmentation"], indent=1))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))

    width = max(r.shape[1] for r in rows)
    header = np.full((24, width, 3), 255, np.uint8)
    figure = Image.fromarray(np.concatenate([header, *[r[:, :width] for r in rows]], 0))
    draw = ImageDraw.Draw(figure)
    for i, title in enumerate(["image", "CAM (gland)", "CAM mask (arg-max)", "ground truth"]):
        draw.text((i * width // 4 + 6, 6), title, fill=(0, 0, 0))
    save_png(figure, args.figure)
    print(f"wrote {args.output} and {args.figure}")


if __name__ == "__main__":
    main()
