"""multi_gpu_train.json merged on top of the segmentation trainer config, started by torchrun with 2 CPU ranks
(gloo)."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import BUNDLE, ROOT, bundle_run, configs
from seg_fixtures import demo_with_pseudo_masks

TRAIN = configs("train.json")
MULTI = BUNDLE / "configs" / "multi_gpu_train.json"


@pytest.mark.slow
def test_two_cpu_ranks_train_one_epoch(tmp_path, tiny_demo):
    datalist = demo_with_pseudo_masks(tiny_demo)
    overrides = {
        "pseudo_datalist": datalist,
        "ckpt_dir": tmp_path / "models",
        "log_dir": tmp_path / "logs",
        "pretrained": False,
        "batch_size": 2,
        "num_workers": 0,
        "progress_bar": False,
        "max_epochs": 1,
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        *bundle_run(None, [*TRAIN, MULTI], meta_file=BUNDLE / "configs" / "metadata.json", **overrides),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    log = result.stdout + result.stderr
    assert "Key metric: val_pseudo_miou best value" in log  # the metric all-reduced over both ranks' validation shards
    assert {p.name for p in (tmp_path / "models").iterdir()} == {"model.pt", "seg_last.pt"}  # rank 0 saves, once
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)["model"]
    assert not any(k.startswith("module.") for k in state)  # saved unwrapped: loads into the plain network
