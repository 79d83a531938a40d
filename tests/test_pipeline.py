"""Stage orchestration of the ``training`` run id: skip finished stages, force, re-run after interruption."""

import json
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from scripts.errors import DataError
from scripts.pipeline import eval_split, report, run_stages, self_training_stages


@pytest.fixture
def stages(tmp_path):
    """Three stages whose workflow appends to its output file, so a file's length counts the runs; ``b`` fails while
    ``fail`` exists, after writing its output (like a checkpoint saved on an exception)."""
    (tmp_path / "configs").mkdir()
    made = []
    for name in "abc":
        config = {"out": "", "fail": "", "run": ["$open(@out, 'a').write('x')",
                                                 "$os.path.exists(@fail) and 1 / 0"], "imports": ["$import os"]}
        path = tmp_path / "configs" / f"{name}.json"
        path.write_text(json.dumps(config))
        out = tmp_path / f"{name}.txt"
        fail = tmp_path / "fail" if name == "b" else tmp_path / "never"
        made.append({"name": name, "config_file": str(path), "outputs": [str(out)],
                     "overrides": {"out": str(out), "fail": str(fail)}})
    return tmp_path, made


def runs(root):
    return {n: len((root / f"{n}.txt").read_text()) if (root / f"{n}.txt").exists() else 0 for n in "abc"}


def test_finished_stages_are_skipped(stages):
    root, made = stages
    assert run_stages(str(root / "stages"), made) == ["a", "b", "c"]
    assert run_stages(str(root / "stages"), made) == []
    assert runs(root) == {"a": 1, "b": 1, "c": 1}
    assert json.loads((root / "stages" / "b.json").read_text())["outputs"] == made[1]["outputs"]


def test_forcing_a_stage_reruns_it_and_every_later_stage(stages):
    root, made = stages
    run_stages(str(root / "stages"), made)
    assert run_stages(str(root / "stages"), made, force=["b"]) == ["b", "c"]
    assert run_stages(str(root / "stages"), made, force=True) == ["a", "b", "c"]
    assert runs(root) == {"a": 2, "b": 3, "c": 3}


def test_an_interrupted_stage_runs_again_although_its_output_exists(stages):
    root, made = stages
    (root / "fail").touch()
    with pytest.raises(RuntimeError, match="1 / 0"):
        run_stages(str(root / "stages"), made)
    assert (root / "b.txt").exists() and not (root / "stages" / "b.json").exists()
    (root / "fail").unlink()
    assert run_stages(str(root / "stages"), made) == ["b", "c"]


def test_a_deleted_output_reruns_its_stage(stages):
    root, made = stages
    run_stages(str(root / "stages"), made)
    (root / "b.txt").unlink()
    assert run_stages(str(root / "stages"), made) == ["b", "c"]


def test_bad_force_names_and_missing_outputs_are_clear_errors(stages):
    root, made = stages
    with pytest.raises(DataError, match="unknown stage"):
        run_stages(str(root / "stages"), made, force=["segmentation"])
    made[0]["outputs"].append(str(root / "never_written.pt"))
    with pytest.raises(DataError, match="never_written.pt"):
        run_stages(str(root / "stages"), made)
    assert not (root / "stages" / "a.json").exists()


def test_eval_split_prefers_a_test_split_with_masks(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"validation": [{"image": "a", "mask": "m"}], "test": [{"image": "b", "mask": "n"}]}))
    assert eval_split(str(path)) == "test"
    path.write_text(json.dumps({"validation": [{"image": "a", "mask": "m"}], "test": [{"image": "b"}]}))
    assert eval_split(str(path)) == "validation"


def test_skipped_stages_use_existing_outputs(stages):
    root, made = stages
    (root / "a.txt").write_text("made elsewhere")
    assert run_stages(str(root / "stages"), made, skip=["a"]) == ["b", "c"]
    assert (root / "a.txt").read_text() == "made elsewhere"
    (root / "a.txt").unlink()
    with pytest.raises(DataError, match="a.txt do not exist"):
        run_stages(str(root / "stages"), made, skip=["a"])


def test_report_logs_absent_classes_as_not_available(tmp_path, caplog):
    metrics = {"images": 2, "classes": ["a", "b"], "miou": 0.5, "mean_dice": 0.6, "dice": 0.667, "pixel_accuracy": 0.9,
               "iou_a": 0.5, "iou_b": None}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    with caplog.at_level("INFO", logger="pathology_wsss"):
        assert report(str(tmp_path)) == metrics
    assert "mIoU 0.500" in caplog.text and "a 0.500, b n/a" in caplog.text


def test_self_training_stages_chain_the_rounds():
    relabel, segment = {"datalist": "d.json"}, {"max_epochs": 3}
    assert self_training_stages(0, "b", "m", "p", relabel, segment) == []
    assert self_training_stages(False, "b", "m", "p", relabel, segment) == []
    one = self_training_stages(True, "b", "m", "p", relabel, segment)
    assert [s["name"] for s in one] == ["relabel_round2", "segment_round2"]
    assert one[0]["overrides"] == {"datalist": "d.json", "seg_checkpoint": "m/round1/model.pt", "output_dir": "p/round2"}
    assert one[1]["outputs"] == ["m/model.pt"] and one[1]["overrides"]["pseudo_datalist"] == "p/round2/datalist_pseudo.json"
    two = self_training_stages(2, "b", "m", "p", relabel, segment)
    assert [s["outputs"][0] for s in two] == ["p/round2/datalist_pseudo.json", "m/round2/model.pt",
                                             "p/round3/datalist_pseudo.json", "m/model.pt"]
    assert two[2]["overrides"]["seg_checkpoint"] == "m/round2/model.pt"
    for bad in (-1, 1.5, "2"):
        with pytest.raises(DataError, match="self_training must be a number of rounds"):
            self_training_stages(bad, "b", "m", "p", relabel, segment)


@pytest.mark.parametrize("cores, workers, threads", [(1, 0, 1), (2, 0, 2), (4, 1, 3), (16, 4, 12), (64, 4, 60)])
def test_cores_are_split_between_loader_workers_and_torch_threads(monkeypatch, cores, workers, threads):
    """Two workers next to the networks' threads on a 2-core CPU made the demo 2.6x slower (model card, demo)."""
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    configs = Path(__file__).parents[1] / "bundle" / "configs"
    parsers = {name: ConfigParser(ConfigParser.load_config_file(configs / name))
               for name in ("train.json", "train_cam.json", "evaluate.json", "inference.json")}
    for name, parser in parsers.items():
        assert parser.get_parsed_content("num_workers") == workers, name
    assert parsers["train.json"].get_parsed_content("num_threads") == threads
