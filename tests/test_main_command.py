"""The README's main command: `python -m monai.bundle run training` on the embedded synthetic default."""

import json
import subprocess
import sys

from conftest import BUNDLE, ROOT


def test_run_training_prepares_the_demo_through_monai_bundle(tmp_path):
    small = "$scripts.synthetic.prepare_demo(@demo_dir, n_train=2, n_validation=1, n_test=1, tile_size=64, slide_size=256)"
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "training", "--bundle_root", str(BUNDLE),
         "--config_file", str(BUNDLE / "configs" / "train.json"), "--meta_file", str(BUNDLE / "configs" / "metadata.json"),
         "--demo_dir", str(tmp_path / "demo"), "--datalist", small],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "demo" / "datalist.json").read_text())
    assert data["classes"] == ["stroma", "gland", "lymphocytes"]
    assert data["training"] and data["validation"] and data["test"]
    assert (tmp_path / "demo" / "slide" / "demo_slide.tif").is_file()
