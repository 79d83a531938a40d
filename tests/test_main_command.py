"""The README's main command, `python -m monai.bundle run training`, end to end on the tiny synthetic demo: every stage
runs once (classifier → pseudo-labels with a tiny random SAM → segmentation → evaluation), a second run skips them
all, and a forced or changed stage re-runs from nothing with the stages after it."""

import json
import os
import subprocess
import sys

import pytest
from conftest import BUNDLE, bundle_run, check_evaluation_report

pytestmark = pytest.mark.slow  # about 95 s: whole pipeline runs on the tiny demo

TINY = {
    "cam_epochs": 1,
    "cam_input_size": 32,
    "max_epochs": 1,
    "refine_iterations": 1,
    "sam_backend": "tiny",
    "pretrained": False,
    "batch_size": 4,
    "num_workers": 0,
    "progress_bar": False,
}


def run_training(root, datalist, *extra, returncode=0):
    folders = {
        k: root / v
        for k, v in (
            ("ckpt_dir", "models"),
            ("pseudo_dir", "pseudo"),
            ("eval_dir", "eval"),
            ("log_dir", "logs"),
            ("stages_dir", "stages"),
        )
    }
    meta = BUNDLE / "configs" / "metadata.json"
    args = bundle_run(
        "training", BUNDLE / "configs" / "pipeline.json", meta_file=meta, datalist=datalist, **folders, **TINY
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, *args, *extra], capture_output=True, text=True, cwd=root, env=env, timeout=900
    )
    assert result.returncode == returncode, result.stderr[-4000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_demo):
    root = tmp_path_factory.mktemp("pipeline")
    return root, run_training(root, tiny_demo)


def test_every_stage_runs_and_reports(first_run):
    root, log = first_run
    for stage in ("classify", "pseudo_label", "segment", "evaluate"):
        assert f"stage {stage}: finished" in log
    assert (root / "models" / "cam_best.pt").is_file() and (root / "models" / "model.pt").is_file()
    pseudo = json.loads((root / "pseudo" / "datalist_pseudo.json").read_text())
    assert pseudo["classes"] == ["stroma", "gland", "lymphocytes"] and all("pseudo" in e for e in pseudo["training"])
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["images"] == 2  # the demo's validation split (no test masks)

    check_evaluation_report(metrics, root / "pseudo" / "datalist_pseudo.json")  # its validation split, paths re-based
    assert f"mIoU {metrics['miou']:.3f}" in log
    assert "evaluation on 2 images: mIoU" in log and str(root / "eval" / "overlays") in log
    assert not (root / "cufile.log").exists()
    assert (root / "stages" / "segment.json").is_file()  # records live with the run, not in the bundle
    assert not any(str(root) in p.read_text() for p in (BUNDLE / "stages").glob("*.json"))


def test_a_second_run_skips_finished_stages_and_force_reruns_from_a_stage(first_run, tiny_demo):
    root, _ = first_run
    model = (root / "models" / "model.pt").stat().st_mtime_ns
    log = run_training(root, tiny_demo)
    assert "finished in" not in log and log.count("done before") == 4
    assert (root / "models" / "model.pt").stat().st_mtime_ns == model
    log = run_training(root, tiny_demo, "--force", "['pseudo_label']")
    assert "stage classify: done before" in log
    assert all(f"stage {s}: finished" in log for s in ("pseudo_label", "segment", "evaluate"))
    assert "pseudo-labels: 0 of 4 images done, 4 to go" in log  # from nothing, not from the old masks
    assert (root / "models" / "model.pt").stat().st_mtime_ns != model


def test_forcing_the_classifier_recomputes_the_pseudo_masks(first_run, tiny_demo):
    """Issue: `--force "['classify']"` used to retrain the classifier but reuse every old pseudo-mask."""
    root, _ = first_run
    masks = {p: p.stat().st_mtime_ns for p in (root / "pseudo" / "sam_iter0").glob("*.png")}
    log = run_training(root, tiny_demo, "--force", "['classify']")
    assert all(f"stage {s}: finished" in log for s in ("classify", "pseudo_label", "segment", "evaluate"))
    assert "pseudo-labels: 0 of 4 images done, 4 to go" in log  # from nothing, not from the old masks
    assert masks and all(p.stat().st_mtime_ns != t for p, t in masks.items())


def test_another_datalist_reruns_every_stage_and_says_why(first_run, tiny_demo, tmp_path):
    """Issue: after the demo, `run training --datalist other.json` skipped every stage and reported the demo's
    metrics."""
    root, _ = first_run
    data = json.loads(open(tiny_demo).read())
    data["validation"] = data["validation"][: len(data["validation"]) // 2]  # one image fewer to evaluate
    for entry in data["training"] + data["validation"]:  # the new file lives elsewhere: absolute paths
        entry.update({k: os.path.join(os.path.dirname(tiny_demo), entry[k]) for k in ("image", "mask") if k in entry})
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    log = run_training(root, str(other))
    assert "stage classify: runs again: datalist changed; settings changed (datalist)" in log
    assert all(f"stage {s}: finished" in log for s in ("classify", "pseudo_label", "segment", "evaluate"))
    assert json.loads((root / "eval" / "metrics.json").read_text())["images"] == 1


def test_self_training_adds_rounds(tmp_path, tiny_demo):
    """--self_training 2: twice, the last network's predictions prompt SAM again (relabel) and a fresh network trains on
    those masks; the earlier rounds' models stay in models/round1, models/round2."""
    log = run_training(tmp_path, tiny_demo, "--self_training", "2")
    stages = (
        "classify",
        "pseudo_label",
        "segment",
        "relabel_round2",
        "segment_round2",
        "relabel_round3",
        "segment_round3",
        "evaluate",
    )
    for stage in stages:
        assert f"stage {stage}: finished" in log
    assert [line.split("stage ")[1].split(":")[0] for line in log.splitlines() if ": finished in" in line] == list(
        stages
    )
    for model in ("round1/model.pt", "round2/model.pt", "model.pt"):
        assert (tmp_path / "models" / model).is_file()
    relabelled = json.loads((tmp_path / "pseudo" / "round3" / "datalist_pseudo.json").read_text())
    assert all(len(e["pseudo_layers"]) == 1 for e in relabelled["training"])  # one layer: the segmentation maps
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["images"] == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--sam_classes", "['glnd']"), "error: sam_classes ['glnd'] are not among the datalist's classes"),
        (("--cam_epochs", "abc"), "error: setting max_epochs (stage classify): expected a whole number"),
        (("--force", "['clasify']"), "error: force/skip: unknown stage(s) ['clasify']"),
    ],
)
def test_a_user_error_ends_the_run_with_one_line_before_any_stage(tmp_path, tiny_demo, extra, message):
    log = run_training(tmp_path, tiny_demo, *extra, returncode=1)
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), log[-3000:]
    assert "Traceback" not in log and "stage classify:" not in log  # nothing ran


def test_the_v05_command_says_the_new_one(tmp_path):
    args = bundle_run("training", BUNDLE / "configs" / "train.json", meta_file=BUNDLE / "configs" / "metadata.json")
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    new = "is now run training --config_file configs/pipeline.json"
    assert result.returncode == 1 and new in result.stderr.strip().splitlines()[-1]
