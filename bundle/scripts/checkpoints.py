"""Reading a state-dict checkpoint with ``weights_only=True``, every failure a DataError naming the file."""

from __future__ import annotations

from pathlib import Path

import torch

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
