"""Phase 2 of whole-slide inference, the prediction: a plan's tissue tiles through the network, each tile's centre
straight to disk, so memory stays bounded by the tile.

DataLoader workers read the tiles (reading overlaps the network) and batch them. :class:`TileModel` scales the RGB
with the config's intensity transform and runs MONAI's ``SlidingWindowInferer`` (Gaussian blending,
``sw_batch_size`` windows per network call) over the network and the config's activation, calling the network only
on windows holding tissue. :func:`predict` labels each tile's centre (the most probable class, :data:`NO_TISSUE`
off the tissue mask) into a :class:`LabelStore` and writes its probabilities, averaged over ``prob_downsample``
blocks, into a :class:`ProbabilityStore` (plain writes, no memory map). A NaN or infinite probability is an error
naming the checkpoint and the slide (a checkpoint with broken weights would otherwise label every pixel one class).

The windows are blended as probabilities (the reduced probability map needs them), where MONAI Label's keys blend
logits and apply the same activation after: the two give the same labels where a single window covers a pixel, and
may differ where overlapping windows disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from monai.utils import convert_to_tensor
from torch import nn
from tqdm import tqdm

from ..constants import NO_TISSUE
from ..errors import DataError
from .outputs import LabelStore, ProbabilityStore
from .plan import Plan


class TileModel:
    """Per-class probabilities of a batch of tiles.

    Args:
        network: the segmentation network, logits B x C x h x w from B x 3 x h x w; converted to channels-last here.
        inferer: MONAI's ``SlidingWindowInferer`` (the config's ``inferer``).
        scale_intensity: a dictionary transform on key ``"image"`` that scales the uint8 RGB for the network: the
            config's ``scale_intensity``, which MONAI Label's ``preprocessing`` also applies.
        activation: logits B x C x h x w to per-class probabilities: the config's ``activation``, which MONAI Label's
            ``postprocessing`` also applies.
        num_classes: C.
        amp: run the network under autocast (CUDA only).
    """

    def __init__(
        self,
        network: nn.Module,
        inferer,
        scale_intensity: Callable,
        activation: Callable,
        num_classes: int,
        amp: bool = False,
    ):
        # same weights; channels-last measured 1.2x faster on CPU, and AMP likes it on CUDA
        self.network = network.to(memory_format=torch.channels_last)
        self.inferer, self.scale_intensity, self.activation = inferer, scale_intensity, activation
        self.num_classes, self.amp = num_classes, amp
        self.windows = 0  # windows the network has seen

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Probabilities of a batch of tiles.

        Args:
            image: B x 4 x S x S uint8 (RGB and the tissue mask as 0/1), as :class:`scripts.wsi.plan.TileDataset`
                gives it.

        Returns:
            B x C x S x S float per-class probabilities, zeros where no window held tissue.
        """
        rgb = convert_to_tensor(self.scale_intensity({"image": image[:, :3]})["image"], track_meta=False)
        return self.inferer(torch.cat([rgb.float(), image[:, 3:].float()], 1), self.tissue_windows)

    def tissue_windows(self, x: torch.Tensor) -> torch.Tensor:
        """The activation of the network on the windows that hold tissue, zeros on the others (their pixels are all
        background, so the zeros never reach a tissue pixel's blend).

        Args:
            x: N x 4 x h x w windows: the scaled RGB and the tissue channel.

        Returns:
            N x C x h x w float32.
        """
        keep = x[:, 3].flatten(1).amax(1) > 0
        out = x.new_zeros((x.shape[0], self.num_classes, *x.shape[2:]))
        if keep.any():
            with torch.autocast(x.device.type, enabled=self.amp):
                out[keep] = self.activation(self.network(x[keep, :3]).float())
            self.windows += int(keep.sum())
        return out


