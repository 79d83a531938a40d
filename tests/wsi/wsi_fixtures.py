"""Small synthetic slides, an exact per-pixel 'network' and slide inference built with the shipped input scaling and
activation, for the whole-slide inference tests."""

import numpy as np
import torch
from conftest import BUNDLE
from monai.bundle import ConfigParser
from monai.inferers import SlidingWindowInferer
from torch import nn

from scripts.wsi.inference import SlideInference
from scripts.wsi.pyramid_tiff import write_pyramidal_tiff

CLASSES = ["stroma", "gland"]
PINK, PURPLE, GLASS = (230, 150, 190), (100, 40, 140), (245, 245, 245)


class ColourNet(nn.Module):
    """Per-pixel 'network': gland where the red channel is dark (the purple square), stroma elsewhere; exact, so the
    outputs can be checked against the painted geometry."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x[:, :1]), 20 * (0.6 - x[:, :1])], 1)


def square_rgb():
    """Glass with a pink tissue block (rows 64-448, cols 128-640) holding a purple square (rows 192-320, cols
    256-384)."""
    rgb = np.full((512, 768, 3), GLASS, np.uint8)
    rgb[64:448, 128:640] = PINK
    rgb[192:320, 256:384] = PURPLE
    return rgb


def square_slide(path, mpp=0.5, rgb=None):
    """:func:`square_rgb` (or ``rgb``) as a pyramid with lossless tiles, so the colours are exact."""
    write_pyramidal_tiff(path, square_rgb() if rgb is None else rgb, mpp=mpp, compression="lzw", min_size=128)
    return str(path)


def inference_config(**overrides) -> ConfigParser:
    """bundle/configs/inference.json, read alone as the bundle and MONAI Label read it, with ``overrides``."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser.update({"bundle_root": str(BUNDLE), **overrides})
    return parser


SHIPPED = inference_config()


def inference(network=None, classes=CLASSES, **kwargs):
    """Slide inference with the shipped input scaling and activation, small tiles and windows, no workers."""
    options = {"mpp": 1.0, "tile_size": 96, "num_workers": 0, "progress": False, "prob_downsample": 4, **kwargs}
    return SlideInference(
        network or ColourNet(),
        SlidingWindowInferer(64, 4, 0.25, mode="gaussian"),
        classes,
        SHIPPED.get_parsed_content("scale_intensity"),
        SHIPPED.get_parsed_content("activation"),
        **options,
    )
