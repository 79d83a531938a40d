"""The ``training`` run id: the stage graph of pipeline.json, skipping what is current, re-running what changed."""

import json

import pytest
from conftest import BUNDLE, configs
from monai.bundle import ConfigParser

from scripts.errors import DataError
from scripts.pipeline import check_setting_types, report, run_stages, stage_graph
from scripts.seg.data import eval_split


@pytest.fixture
def stages(tmp_path):
    """Three stages; each writes its ``value`` setting to its output and logs its name to runs.txt; ``b`` fails after
    writing its output while ``fail`` exists (like a checkpoint saved on an exception), and leaves a work file."""
    (tmp_path / "configs").mkdir()
    made = []
    for name in "abc":
        config = {
            "imports": ["$import os"],
            "out": "",
            "fail": "",
            "value": "v",
            "work": "",
            "run": [
                "$open(@out, 'w').write(@value)",
                f"$open('{tmp_path / 'runs.txt'}', 'a').write('{name}')",
                "$open(@work, 'a').write('x') if @work else None",
                "$os.path.exists(@fail) and 1 / 0",
            ],
        }
        path = tmp_path / "configs" / f"{name}.json"
        path.write_text(json.dumps(config))
        out = tmp_path / f"{name}.txt"
        fail = tmp_path / "fail" if name == "b" else tmp_path / "never"
        work = str(tmp_path / "b.work") if name == "b" else ""
        made.append(
            {
                "name": name,
                "config_file": str(path),
                "outputs": [str(out)],
                "clear": [work] if work else [],
                "overrides": {"out": str(out), "fail": str(fail), "work": work},
            }
        )
    return tmp_path, made


def runs(root):
    path = root / "runs.txt"
    runs = path.read_text() if path.exists() else ""
    path.unlink(missing_ok=True)
    return runs


def test_finished_stages_are_skipped(stages):
    root, made = stages
    assert run_stages(str(root / "stages"), made) == ["a", "b", "c"]
    assert run_stages(str(root / "stages"), made) == []
    assert runs(root) == "abc"
    assert list(json.loads((root / "stages" / "b.json").read_text())["outputs"]) == made[1]["outputs"]


def test_forcing_a_stage_reruns_it_from_nothing_and_every_later_stage(stages):
    root, made = stages
    run_stages(str(root / "stages"), made)
    assert (root / "b.work").read_text() == "x"
    assert run_stages(str(root / "stages"), made, force=["b"]) == ["b", "c"]
    assert (root / "b.work").read_text() == "x"  # cleared before the forced run, not reused
    assert run_stages(str(root / "stages"), made, force=True) == ["a", "b", "c"]


def test_a_changed_setting_reruns_its_stage_and_the_later_ones_and_says_why(stages, caplog):
    root, made = stages
    run_stages(str(root / "stages"), made)
    made[1]["overrides"]["value"] = "w"
    with caplog.at_level("INFO", logger="pathology_wsss"):
        assert run_stages(str(root / "stages"), made) == ["b", "c"]
    assert "stage b: runs again: settings changed (value)" in caplog.text
    assert "stage c: runs again: output of b changed" in caplog.text


def test_a_changed_datalist_or_config_reruns_everything(stages, caplog):
    root, made = stages
    datalist = root / "datalist.json"
    data = {
        "classes": ["a", "b"],
        "training": [{"image": "x.png", "label": [1, 0]}],
        "validation": [{"image": "y.png", "label": [0, 1]}],
    }
    datalist.write_text(json.dumps(data))
    for stage in made:
        stage["overrides"]["datalist"] = str(datalist)
    run_stages(str(root / "stages"), made)
    data["training"][0]["label"] = [1, 1]
    datalist.write_text(json.dumps(data))
    with caplog.at_level("INFO", logger="pathology_wsss"):
        assert run_stages(str(root / "stages"), made) == ["a", "b", "c"]
    assert "stage a: runs again: datalist changed" in caplog.text
    config = json.loads(open(made[2]["config_file"]).read())
    config["value"] = "changed default"
    open(made[2]["config_file"], "w").write(json.dumps(config))
    assert run_stages(str(root / "stages"), made) == ["c"]


