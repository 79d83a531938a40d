"""Atomic file output: a reader never sees a half-written file, and a failure leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from pathlib import Path

from .errors import DataError


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    The temporary name keeps the suffix so that writers choosing a format by extension still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # not mkstemp: that creates the file with mode 0600, and outputs should get the user's usual permissions
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def writable_folder(folder: str | os.PathLike) -> Path:
    """``folder``, created; a DataError naming it when it cannot be written. Checked before work starts, so that an
    unwritable output folder fails in a second, not after an epoch or a slide."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise DataError(f"{folder}: the output folder cannot be written ({e.strerror or e})") from None
    return folder
