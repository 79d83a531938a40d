"""WSI-SAM (Liu et al., MICCAI 2024 COMPAYL): Segment Anything that sees a place at two resolutions.

Re-implemented from the paper's description. SAM (any :func:`scripts.sam.model.load_sam` backend) stays frozen, its
image encoder and its mask decoder. Each region is encoded once per view (:meth:`MultiResSAM.encode`): the HR view at
the model's pixel size and the LR view around it (:mod:`scripts.sam.views`). Its prompts, all in one batch, pass
SAM's frozen decoder once per view with one extra trainable output token (HQ-SAM style): the HR token on the HR
view, the LR token on the LR view, each read out by its own MLP (256 -> 256 -> 256 -> 32 for SAM's 256-channel
decoder). A small fusion module builds 32-channel HR mask features from SAM's per-prompt upscaled mask features,
its final image embedding and an early encoder feature map (the first global-attention block of a ViT, the first
stage of LiteMedSAM's TinyViT). Cross-resolution fusion::

    mask = SAM's own HR logits + (HR-token weights + LR-token weights) . fused HR mask features

The tokens and the MLPs' last layers start at zero, so an untrained model gives SAM's masks up to the extra token's
share of the decoder's attention (0.6 % of the mask pixels on a GlaS crop with LiteMedSAM). A checkpoint holds only
the trainable parameters, the base SAM's name and a hash of its weights, and the pixel size it was trained at; it
refuses another base SAM.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP
from torch import nn

from ..atomic import atomic_output
from ..checkpoints import read_state
from ..errors import DataError
from .model import Frame, Masks, SegmentAnything, to_sam
from .views import Window, map_prompts

logger = logging.getLogger(__name__)


class View(NamedTuple):
    """One encoded view of a region."""

    features: torch.Tensor  # (1, C, h, w) SAM's final image embedding
    early: torch.Tensor  # (1, E, h', w') the early encoder features
    frame: Frame  # where the view's pixels sit in SAM's input
    window: Window  # where the view lies on level 0


class Region(NamedTuple):
    """A region's two encoded views; ``lr`` None for the HR-token-only model."""

    hr: View
    lr: View | None


def _early_stage(encoder: nn.Module) -> tuple[nn.Module, int]:
    """The encoder module whose output is the early feature map, and its channel count."""
    if hasattr(encoder, "blocks"):  # segment-anything's ViT: the first global-attention block (all of them if none)
        block = next((b for b in encoder.blocks if b.window_size == 0), encoder.blocks[0])
        return block, block.attn.qkv.in_features
    if hasattr(encoder, "layers"):  # TinyViT (LiteMedSAM): the first stage, tokens after its downsampling
        stage = encoder.layers[0]
        return stage, stage.downsample.out_dim if stage.downsample is not None else stage.dim
    raise DataError(f"WSI-SAM: no early feature stage known for a {type(encoder).__name__} image encoder")


