import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundle"
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(BUNDLE))
os.environ.setdefault("CUFILE_LOGFILE_PATH", os.devnull)
os.environ.setdefault("CUFILE_LOGGING_LEVEL", "ERROR")


def shared(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test: users and fresh machines do not have it."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (real data lives only in ../shared/data)")
    return path