def test_an_interrupted_stage_resumes_with_its_work_files(stages):
    root, made = stages
    (root / "fail").touch()
    with pytest.raises(RuntimeError, match="1 / 0"):
        run_stages(str(root / "stages"), made)
    assert (root / "b.txt").exists() and not (root / "stages" / "b.json").exists()
    (root / "fail").unlink()
    assert run_stages(str(root / "stages"), made) == ["b", "c"]
    assert (root / "b.work").read_text() == "xx"  # same inputs: resumed, its work kept


def test_a_deleted_or_replaced_output_reruns_its_stage(stages):
    root, made = stages
    run_stages(str(root / "stages"), made)
    (root / "b.txt").unlink()
    assert run_stages(str(root / "stages"), made) == ["b"]  # same bytes again: c stays current
    (root / "a.txt").write_text("replaced by hand")
    assert run_stages(str(root / "stages"), made) == ["a"]  # it writes the same bytes again: b and c stay current


def test_a_work_file_changed_by_hand_reruns_the_stages_after_it(stages):
    """A pseudo-mask corrected by hand (a work file the stage's output points to) is read by the next stages."""
    root, made = stages
    run_stages(str(root / "stages"), made)
    (root / "b.work").write_text("corrected")
    assert run_stages(str(root / "stages"), made, skip=["a", "b"]) == ["c"]


def test_bad_settings_and_unwritable_folders_fail_before_the_first_stage(stages, tmp_path):
    root, made = stages
    datalist = root / "datalist.json"
    datalist.write_text(
        json.dumps(
            {
                "classes": ["gland", "stroma"],
                "training": [{"image": "x.png", "label": [1, 0]}],
                "validation": [{"image": "y.png", "label": [0, 1]}],
            }
        )
    )
    made[1]["overrides"].update(datalist=str(datalist), sam_classes=["glnd"])
    with pytest.raises(DataError, match=r"sam_classes \['glnd'\] are not among the datalist's classes"):
        run_stages(str(root / "stages"), made)
    made[1]["overrides"]["sam_classes"] = ["gland"]
    (tmp_path / "a_file").touch()
    made[2]["outputs"] = [str(tmp_path / "a_file" / "c.txt")]
    with pytest.raises(DataError, match="a_file: the output folder cannot be written"):
        run_stages(str(root / "stages"), made)
    assert runs(root) == ""  # nothing ran


def test_bad_force_names_and_missing_outputs_are_clear_errors(stages):
    root, made = stages
    with pytest.raises(DataError, match="unknown stage"):
        run_stages(str(root / "stages"), made, force=["segmentation"])
    made[0]["outputs"].append(str(root / "never_written.pt"))
    with pytest.raises(DataError, match="never_written.pt"):
        run_stages(str(root / "stages"), made)
    assert not (root / "stages" / "a.json").exists()


def test_skipped_stages_use_existing_outputs(stages):
    root, made = stages
    (root / "a.txt").write_text("made elsewhere")
    assert run_stages(str(root / "stages"), made, skip=["a"]) == ["b", "c"]
    assert (root / "a.txt").read_text() == "made elsewhere"
    (root / "a.txt").unlink()
    with pytest.raises(DataError, match="a.txt do not exist"):
        run_stages(str(root / "stages"), made, skip=["a"])


def test_eval_split_prefers_a_test_split_with_masks(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"validation": [{"image": "a", "mask": "m"}], "test": [{"image": "b", "mask": "n"}]}))
    assert eval_split(str(path)) == "test"
    path.write_text(json.dumps({"validation": [{"image": "a", "mask": "m"}], "test": [{"image": "b"}]}))
    assert eval_split(str(path)) == "validation"


