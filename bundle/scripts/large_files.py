"""Weights too large for git: ``bundle/large_files.yml`` lists each file (path under the bundle, URL, hash), which
``python -m monai.bundle download_large_files --bundle_path bundle`` fetches, and every loader checks the hash it
reads against, so a truncated or swapped file is named, never loaded."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from .errors import DataError

BUNDLE = Path(__file__).resolve().parents[1]
LARGE_FILES = BUNDLE / "large_files.yml"


def large_file(prefix: str) -> dict:
    """The entry of ``large_files.yml`` whose file name starts with ``prefix`` (``path``: under the bundle)."""
    for entry in yaml.safe_load(LARGE_FILES.read_text())["large_files"]:
        if Path(entry["path"]).name.startswith(prefix):
            return entry
    raise DataError(f"{LARGE_FILES}: no entry for a file named {prefix}*")


def check_file(path: str | Path, hash_type: str, hash_val: str, what: str) -> None:
    """Refuse a missing ``path`` or one whose ``hash_type`` digest is not ``hash_val``, naming the file and ``what``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} checkpoint not found (expected {hash_type} {hash_val})")
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, hash_type).hexdigest()
    if digest != hash_val:
        raise DataError(
            f"{path}: {hash_type} is {digest}, expected {hash_val} for the {what} checkpoint; "
            "the file is corrupt, truncated or another model"
        )
