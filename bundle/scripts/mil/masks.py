"""IKD-MIL pseudo-masks: the fused map of whole training images, smoothed, thresholded, in the bundle's contract.

Under ``output_dir``::

    mil_maps/NAME.npy     uint8 (C, H, W): the smoothed fused map x 255, tagged classes only (a source of SAM prompts)
    mil_masks/NAME.png    the pseudo-mask: the tagged class with the highest map where it reaches the threshold,
                          255 (ignore) where no tagged class does                      -> "pseudo", "pseudo_layers"
    datalist_pseudo.json

The units of work and their names are the CAM pseudo-label stage's (:func:`scripts.sam.outputs.pseudo_items`); every
file is written atomically and the mask last, so a re-run skips the images already done.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from monai.transforms import GaussianSmooth
from torch import nn
from torch.nn import functional as F

from ..atomic import atomic_output
from ..errors import DataError
from ..sam.labeler import ImageHandler
from ..sam.masks import cam_pseudo_mask, save_pseudo_mask
from ..sam.outputs import write_mask_datalist

logger = logging.getLogger(__name__)


@dataclass
class MILOutputs:
    """File names under ``output_dir`` (see the module docstring)."""

    root: Path

    def __post_init__(self):
        self.root = Path(self.root)

    def map(self, name: str) -> Path:
        return self.root / "mil_maps" / f"{name}.npy"

    def mask(self, name: str) -> Path:
        return self.root / "mil_masks" / f"{name}.png"

    @property
    def datalist(self) -> Path:
        return self.root / "datalist_pseudo.json"

    def work_files(self) -> list[str]:
        """Glob patterns of everything written here, removed before a run from nothing."""
        return [str(self.root / p) for p in ("mil_maps", "mil_masks", "datalist_pseudo.json")]


class FusedMaps:
    """Inferer: (B, 3, H, W) RGB in 0-255 -> (B, C, H, W) fused probabilities of a :class:`scripts.mil.net.MILNet`,
    read in windows of the training patch size (Gaussian-weighted overlap 0.25) at the scale the network learned (the
    image resized by ``input_size / window`` when it was trained on patches resized to ``input_size``, the maps
    resized back), and smoothed with a Gaussian of ``sigma`` image px (the paper's 3). An image smaller than a window
    (or than the network's stride) is padded, and the padding cropped off again. The pseudo-masks' maps, and SAM's
    prompts' (``mil_sam.json``).

    Args:
        mean: per-channel normalisation mean of RGB in [0, 1] (the backbone's ``pretrained_cfg``).
        std: per-channel normalisation standard deviation, likewise.
        window: the training patch side in pixels; None: the whole image at once.
        sigma: the smoothing's standard deviation in pixels, >= 0 (0: none).
        sw_batch_size: windows per forward pass.
        input_size: the side the training patches were resized to (``mil_input_size``); None: ``window`` itself.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        window: int | None = None,
        sigma: float = 3.0,
        sw_batch_size: int = 8,
        input_size: int | None = None,
    ):
        if sigma < 0:
            raise DataError(f"MIL map smoothing sigma must be >= 0, got {sigma}")
        if input_size is not None and not (window and input_size > 0):
            raise DataError(f"mil_input_size {input_size} needs a positive size and the training patch size (window)")
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        self.window, self.input_size, self.sw_batch_size = window, input_size or window, sw_batch_size
        self.smooth = GaussianSmooth(sigma) if sigma > 0 else None

    def __call__(self, inputs: torch.Tensor, network: nn.Module) -> torch.Tensor:
        x = (inputs.float() / 255 - self.mean.to(inputs.device)) / self.std.to(inputs.device)
        size, scale = x.shape[-2:], self.input_size / self.window if self.window else 1
        if scale != 1:
            x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        stride = getattr(network, "stride", 1)
        roi = [max(self.input_size or s, stride) for s in x.shape[-2:]]
        inferer = SlidingWindowInferer(roi, self.sw_batch_size, overlap=0.25 if self.window else 0, mode="gaussian")
        maps = inferer(x, lambda w: torch.sigmoid(network.fused(w).float()))
        if scale != 1:
            maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        if self.smooth is not None:
            maps = torch.stack([self.smooth(m) for m in maps])
        return maps.clamp(0, 1)


class MILLabelHandler(ImageHandler):
    """ignite handler of an evaluator whose inferer is :class:`FusedMaps` and whose loader gives :meth:`pending` items
    one per batch, unaugmented: per image it keeps the tagged classes of the (smoothed) fused map and writes the map
    and the pseudo-mask (:func:`scripts.sam.masks.cam_pseudo_mask` at ``threshold``).

    Args:
        items: the units of work (:func:`scripts.sam.outputs.pseudo_items`), with ``name`` and ``label``.
        output_dir: where the files go (:class:`MILOutputs`).
        threshold: the map value in (0, 1] a pixel's best tagged class must reach; below it the pixel is ignore.
    """

    what = "MIL pseudo-masks"

    def __init__(self, items: Sequence[dict], output_dir: str | os.PathLike, threshold: float = 0.5):
        if not 0 < threshold <= 1:
            raise DataError(f"MIL pseudo-masks need 0 < threshold <= 1, got {threshold}")
        self.items, self.out, self.threshold = list(items), MILOutputs(output_dir), float(threshold)

    def done(self, item: dict) -> bool:
        return self.out.mask(item["name"]).exists()

    def handle(self, batch: dict, maps: torch.Tensor, tags: np.ndarray) -> None:
        self.label(batch["name"][0], maps[0], tags)

    def label(self, name: str, maps: torch.Tensor, tags: np.ndarray) -> np.ndarray:
        """``maps`` (C, H, W) fused probabilities; returns the pseudo-mask written (the mask last: it marks done)."""
        maps = np.where(tags[:, None, None], maps.detach().float().cpu().numpy(), 0.0).clip(0, 1)
        with atomic_output(self.out.map(name)) as tmp:
            np.save(tmp, np.round(maps * 255).astype(np.uint8))
        mask = cam_pseudo_mask(maps, tags, self.threshold)
        save_pseudo_mask(self.out.mask(name), mask)
        return mask


def write_mil_datalist(datalist: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """``output_dir/datalist_pseudo.json``: every training entry's ``pseudo`` and its single ``pseudo_layers`` mask is
    its image's MIL pseudo-mask (train with ``layer_weights [1.0]``)."""
    out = MILOutputs(output_dir)
    return write_mask_datalist(datalist, out.datalist, lambda name: (out.mask(name), [out.mask(name)]))
