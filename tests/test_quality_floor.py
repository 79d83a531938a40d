"""Quality floor with the real weights (ImageNet encoder, LiteMedSAM): a reduced demo through `run training` must
segment its test tiles clearly better than a broken pipeline does.

Measured on 2 CPU cores with these settings (8/4/4 tiles of 256 px, 3 classifier epochs, one refinement round,
8 segmentation epochs; about 75 s a run): test mIoU 0.497 / 0.745 / 0.566 with seeds 0 / 1 / 2; broken on purpose,
0.329 with an untrained classifier (learning rate 0) and 0.199 with noise for pseudo-masks; the best constant class
scores 0.220. The floor 0.42 lies between the worst trained seed and the best broken run (margins 0.08 and 0.09);
the test runs seed 0, the default. The untrained-classifier control re-checks that margin when the floor or the
pipeline changes (``WSSS_CALIBRATION=1``); CI's 25 minutes leave room for the noise-mask control only."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import BUNDLE, bundle_run
from PIL import Image

pytestmark = pytest.mark.slow
FLOOR = 0.42
REDUCED = {"cam_epochs": 3, "max_epochs": 8, "refine_iterations": 1, "refine_epochs": 1, "progress_bar": False}


def run_training(root, *extra) -> float:
    """`run training` on the reduced demo into ``root``; returns the test mIoU."""
    tiles = "n_train=8, n_validation=4, n_test=4, slide_size=256"
    demo = f"$scripts.data.demo.prepare_demo('{root.parent / 'demo'}', {tiles})"
    folders = {k: root / k for k in ("ckpt_dir", "pseudo_dir", "eval_dir", "log_dir", "stages_dir")}
    args = bundle_run("training", BUNDLE / "configs" / "pipeline.json", datalist=demo, **folders, **REDUCED)
    result = subprocess.run(
        [sys.executable, *args, *extra],
        capture_output=True,
        text=True,
        cwd=root.parent,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((root / "eval_dir" / "metrics.json").read_text())["miou"]


def test_the_reduced_demo_clears_the_floor_and_noise_masks_do_not(tmp_path):
    root = tmp_path / "run"
    assert run_training(root) > FLOOR
    # the same run with every pseudo-mask replaced by noise: the segmentation network must fall below the floor
    rng = np.random.default_rng(0)
    masks = [*root.glob("pseudo_dir/sam_iter*/*.png"), *root.glob("pseudo_dir/cam_layers/*.png")]
    for path in masks:
        shape = np.asarray(Image.open(path)).shape
        Image.fromarray(rng.integers(0, 3, shape).astype(np.uint8)).save(path)
    assert masks and run_training(root, "--skip", "['classify','pseudo_label']") < FLOOR


@pytest.mark.skipif(
    not os.environ.get("WSSS_CALIBRATION"),
    reason="calibration control of the floor (a whole reduced run, about 140 s; its margin is in the docstring): "
    "WSSS_CALIBRATION=1 runs it; the noise-mask control above runs always",
)
def test_an_untrained_classifier_does_not_clear_the_floor(tmp_path):
    untrained = ("--settings#classify#learning_rate", "0.0", "--settings#classify#head_lr_factor", "0")
    assert run_training(tmp_path / "run", *untrained) < FLOOR
