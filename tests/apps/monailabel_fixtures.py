"""Bundles served by the MONAI Label app in apps/monailabel: a copy of the bundle with a per-pixel 'network' (exact
geometry to check coordinates against) or the shipped FlexibleUNet with random weights (to train), and the
helpers to draw MONAI Label's polygons back into a label image."""

import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from conftest import BUNDLE, ROOT
from monai.bundle import ConfigParser
from monai.networks.nets import FlexibleUNet

import scripts.seg.net  # noqa: F401  (registers efficientnet-lite0 with FlexibleUNet)

APP = ROOT / "apps" / "monailabel"
sys.path[:0] = [str(APP), str(ROOT / "tests" / "wsi")]  # the app's main.py; the synthetic slides of the wsi tests

from main import MODEL, PathologyWSSSApp  # noqa: E402,F401
from wsi_fixtures import PURPLE, square_rgb, square_slide  # noqa: E402,F401


def bundle_copy(path: Path, network: str) -> Path:
    """The bundle's configs and scripts under ``path``, with ``models/model.pt``: ``"colour"`` the wsi tests' exact
    per-pixel network (stroma / gland, no weights; in-process only), ``"flexible_unet"`` the shipped network with
    random weights (demo classes)."""
    shutil.copytree(BUNDLE / "configs", path / "configs")
    shutil.copytree(BUNDLE / "scripts", path / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    (path / "models").mkdir()
    if network == "colour":
        config = path / "configs" / "inference.json"
        parser = ConfigParser.load_config_file(config)
        parser["network_def"] = {"_target_": "wsi_fixtures.ColourNet"}
        ConfigParser.export_config_file(parser, str(config), indent=4)
        state, classes = {}, ["stroma", "gland"]
    else:
        torch.manual_seed(0)
        state = FlexibleUNet(3, 3, "efficientnet-lite0", pretrained=False).state_dict()
        classes = ["stroma", "gland", "lymphocytes"]
    torch.save({"model": state, "contract": {"classes": classes}}, path / "models" / "model.pt")
    return path


def draw_polygons(annotation: dict, labels: dict, location, shape) -> np.ndarray:
    """MONAI Label's polygons (``FindContoursd``: every outer and hole contour, level-0 pixels) back into a label
    image of ``shape`` (H, W) at ``location`` (x, y): per class, the fills XOR-ed (a hole's contour cancels its
    inside) and the contours themselves added (they run through the class's own pixels)."""
    out = np.zeros(shape, np.uint8)
    for element in annotation["elements"]:
        mask = np.zeros(shape, np.uint8)
        contours = [np.asarray(c, np.int32) - np.asarray(location, np.int32) for c in element["contours"]]
        for contour in contours:
            fill = np.zeros(shape, np.uint8)
            cv2.fillPoly(fill, [contour], 1)
            mask ^= fill
        cv2.polylines(mask, contours, True, 1)
        out[mask > 0] = labels[element["label"]]
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))
