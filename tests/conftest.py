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


def bundle_run(run_id: str | None, config_file, **overrides) -> list[str]:
    """The arguments of ``python -m monai.bundle run [RUN_ID]`` on this bundle, as users type them: ``config_file`` a
    path or a list of paths, each override ``--key value``."""
    config = str(config_file if isinstance(config_file, (str, Path)) else [str(c) for c in config_file])
    args = ["-m", "monai.bundle", "run", *([run_id] if run_id else []), "--bundle_root", str(BUNDLE)]
    return [*args, "--config_file", config, *[a for k, v in overrides.items() for a in (f"--{k}", str(v))]]


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