def store_tile(
    plan: Plan,
    origin: tuple[int, int],
    probs: np.ndarray,
    tissue: np.ndarray,
    labels: LabelStore,
    probabilities: np.ndarray | ProbabilityStore,
    counts: np.ndarray,
    prob_downsample: int,
) -> None:
    """Crop a tile's centre, label it (NO_TISSUE off the tissue mask) and write labels and reduced probabilities.

    Args:
        plan: the slide's plan (its grid, tile size and margin).
        origin: the tile's core top-left (y, x) in grid pixels.
        probs: C x S x S probabilities of the tile with its margin.
        tissue: S x S tissue mask (0/1) of the same pixels.
        labels: the grid's label store; the core's labels are written into it.
        probabilities: the reduced C x ceil(H / f) x ceil(W / f) map, an array or a :class:`ProbabilityStore`; the
            core's block means are written into it.
        counts: pixel counts per label value (256), added to.
        prob_downsample: f, the probability map's reduction.
    """
    (ty, tx), grid, m, f = origin, plan.grid, plan.margin, prob_downsample
    h, w = min(plan.tile, grid.height - ty), min(plan.tile, grid.width - tx)
    probs, tissue = probs[:, m : m + h, m : m + w], tissue[m : m + h, m : m + w].astype(bool)
    probs = probs * tissue
    label = np.where(tissue, probs.argmax(0), NO_TISSUE).astype(np.uint8)
    labels.write(ty, tx, label)
    counts += np.bincount(label.ravel(), minlength=256)
    rh, rw = -(-h // f), -(-w // f)
    padded = np.zeros((probs.shape[0], rh * f, rw * f), np.float32)
    padded[:, :h, :w] = probs
    area = np.zeros((rh * f, rw * f), np.float32)
    area[:h, :w] = 1
    block = padded.reshape(-1, rh, f, rw, f).sum((2, 4)) / area.reshape(rh, f, rw, f).sum((1, 3))
    probabilities[:, ty // f : ty // f + rh, tx // f : tx // f + rw] = block


def predict(
    plan: Plan,
    batches: Iterable[dict],
    model: Callable,
    labels: LabelStore,
    probabilities: np.ndarray | ProbabilityStore,
    prob_downsample: int,
    device: torch.device | str = "cpu",
    progress: bool = False,
    network_name: str = "the network",
) -> np.ndarray:
    """Every tissue tile of a plan through ``model`` into the label store and the reduced probability map.

    Args:
        plan: the slide's plan.
        batches: its tiles, batched: ``{"image": B x 4 x S x S uint8, "tile": B indices into plan.tiles}``, e.g. a
            DataLoader over :class:`scripts.wsi.plan.TileDataset`.
        model: B x 4 x S x S uint8 on ``device`` to B x C x S x S probabilities, e.g. a :class:`TileModel`.
        labels: the grid's label store, written tile by tile (:func:`store_tile`).
        probabilities: the reduced C x ceil(H / f) x ceil(W / f) map, written tile by tile.
        prob_downsample: f, the probability map's reduction.
        device: where the tiles go.
        progress: show a progress bar.
        network_name: what the network is, for the error on a NaN output: its checkpoint's path.

    Returns:
        Pixel counts per label value (256, int64) over the grid's inferred tiles.

    Raises:
        DataError: naming ``network_name`` and the slide, when a probability is NaN or infinite (nothing of the
            batch is written).
    """
    counts = np.zeros(256, np.int64)
    with torch.inference_mode():
        for batch in tqdm(batches, desc=Path(plan.path).stem, disable=not progress, unit="batch"):
            result = model(batch["image"].to(device)).float().cpu().numpy()
            finite = np.isfinite(result).reshape(len(result), -1).all(1)
            if not finite.all():
                ty, tx = plan.tiles[batch["tile"][int(np.argmin(finite))]]
                raise DataError(
                    f"{network_name}: the network's output is NaN or infinite on {plan.path} (the tile at "
                    f"grid row {ty}, column {tx}): the checkpoint's weights are broken (a diverged "
                    "training?) or the input overflows under amp (try --amp False)"
                )
            for b, index in enumerate(batch["tile"].tolist()):
                store_tile(
                    plan,
                    plan.tiles[index],
                    result[b],
                    batch["image"][b, 3].numpy(),
                    labels,
                    probabilities,
                    counts,
                    prob_downsample,
                )
    return counts
