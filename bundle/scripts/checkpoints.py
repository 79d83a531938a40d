"""Reading a state-dict checkpoint with ``weights_only=True``, every failure a DataError naming the file."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .errors import DataError


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


def load_network(network: nn.Module, checkpoint: str | os.PathLike, what: str, device="cpu") -> nn.Module:
    """``network`` in eval mode with the weights of ``checkpoint``: a state dict (``cam_best.pt``, ``model.pt``) or a
    trainer's dict with a ``model`` entry (``cam_last.pt``). A missing, damaged or mismatched file is a DataError naming
    it and ``what`` it should hold."""
    path = Path(checkpoint)
    state = read_state(path, what)
    state = state.get("model", state)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DataError(f"{path}: not a {what} checkpoint of this network (check backbone and classes): {e}") from e
    return network.to(device).eval()