def test_report_logs_absent_classes_as_not_available(tmp_path, caplog):
    metrics = {
        "images": 2,
        "classes": ["a", "b"],
        "miou": 0.5,
        "mean_dice": 0.6,
        "dice": 0.667,
        "pixel_accuracy": 0.9,
        "iou_a": 0.5,
        "iou_b": None,
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    with caplog.at_level("INFO", logger="pathology_wsss"):
        assert report(str(tmp_path)) == metrics
    assert "mIoU 0.500" in caplog.text and "a 0.500, b n/a" in caplog.text


DIRS = {"ckpt_dir": "m", "pseudo_dir": "p", "eval_dir": "e", "log_dir": "l"}


def test_self_training_rounds_chain_relabel_and_segment_stages():
    settings = {"segment": {"max_epochs": 3}, "self_training_segment": {"layer_weights": [1.0]}}
    assert [s["name"] for s in stage_graph("c", DIRS, {}, settings, 0)] == [
        "classify",
        "pseudo_label",
        "segment",
        "evaluate",
    ]
    one = stage_graph("c", DIRS, {"datalist": "d.json", "seed": None}, settings, True)
    assert [s["name"] for s in one] == [
        "classify",
        "pseudo_label",
        "segment",
        "relabel_round2",
        "segment_round2",
        "evaluate",
    ]
    relabel, segment = one[3], one[4]
    assert relabel["config_file"] == ["c/common.json", "c/pseudo_label.json", "c/relabel.json"]
    assert relabel["overrides"] == {
        "datalist": "d.json",
        "output_dir": "p/round2",
        "seg_checkpoint": "m/round1/model.pt",
    }
    assert one[2]["outputs"] == ["m/round1/model.pt"] and segment["outputs"] == ["m/model.pt"]
    assert segment["overrides"]["pseudo_datalist"] == "p/round2/datalist_pseudo.json"
    assert segment["overrides"]["layer_weights"] == [1.0] and segment["overrides"]["max_epochs"] == 3
    assert "layer_weights" not in one[2]["overrides"]  # round 1 keeps train.json's MLPS weights
    two = stage_graph("c", DIRS, {}, settings, 2)
    assert [s["outputs"][0] for s in two[3:7]] == [
        "p/round2/datalist_pseudo.json",
        "m/round2/model.pt",
        "p/round3/datalist_pseudo.json",
        "m/model.pt",
    ]
    assert two[5]["overrides"]["seg_checkpoint"] == "m/round2/model.pt"
    for bad in (-1, 1.5, "2"):
        with pytest.raises(DataError, match="self_training must be a number of rounds"):
            stage_graph("c", DIRS, {}, settings, bad)


def pipeline_stages(**overrides):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "pipeline.json"))
    parser.update({"bundle_root": str(BUNDLE), "datalist": "unused.json", **overrides})
    parser.get_parsed_content("imports")
    return {s["name"]: s for s in parser.get_parsed_content("stages")}


# the tuned defaults of each stage; each must live in the stage's config alone
TUNED = {
    "classify": [
        "max_epochs",
        "cam_input_size",
        "cam_backbone",
        "adl",
        "pda",
        "pda_warmup_epochs",
        "batch_size",
        "learning_rate",
        "seed",
        "num_workers",
        "pretrained",
    ],
    "pseudo_label": [
        "cam_input_size",
        "cam_tta",
        "ids_threshold",
        "prompts#margin",
        "refine_iterations",
        "refine_epochs",
        "refine_select",
        "sam_refiner",
        "sam_backend",
        "sam_classes",
        "confidence",
        "box_rule",
        "seed",
    ],
    "segment": [
        "max_epochs",
        "layer_weights",
        "batch_size",
        "learning_rate",
        "easy_mining",
        "holdout_fraction",
        "zoom",
        "lambda_dice",
        "pretrained",
        "seed",
    ],
    "evaluate": ["seg_tta", "zoom", "roi_size", "overlap"],
}
UNRESOLVED = ("prompts#margin",)  # needs the datalist to resolve: compare the raw config text


def resolved(stage, keys):
    parser = ConfigParser()
    parser.read_config(stage["config_file"])
    parser.update(stage["overrides"])
    return {k: parser[k] if k in UNRESOLVED else parser.get_parsed_content(k) for k in keys}


def stage_defaults(stage, keys):
    parser = ConfigParser()
    parser.read_config(stage["config_file"])
    return {k: parser[k] if k in UNRESOLVED else parser.get_parsed_content(k) for k in keys}


def test_run_training_hands_each_stage_its_own_defaults():
    """What `run training` passes a stage equals the stage config's own default unless the user overrides it."""
    stages = pipeline_stages()
    for name, keys in TUNED.items():
        assert resolved(stages[name], keys) == stage_defaults(stages[name], keys), name


