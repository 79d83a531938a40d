"""Class activation maps for pseudo-labels: CAM and Grad-CAM at several layers, with test-time augmentation.

Why not ``monai.visualize.CAM`` / ``GradCAM``: they compute one class per call, register hooks they never
remove (and switch ``inplace`` off for good), and their default post-processing maps (min, max) to (1, 0),
i.e. inverts the map. Here every tagged class of a batch comes from one forward pass per augmentation, the
hooks live only inside :func:`layer_outputs`, and maps are normalised by their maximum (0 stays 0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer
from torch import nn

from .. import tta as augment
from ..constants import IGNORE
from ..errors import DataError


@contextlib.contextmanager
def layer_outputs(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the named submodules of ``model`` while the block runs; the hooks are removed
    on exit, error or not. Downstream layers get a copy, so a later in-place op cannot alter a record."""
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        stages = [
            n for n in modules if n.count(".") <= 2 and n.startswith(("backbone.blocks", "backbone.bn", "classifier"))
        ]
        raise DataError(f"CAM layers {unknown} are not modules of the network; e.g. {stages}")
    records: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, _inputs, output):
            records[name] = output
            return output.clone()

        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def white_background(rgb: torch.Tensor, threshold: float = 0.8) -> torch.Tensor:
    """(B, 1, H, W) 1.0 where a pixel of RGB in [0, 1] is white (every channel above ``threshold``): glass,
    not tissue, in datasets where white is no class (LUAD-HistoSeg, BCSS-WSSS)."""
    return (rgb.amin(1, keepdim=True) > threshold).to(rgb.dtype)


