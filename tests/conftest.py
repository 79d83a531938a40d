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


def configs(*names: str) -> list[str]:
    """A stage's config files as the bundle runs them: the shared base ``common.json``, then the overlays."""
    return [str(BUNDLE / "configs" / name) for name in ("common.json", *names)]


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> str:
    """The tiny synthetic demo the workflow tests train on (4 training, 2 validation 64-px tiles cut into 32-px
    patches, no test split); one copy per session. Tests may add files beside it but must not change it."""
    from scripts.data.demo import prepare_demo

    root = tmp_path_factory.mktemp("tiny_demo")
    return prepare_demo(
        str(root), n_train=4, n_validation=2, n_test=0, tile_size=64, slide_size=64, patch_size=32, stride=32
    )


def shared(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test: users and fresh machines do not have it."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (real data lives only in ../shared/data)")
    return path