def test_pipeline_settings_reach_their_stages():
    settings = {
        "cam_input_size": 96,
        "cam_epochs": 3,
        "adl": True,
        "pda": False,
        "pda_warmup_epochs": 1,
        "cam_tta": "d4",
        "seg_tta": "flip",
        "sam_backend": "tiny",
        "sam_classes": ["gland"],
        "ids_threshold": 0.9,
        "refine_iterations": 2,
        "refine_epochs": 1,
        "refine_select": "agreement",
        "sam_refiner": "multires",
        "max_epochs": 5,
        "layer_weights": [1.0],
        "easy_mining": True,
        "batch_size": 3,
        "learning_rate": 0.01,
        "zoom": 0.5,
        "seed": 7,
    }
    stages = pipeline_stages(**settings)
    got = {name: resolved(stages[name], keys) for name, keys in TUNED.items() if name != "pseudo_label"}
    pseudo = stages["pseudo_label"]["overrides"]
    expected = {
        "classify": {
            "max_epochs": 3,
            "cam_input_size": 96,
            "adl": True,
            "pda": False,
            "pda_warmup_epochs": 1,
            "seed": 7,
        },
        "pseudo_label": {
            "cam_input_size": 96,
            "cam_tta": "d4",
            "sam_backend": "tiny",
            "sam_classes": ["gland"],
            "ids_threshold": 0.9,
            "refine_iterations": 2,
            "refine_epochs": 1,
            "refine_select": "agreement",
            "sam_refiner": "multires",
        },
        "segment": {
            "max_epochs": 5,
            "layer_weights": [1.0],
            "easy_mining": True,
            "batch_size": 3,
            "learning_rate": 0.01,
            "zoom": 0.5,
        },
        "evaluate": {"seg_tta": "flip", "zoom": 0.5},
    }
    for name, values in expected.items():
        given = pseudo if name == "pseudo_label" else got[name]
        assert {k: given[k] for k in values} == values, name
    assert got["classify"]["batch_size"] == 16  # the pipeline's batch_size is the segmentation network's


@pytest.mark.parametrize("cores, workers, threads", [(1, 0, 1), (2, 0, 2), (4, 1, 3), (16, 4, 12), (64, 4, 60)])
def test_cores_are_split_between_loader_workers_and_torch_threads(monkeypatch, cores, workers, threads):
    """Two workers next to the networks' threads on a 2-core CPU made the demo 2.6x slower (model card, demo)."""
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    for files in (
        configs("train.json"),
        configs("train_cam.json"),
        configs("pseudo_label.json"),
        configs("train.json", "evaluate.json"),
        [str(BUNDLE / "configs" / "inference.json")],
    ):
        parser = ConfigParser(ConfigParser.load_config_files(files))
        assert parser.get_parsed_content("num_workers") == workers, files
        if "inference.json" not in files[-1]:
            assert parser.get_parsed_content("num_threads") == threads, files


@pytest.mark.parametrize(
    "setting, value, stage, match",
    [
        (
            "cam_epochs",
            "abc",
            "classify",
            "setting max_epochs \\(stage classify\\): expected a whole number like its default 8",
        ),
        ("cam_epochs", True, "classify", "expected a whole number"),
        ("layer_weights", 0.5, "segment", "setting layer_weights \\(stage segment\\): expected a list"),
        ("easy_mining", "yes", "segment", "expected true/false"),
        ("learning_rate", "fast", "segment", "expected a number"),
        ("seg_tta", 4, "evaluate", "setting seg_tta \\(stage evaluate\\): expected a string"),
    ],
)
def test_a_setting_of_the_wrong_kind_is_refused_before_any_stage(setting, value, stage, match):
    stages = pipeline_stages(**{setting: value})
    with pytest.raises(DataError, match=match):
        check_setting_types(stages[stage])


def test_settings_of_the_right_kind_pass():
    stages = pipeline_stages(cam_epochs=3, learning_rate=1, layer_weights=(1.0,), easy_mining=True, seg_tta="flip")
    for stage in stages.values():
        check_setting_types(stage)