def _as_map(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) ViT blocks or (B, N, C) TinyViT tokens -> (B, C, H, W)."""
    if x.ndim == 3:
        side = _square_side(x.shape[1])
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
    return x.permute(0, 3, 1, 2)


def _square_side(n: int) -> int:
    side = int(round(n**0.5))
    if side * side != n:
        raise DataError(f"WSI-SAM: early encoder tokens ({n}) do not form a square map")
    return side


class Fusion(nn.Module):
    """32-channel (``channels``) HR mask features from SAM's upscaled mask features of each prompt, its final image
    embedding (upsampled x4 like SAM's own) and the early encoder features (resized to the mask feature grid)."""

    def __init__(self, dim: int, early_dim: int, channels: int):
        super().__init__()
        self.mask = nn.Sequential(
            nn.Conv2d(channels, dim // 4, 3, padding=1),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.Conv2d(dim // 4, channels, 3, padding=1),
        )
        self.embedding = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, 2, 2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, channels, 2, 2),
        )
        self.early = nn.Sequential(
            nn.Conv2d(early_dim, dim // 4, 1),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.Conv2d(dim // 4, channels, 3, padding=1),
        )

    def forward(self, upscaled: torch.Tensor, features: torch.Tensor, early: torch.Tensor) -> torch.Tensor:
        size = upscaled.shape[-2:]
        early = F.interpolate(early, size=size, mode="bilinear", align_corners=False)
        return self.mask(upscaled) + self.embedding(features) + self.early(early)


def weights_hash(sam: SegmentAnything) -> str:
    """A hash of the base SAM's weights: a checkpoint's tokens are only valid on the SAM they were trained on."""
    digest = hashlib.sha256()
    for name, value in sorted(sam.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class MultiResSAM(nn.Module):
    """WSI-SAM's dual mask decoder over a frozen SAM (see the module docstring).

    Args:
        sam: the base SAM; frozen here, and kept in eval mode (TinyViT has BatchNorm).
        base: the base SAM's name (``sam_backend``), stored in checkpoints.
        mpp: the HR view's pixel size in um the model is trained for (None: the images' own pixels).
        use_lr: with the LR view and token; False is the HR-token-only ablation.
    """

    def __init__(self, sam: SegmentAnything, base: str, mpp: float | None = None, use_lr: bool = True):
        super().__init__()
        self.sam = sam.requires_grad_(False).eval()
        self.base, self.base_hash, self.mpp, self.use_lr = base, weights_hash(sam), mpp, use_lr
        decoder = sam.mask_decoder
        dim = decoder.transformer_dim
        channels = decoder.output_upscaling[-2].out_channels  # SAM's mask features: dim // 8
        stage, early_dim = _early_stage(sam.image_encoder)
        self._early_stage = (stage,)  # a tuple: the encoder's module, not a second copy in this model's state
        self.tokens = nn.Embedding(2, dim)  # 0: HR token, 1: LR token; zero: the least change to SAM's attention
        nn.init.zeros_(self.tokens.weight)
        self.mlps = nn.ModuleList(MLP(dim, dim, channels, 3) for _ in range(2))
        for mlp in self.mlps:
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)
        self.fusion = Fusion(dim, early_dim, channels)
        self.to(sam.device)

    def train(self, mode: bool = True) -> MultiResSAM:
        super().train(mode)
        self.sam.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.sam.device

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("sam.")}

    @torch.no_grad()
    def encode(self, image: np.ndarray, window: Window) -> View:
        """One view through SAM's frozen image encoder, keeping the early features on the way."""
        x, frame = self.sam.preprocess(image)
        seen = []
        hook = self._early_stage[0].register_forward_hook(lambda module, args, out: seen.append(out))
        try:
            with self.sam._autocast():
                features = self.sam.image_encoder(x)
        finally:
            hook.remove()
        return View(features.float(), _as_map(seen[0]).float(), frame, window)

    def region(self, hr_image: np.ndarray, hr: Window, lr_image: np.ndarray | None) -> Region:
        """Both views of a region encoded (the LR one only when the model uses it)."""
        lr = self.encode(lr_image, hr.context()) if self.use_lr and lr_image is not None else None
        return Region(self.encode(hr_image, hr), lr)

    def _decode(self, view: View, token: int, boxes, points, labels):
        """SAM's frozen decoder with ``token`` appended -> SAM's own logits (N, 1, H, W), the token's weights (N, c)
        and SAM's upscaled mask features of each prompt (N, c, H, W). Prompts in the view's (y, x) pixels."""
        sam, decoder = self.sam, self.sam.mask_decoder
        box_t = None if boxes is None else torch.as_tensor(to_sam(boxes, view.frame), device=self.device)
        point_t = None
        if points is not None and np.shape(points)[1] > 0:
            point_t = (
                torch.as_tensor(to_sam(points, view.frame), device=self.device),
                torch.as_tensor(np.asarray(labels), dtype=torch.int64, device=self.device),
            )
        if box_t is None and point_t is None:
            raise DataError("WSI-SAM prompts need boxes or at least one point each")
        sparse, dense = sam.prompt_encoder(points=point_t, boxes=box_t, masks=None)
        n = len(sparse)
        extra = self.tokens.weight[token : token + 1]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight, extra])
        tokens = torch.cat([output_tokens[None].expand(n, -1, -1), sparse], dim=1)
        src = view.features.expand(n, -1, -1, -1) + dense
        pos = sam.prompt_encoder.get_dense_pe().expand(n, -1, -1, -1)
        hs, src = decoder.transformer(src, pos, tokens)
        src = src.transpose(1, 2).reshape(src.shape[0], -1, *view.features.shape[-2:])
        upscaled = decoder.output_upscaling(src)
        sam_weights = decoder.output_hypernetworks_mlps[0](hs[:, 1])  # SAM's single-mask output
        sam_logits = torch.einsum("nc,nchw->nhw", sam_weights, upscaled)[:, None]
        weights = self.mlps[token](hs[:, 1 + decoder.num_mask_tokens])
        return sam_logits, weights, upscaled

    def forward(self, region: Region, boxes=None, points=None, point_labels=None) -> torch.Tensor:
        """All prompts of a region at once -> mask logits (N, 1, H, W) in SAM's input frame of the HR view.

        ``boxes`` (N, 4) (y0, x0, y1, x1) and ``points`` (N, P, 2) (y, x) with ``point_labels`` (N, P) (1 in, 0 out,
        -1 padding), all in the HR view's pixels; they reach the LR view through level 0 (:func:`map_prompts`).
        """
        hr, lr = region
        sam_logits, weights, upscaled = self._decode(hr, 0, boxes, points, point_labels)
        if lr is not None and self.use_lr:
            lr_boxes = None if boxes is None else map_prompts(boxes, hr.window, lr.window)
            lr_points = None if points is None else map_prompts(points, hr.window, lr.window)
            weights = weights + self._decode(lr, 1, lr_boxes, lr_points, point_labels)[1]
        fused = self.fusion(upscaled, hr.features, hr.early)
        return sam_logits + torch.einsum("nc,nchw->nhw", weights, fused)[:, None]

    @torch.inference_mode()
    def predict(self, region: Region, boxes=None, points=None, point_labels=None, multimask=False) -> Masks:
        """Masks at the HR view's size for all prompts at once, as :meth:`SegmentAnything.predict` (so the stage-2
        rules take either model); ``multimask`` is not supported (WSI-SAM has one output per prompt)."""
        n = len(boxes) if boxes is not None else (len(points) if points is not None else 0)
        if n == 0:
            return Masks(np.zeros((0, *region.hr.frame.original), np.float32), np.zeros(0, np.float32))
        logits = self(region, boxes, points, point_labels)
        probs = torch.sigmoid(self.sam.to_image(logits, region.hr.frame))[:, 0]
        return Masks(probs.float().cpu().numpy(), np.full(n, np.nan, np.float32))

    def save(self, path: str | os.PathLike) -> None:
        """The trainable parameters, the base SAM's name and weight hash, the pixel size and the LR switch."""
        meta = {"base": self.base, "base_hash": self.base_hash, "mpp": self.mpp, "use_lr": self.use_lr}
        with atomic_output(path) as tmp:
            torch.save({"state": self.trainable_state(), **meta}, tmp)

    def load(self, path: str | os.PathLike) -> MultiResSAM:
        """Trained tokens, MLPs and fusion from :meth:`save`; another base SAM's checkpoint is a DataError."""
        saved = read_state(path, "WSI-SAM")
        if "state" not in saved or "base_hash" not in saved:
            raise DataError(f"{path}: not a WSI-SAM checkpoint (no trainable state and base SAM hash)")
        if saved["base_hash"] != self.base_hash:
            raise DataError(
                f"{path}: a WSI-SAM checkpoint for the base SAM {saved.get('base')!r} (weights {saved['base_hash']}), "
                f"but the base SAM is {self.base!r} (weights {self.base_hash}); load it with the SAM it was trained on"
            )
        try:
            missing, unexpected = self.load_state_dict(saved["state"], strict=False)
        except RuntimeError as e:
            raise DataError(f"{path}: the WSI-SAM checkpoint does not fit this model ({e})") from e
        missing = [k for k in missing if not k.startswith("sam.")]
        if missing or unexpected:
            raise DataError(f"{path}: the WSI-SAM checkpoint lacks {missing} and has unknown {unexpected}")
        self.mpp = self.mpp if saved.get("mpp") is None else float(saved["mpp"])
        self.use_lr = bool(saved.get("use_lr", True))
        return self


def load_multires(
    sam: SegmentAnything,
    base: str,
    checkpoint: str | os.PathLike | None = None,
    mpp: float | None = None,
    use_lr: bool = True,
) -> MultiResSAM:
    """WSI-SAM over ``sam`` in eval mode: trained from ``checkpoint`` (its LR switch and its pixel size, when it
    records one, win), or fresh (untrained tokens: SAM's own masks) at ``mpp`` with ``use_lr``.

    Args:
        sam: the base SAM (:func:`scripts.sam.model.load_sam`).
        base: its backend name, for the checkpoint's record.
        checkpoint: a :meth:`MultiResSAM.save` file, or None.
        mpp: the HR pixel size of a fresh model (um/px; None: the images' own pixels).
        use_lr: whether a fresh model uses the LR view.
    """
    model = MultiResSAM(sam, base, mpp, use_lr)
    if checkpoint is None:
        logger.warning(f"WSI-SAM: no checkpoint, untrained tokens: the masks are about {base}'s own")
    else:
        model.load(checkpoint)
    return model.eval()


def trainable_parameters(model: MultiResSAM) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
