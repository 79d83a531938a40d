"""The README's main command, `python -m monai.bundle run training`, end to end on a tiny synthetic demo: every stage
runs once (classifier → pseudo-labels with a tiny random SAM → segmentation → evaluation), a second run skips them
all, and forcing the pseudo-label stage re-runs it and the stages after it."""

import json
import os
import subprocess
import sys

import pytest

from conftest import BUNDLE

SMALL = "$scripts.synthetic.prepare_demo(@demo_dir, n_train=4, n_validation=1, n_test=2, tile_size=64, slide_size=256, patch_size=32, stride=32)"
TINY = {"cam_epochs": 1, "cam_input_size": 32, "max_epochs": 1, "refine_iterations": 1, "sam_backend": "tiny",
        "pretrained": False, "batch_size": 4, "num_workers": 0, "progress_bar": False}


def run_training(root, *extra):
    args = [sys.executable, "-m", "monai.bundle", "run", "training", "--bundle_root", str(BUNDLE),
            "--config_file", str(BUNDLE / "configs" / "train.json"), "--meta_file", str(BUNDLE / "configs" / "metadata.json"),
            "--demo_dir", str(root / "demo"), "--datalist", SMALL, "--ckpt_dir", str(root / "models"),
            "--pseudo_dir", str(root / "pseudo"), "--eval_dir", str(root / "eval"), "--log_dir", str(root / "logs"),
            "--stages_dir", str(root / "stages"),
            *[a for k, v in TINY.items() for a in (f"--{k}", str(v))], *extra]
    result = subprocess.run(args, capture_output=True, text=True, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    return root, run_training(root)


def test_every_stage_runs_and_reports(first_run):
    root, log = first_run
    for stage in ("classify", "pseudo_label", "segment", "evaluate"):
        assert f"stage {stage}: finished" in log
    assert (root / "models" / "cam_best.pt").is_file() and (root / "models" / "model.pt").is_file()
    pseudo = json.loads((root / "pseudo" / "datalist_pseudo.json").read_text())
    assert pseudo["classes"] == ["stroma", "gland", "lymphocytes"] and all("pseudo" in e for e in pseudo["training"])
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["images"] == 2 and 0 <= metrics["miou"] <= 1  # the demo's test split
    assert "evaluation on 2 images: mIoU" in log and str(root / "eval" / "overlays") in log
    assert not (root / "cufile.log").exists()
    assert (root / "stages" / "segment.json").is_file()  # records live with the run, not in the bundle
    assert not any(str(root) in p.read_text() for p in (BUNDLE / "stages").glob("*.json"))


def test_a_second_run_skips_finished_stages_and_force_reruns_from_a_stage(first_run):
    root, _ = first_run
    model = (root / "models" / "model.pt").stat().st_mtime_ns
    log = run_training(root)
    assert "finished in" not in log and log.count("done before") == 4
    assert (root / "models" / "model.pt").stat().st_mtime_ns == model
    log = run_training(root, "--force", "['pseudo_label']")
    assert "stage classify: done before" in log
    assert all(f"stage {s}: finished" in log for s in ("pseudo_label", "segment", "evaluate"))
    assert (root / "models" / "model.pt").stat().st_mtime_ns != model


def test_pipeline_settings_reach_their_stages(tmp_path):
    """Every classifier, pseudo-label and segmentation setting of `run training` is handed to its stage's config."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(ConfigParser.load_config_file(BUNDLE / "configs" / "train.json"))
    settings = {"cam_input_size": 96, "cam_epochs": 3, "cam_backbone": "efficientnet_lite0", "adl": True, "pda": False,
                "pda_warmup_epochs": 1, "cam_tta": "d4", "seg_tta": "flip", "sam_backend": "tiny", "sam_classes": ["gland"],
                "refine_iterations": 2, "refine_epochs": 1, "max_epochs": 5, "layer_weights": [1.0], "easy_mining": True,
                "batch_size": 3, "learning_rate": 0.01, "zoom": 0.5}
    (tmp_path / "datalist.json").write_text("{}")  # evaluation reads which split has masks
    parser.update({"bundle_root": str(BUNDLE), "datalist": str(tmp_path / "datalist.json"), **settings})
    classify, pseudo, segment, evaluate = (parser.get_parsed_content(f"stage#{name}#overrides")
                                           for name in ("classify", "pseudo_label", "segment", "evaluate"))
    assert {k: classify[k] for k in ("input_size", "max_epochs", "backbone", "adl", "pda", "pda_warmup_epochs")} == {
        "input_size": 96, "max_epochs": 3, "backbone": "efficientnet_lite0", "adl": True, "pda": False, "pda_warmup_epochs": 1}
    assert {k: pseudo[k] for k in ("input_size", "tta", "sam_backend", "sam_classes", "refine_iterations", "refine_epochs")} == {
        "input_size": 96, "tta": "d4", "sam_backend": "tiny", "sam_classes": ["gland"], "refine_iterations": 2,
        "refine_epochs": 1}
    assert {k: segment[k] for k in ("max_epochs", "layer_weights", "easy_mining", "batch_size", "learning_rate", "zoom")} == {
        "max_epochs": 5, "layer_weights": [1.0], "easy_mining": True, "batch_size": 3, "learning_rate": 0.01, "zoom": 0.5}
    assert evaluate["tta"] == "flip" and pseudo["seg_tta"] == "flip"  # the network's TTA: evaluation and relabelling


def test_self_training_adds_rounds(tmp_path):
    """--self_training 2: twice, the last network's predictions prompt SAM again (relabel) and a fresh network trains on
    those masks; the earlier rounds' models stay in models/round1, models/round2."""
    log = run_training(tmp_path, "--self_training", "2")
    stages = ("classify", "pseudo_label", "segment", "relabel_round2", "segment_round2", "relabel_round3", "segment_round3",
              "evaluate")
    for stage in stages:
        assert f"stage {stage}: finished" in log
    assert [line.split("stage ")[1].split(":")[0] for line in log.splitlines() if ": finished in" in line] == list(stages)
    for model in ("round1/model.pt", "round2/model.pt", "model.pt"):
        assert (tmp_path / "models" / model).is_file()
    relabelled = json.loads((tmp_path / "pseudo" / "round3" / "datalist_pseudo.json").read_text())
    assert all(len(e["pseudo_layers"]) == 1 for e in relabelled["training"])  # one layer: the segmentation maps
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["images"] == 2
