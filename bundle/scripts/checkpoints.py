"""Reading a checkpoint with ``weights_only=True``, every failure a DataError naming the file, and the contract a
checkpoint carries beside its weights (class names, backbone, input scaling, bundle version)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .errors import DataError

logger = logging.getLogger(__name__)


def read_state(path: Path, what: str) -> dict:
    """Read before building: a damaged file fails in a second, not after allocating ViT-H."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: {what} checkpoint not found") from None
    except Exception as e:  # torch raises pickle, zip and runtime errors for damaged files
        raise DataError(f"{path}: cannot read the {what} checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise DataError(f"{path}: a {what} checkpoint must be a state dict, got {type(state).__name__}")
    return state


def load_network(
    network: nn.Module, checkpoint: str | os.PathLike, what: str, device="cpu", classes: Sequence[str] | None = None
) -> nn.Module:
    """``network`` in eval mode with the weights of ``checkpoint``: a state dict (``cam_best.pt``, ``model.pt``) or a
    trainer's dict with a ``model`` entry (``cam_last.pt``). A missing, damaged or mismatched file is a DataError naming
    it and ``what`` it should hold; so are ``classes`` other than the checkpoint's (see :func:`check_classes`)."""
    path = Path(checkpoint)
    state = read_state(path, what)
    if classes is not None:
        _agreed_classes(state, path, classes, what)
    state = state.get("model", state)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DataError(f"{path}: not a {what} checkpoint of this network (check backbone and classes): {e}") from e
    return network.to(device).eval()


def _bundle_version() -> str:
    metadata = Path(__file__).resolve().parents[1] / "configs" / "metadata.json"
    return json.loads(metadata.read_text()).get("version", "unknown")


class Contract:
    """What a checkpoint must agree with to be used: its class names (in order), backbone, input scaling, and the
    bundle version that wrote it. Saved beside the weights (``CheckpointSaver(save_dict={"model": ..., "contract":
    ...})``) as plain lists and strings, so ``torch.load(..., weights_only=True)`` reads it.

    Args:
        classes: the class names, in the order of the network's output channels.
        backbone: the encoder's name.
        scale_intensity: the ``ScaleIntensityRanged`` the images went through (its range is recorded).
    """

    def __init__(self, classes: Sequence[str], backbone: str, scale_intensity=None):
        scaler = getattr(scale_intensity, "scaler", None)
        scaling = [float(getattr(scaler, k)) for k in ("a_min", "a_max", "b_min", "b_max")] if scaler else None
        self.state = {
            "classes": list(classes),
            "backbone": str(backbone),
            "scaling": scaling,
            "version": _bundle_version(),
        }

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


def checkpoint_classes(checkpoint: str | os.PathLike | None) -> list[str] | None:
    """The class names a checkpoint records, or None (no file yet, or written before checkpoints carried them)."""
    if checkpoint is None or not Path(checkpoint).is_file():
        return None
    return (read_state(Path(checkpoint), "model").get("contract") or {}).get("classes")


def model_classes(checkpoint: str | os.PathLike | None, metadata: str | os.PathLike) -> list[str]:
    """The class names of a deployed model: those its checkpoint records, else the metadata's output ``channel_def``
    (``run training`` writes the datalist's classes there), in channel order. What inference and MONAI Label's
    trainer use where there is no datalist.

    Args:
        checkpoint: the model checkpoint (``models/model.pt``), possibly not there yet.
        metadata: the bundle's ``configs/metadata.json``.

    Returns:
        The class names, in label order.
    """
    channels = json.loads(Path(metadata).read_text())["network_data_format"]["outputs"]["pred"]["channel_def"]
    return checkpoint_classes(checkpoint) or [name for _, name in sorted(channels.items(), key=lambda kv: int(kv[0]))]


def check_classes(checkpoint: str | os.PathLike, classes: Sequence[str] | None, what: str = "model") -> list[str]:
    """The class names a checkpoint was trained on; a DataError when ``classes`` (the run's, e.g. ``--classes``) are
    not the same names in the same order: reordered or misspelt names would silently swap the outputs. An older
    checkpoint without names is accepted with a warning, ``classes`` then being trusted."""
    return _agreed_classes(read_state(Path(checkpoint), what), checkpoint, classes, what)


def _agreed_classes(state: dict, checkpoint, classes: Sequence[str] | None, what: str) -> list[str]:
    saved = (state.get("contract") or {}).get("classes")
    if saved is None:
        logger.warning(
            "%s: the %s checkpoint records no class names (written before v0.6); using %s",
            checkpoint,
            what,
            list(classes or []),
        )
        return list(classes or [])
    if classes is not None and list(classes) != list(saved):
        raise DataError(
            f"{checkpoint}: the {what} was trained on classes {list(saved)}, not {list(classes)} "
            "(leave --classes out to use the checkpoint's)"
        )
    return list(saved)
