"""train.json (stage 3, run id `run`) through monai.bundle on tiny synthetic data with fake pseudo-masks: one epoch
from the command line, MONAI Label's keys, verify_net_in_out and TorchScript export of the trained model."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import BUNDLE, ROOT, configs
from monai.bundle import ConfigParser, ConfigWorkflow
from seg_fixtures import demo_with_pseudo_masks

CONFIG = configs("train.json")
META = BUNDLE / "configs" / "metadata.json"
TINY = {"pretrained": False, "batch_size": 4, "num_workers": 0, "progress_bar": False}
# one thread: on a busy 2-core machine two OpenMP threads wait on each other, up to 100x slower on tiny tensors
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
torch.set_num_threads(1)


def cli(*args, cwd=ROOT):
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=ONE_THREAD,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def overrides(**values):
    return [a for k, v in values.items() for a in (f"--{k}", str(v))]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_demo):
    """One epoch from the repo root with the MLPS layers (0.6 / 0.2 / 0.2 chosen from 'pseudo_layers')."""
    root = tmp_path_factory.mktemp("seg")
    datalist = demo_with_pseudo_masks(tiny_demo)
    result = cli(
        "run",
        "--bundle_root",
        str(BUNDLE),
        "--config_file",
        str(CONFIG),
        "--meta_file",
        str(META),
        *overrides(
            pseudo_datalist=datalist,
            ckpt_dir=root / "models",
            log_dir=root / "logs",
            **{**TINY, "train#trainer#max_epochs": 1},
        ),
    )
    return datalist, root, result.stderr + result.stdout


def test_one_epoch_selects_on_pseudo_mask_agreement(trained):
    _, root, log = trained
    assert "val_pseudo_miou" in log and "Key metric: val_pseudo_miou best value" in log
    assert {p.name for p in (root / "models").iterdir()} == {"model.pt", "seg_last.pt"}
    saved = torch.load(root / "models" / "model.pt", weights_only=True)
    assert saved["model"]["segmentation_head.0.weight"].shape[0] == 3  # one output channel per datalist class
    assert saved["contract"]["classes"] == ["stroma", "gland", "lymphocytes"]  # the checkpoint knows its classes
    assert saved["contract"]["backbone"] == "efficientnet-lite0" and saved["contract"]["scaling"] == [0, 255, 0, 1]
    assert any((root / "logs").iterdir())  # TensorBoard events


def test_monai_label_keys_and_properties(trained, tmp_path):
    datalist, _, _ = trained
    parser = ConfigParser()
    parser.read_config(CONFIG)
    for key in (
        "train#dataset#data",
        "validate#dataset#data",
        "train#trainer#max_epochs",
        "network_def",
        "network",
        "device",
        "bundle_root",
        "run",
        "train#handlers",
        "train#dataloader#num_workers",
        "validate#dataloader#num_workers",
    ):
        assert key in parser, key
    wf = ConfigWorkflow(
        config_file=CONFIG,
        workflow_type="train",
        bundle_root=str(BUNDLE),
        pseudo_datalist=datalist,
        ckpt_dir=str(tmp_path),
        log_dir=str(tmp_path),
        **TINY,
    )
    wf.initialize()
    assert not wf.check_properties()
    assert wf.parser.get_parsed_content("layer_weights") == [0.6, 0.2, 0.2]  # MLPS: one weight per pseudo_layers mask
    train, held = (
        wf.parser.get_parsed_content("train#dataset#data"),
        wf.parser.get_parsed_content("validate#dataset#data"),
    )
    assert held and not {e["image"] for e in train} & {e["image"] for e in held}  # held-back images never trained on
    batch = wf.parser.get_parsed_content("train#dataset")[0]
    assert batch["image"].shape == (3, 32, 32) and batch["label"].shape == (3, 32, 32)
    assert batch["label"].max() == 255  # the fake layers' ignored rows survive loading and augmentation


def test_fixed_schedule_without_holdout(trained, tmp_path):
    datalist, _, _ = trained
    wf = ConfigWorkflow(
        config_file=CONFIG,
        workflow_type="train",
        bundle_root=str(BUNDLE),
        pseudo_datalist=datalist,
        ckpt_dir=str(tmp_path),
        log_dir=str(tmp_path),
        holdout_fraction=0,
        layer_weights=[1.0],
        **{**TINY, "train#trainer#max_epochs": 1},
    )
    wf.initialize()
    wf.run()
    assert {p.name for p in tmp_path.iterdir() if p.suffix == ".pt"} == {"model.pt"}
    wf.finalize()


@pytest.mark.slow
def test_verify_net_in_out_and_torchscript_export(trained, tmp_path):
    # like every MONAI bundle command other than `run`, these import `scripts` from the bundle folder
    datalist, root, _ = trained
    cli(
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "['configs/common.json','configs/train.json']",
        *overrides(pseudo_datalist=datalist, pretrained=False),
        cwd=BUNDLE,
    )
    exported = tmp_path / "model.ts"
    cli(
        "ckpt_export",
        "network_def",
        "--filepath",
        str(exported),
        "--ckpt_file",
        str(root / "models" / "model.pt"),
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/common.json",
        "--key_in_ckpt",
        "model",
        *overrides(datalist=datalist),
        cwd=BUNDLE,
    )
    from monai.networks.nets import FlexibleUNet

    import scripts.seg.net  # noqa: F401  (registers efficientnet-lite0)

    net = FlexibleUNet(3, 3, "efficientnet-lite0", pretrained=False).eval()
    net.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True)["model"])
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(exported))(x), net(x))