class MultiLayerCAM:
    """Per-class activation maps of a :class:`scripts.cam.net.CAMNet` at several layers.

    ``layers`` are module names of the network: ``cam_layer`` (the 1x1 classifier, whose output *is* the
    CAM) gives the CAM, any other layer a Grad-CAM (Selvaraju et al., 2017; one backward pass per class
    present in the batch, so it runs under :func:`torch.enable_grad` whatever the caller's context).
    Maps are upsampled to the input, averaged over the ``tta`` transforms after undoing each, kept only for
    the classes a patch is tagged with, and (``normalize``) divided by their maximum, so each lies in [0, 1].
    Un-normalised maps are comparable between windows of one image: merge those, then normalise the image.
    """

    def __init__(
        self,
        network: nn.Module,
        layers: Sequence[str] = ("classifier", "backbone.blocks.5", "backbone.blocks.4"),
        tta: str = "d4",
        cam_layer: str = "classifier",
        normalize: bool = True,
    ):
        if not layers:
            raise DataError("MultiLayerCAM needs at least one layer")
        self.network, self.layers, self.transforms, self.cam_layer = (
            network,
            tuple(layers),
            augment.transforms(tta),
            cam_layer,
        )
        self.normalize = normalize

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        background: torch.Tensor | None = None,
        threshold: float = 0.5,
    ) -> dict[str, torch.Tensor]:
        """``images`` (B, 3, H, W) as the network expects them; ``labels`` (B, C) multi-hot tags, or None to
        keep the classes the network predicts (probability >= ``threshold`` on the un-augmented image).
        ``background`` (B, 1, H, W) in [0, 1] (e.g. :func:`white_background`) is appended as channel C and
        suppresses the class maps where it is 1. Returns ``{layer: (B, C[+1], H, W)}``."""
        was_training = self.network.training
        self.network.eval()
        sums = dict.fromkeys(self.layers, 0.0)
        try:
            with torch.enable_grad(), layer_outputs(self.network, self.layers) as records:
                for k, flip in self.transforms:
                    x = (
                        augment.apply(images, k, flip).detach().requires_grad_(True)
                    )  # gradients even if weights are frozen
                    logits = self.network(x)
                    if labels is None:
                        labels = torch.sigmoid(logits.detach()) >= threshold
                    for layer, maps in self._maps(records, logits, labels).items():
                        maps = F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False)
                        sums[layer] = sums[layer] + augment.invert(maps, k, flip)
        finally:
            self.network.train(was_training)
        keep = labels.to(images.dtype)[:, :, None, None]
        out = {}
        for layer, maps in sums.items():
            maps = maps * keep / len(self.transforms)
            if self.normalize:
                maps = maps / maps.amax((2, 3), keepdim=True).clamp_min(1e-12)
            if background is not None:
                maps = torch.cat([maps * (1 - background), background], 1)
            out[layer] = maps
        return out

    def _maps(self, records: dict, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        classes = torch.nonzero(labels.any(0)).flatten().tolist()
        grad_layers = [n for n in self.layers if n != self.cam_layer]
        maps = {}
        if self.cam_layer in self.layers:
            maps[self.cam_layer] = F.relu(records[self.cam_layer].detach().float())
        for n in grad_layers:
            b, _, h, w = records[n].shape
            maps[n] = logits.new_zeros(b, logits.shape[1], h, w, dtype=torch.float32)
        for i, c in enumerate(classes):
            grads = (
                torch.autograd.grad(
                    logits[:, c].sum(), [records[n] for n in grad_layers], retain_graph=i < len(classes) - 1
                )
                if grad_layers
                else ()
            )
            for n, g in zip(grad_layers, grads):
                weights = g.mean((2, 3), keepdim=True)
                maps[n][:, c] = F.relu((weights * records[n]).sum(1)).detach().float()
        return maps


class WholeImageCAM:
    """Inferer: :class:`MultiLayerCAM` maps of whole images, at the pixel scale the classifier was trained at.

    With ``window`` (the training patch size in pixels) the image is read in windows of that size (overlap 0.5),
    each resized to ``input_size`` like a training patch, and the un-normalised maps are merged with Gaussian
    weights (window borders, where padding makes spurious peaks, count least); without it the image is resized to
    ``input_size`` whole (a classifier trained on whole images). Each window keeps the classes the network
    predicts there; the caller drops the classes the image is not tagged with. Every map is then divided by its
    maximum over the image, so the maps of one image compare and lie in [0, 1].

    Args:
        layers: module names of the network whose maps are returned, in output order (see :class:`MultiLayerCAM`).
        input_size: side in pixels the classifier was trained at; each window (or the whole image) is resized to it.
        mean: per-channel normalisation mean of RGB in [0, 1] (the backbone's ``pretrained_cfg``).
        std: per-channel normalisation standard deviation, likewise.
        window: training patch side in pixels, the sliding-window size; None resizes the whole image.
        tta: test-time augmentation per window: ``"none"``, ``"flip"`` or ``"d4"`` (:mod:`scripts.tta`).
        sw_batch_size: windows per forward pass.
    """

    def __init__(
        self,
        layers: Sequence[str],
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        window: int | None = None,
        tta: str = "none",
        sw_batch_size: int = 16,
    ):
        self.layers, self.input_size, self.window, self.tta = tuple(layers), int(input_size), window, tta
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        self.sw_batch_size = sw_batch_size

    def __call__(self, inputs: torch.Tensor, network: nn.Module) -> torch.Tensor:
        """(B, 3, H, W) RGB in 0-255 -> (B, L, C, H, W) maps of the L ``layers``."""
        extract = MultiLayerCAM(network, self.layers, tta=self.tta, normalize=False)
        mean, std = self.mean.to(inputs.device), self.std.to(inputs.device)

        def predict(windows: torch.Tensor) -> tuple[torch.Tensor, ...]:
            x = F.interpolate(windows, size=(self.input_size,) * 2, mode="bilinear", align_corners=False)
            cams = extract((x - mean) / std)
            return tuple(
                F.interpolate(cams[n], size=windows.shape[-2:], mode="bilinear", align_corners=False)
                for n in self.layers
            )

        x = inputs.float() / 255
        if self.window is None:
            maps = predict(x)
        else:
            maps = SlidingWindowInferer(self.window, self.sw_batch_size, overlap=0.5, mode="gaussian")(x, predict)
        maps = torch.stack(maps, 1)
        return maps / maps.amax((-2, -1), keepdim=True).clamp_min(1e-12)


def cams_to_mask(cams: torch.Tensor, threshold: float | None = None, ignore_index: int = IGNORE) -> torch.Tensor:
    """(B, C, H, W) normalised maps -> (B, H, W) uint8 class index by arg-max; with ``threshold``, pixels
    whose best map is below it get ``ignore_index`` (uncertain)."""
    best, index = cams.max(1)
    index = index.to(torch.uint8)
    if threshold is not None:
        index[best < threshold] = ignore_index
    return index
