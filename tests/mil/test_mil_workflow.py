"""mil_pseudo_label.json end to end through monai.bundle on the tiny synthetic demo (random weights): teacher, student
with role reversal, pseudo-masks in the bundle's contract; resume after an interruption; bad inputs; and
``run training --pseudo_source``."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import BUNDLE, bundle_run, configs
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from monai.data import load_decathlon_datalist
from PIL import Image

from scripts.constants import IGNORE
from scripts.data.datalist import write_datalist
from scripts.errors import DataError
from scripts.pipeline import stage_graph
from scripts.sam.outputs import pseudo_items

TINY = {"pretrained": False, "batch_size": 4, "num_workers": 0, "progress_bar": False}


def workflow(datalist, out, **override):
    torch.set_num_threads(1)
    wf = ConfigWorkflow(
        config_file=configs("mil_pseudo_label.json"),
        workflow_type=None,
        run_id="run",
        bundle_root=str(BUNDLE),
        datalist=str(datalist),
        ckpt_dir=str(out / "models"),
        output_dir=str(out / "masks"),
        log_dir=str(out / "logs"),
        **{**TINY, "teacher_epochs": 1, "student_epochs": 2, "reversal_interval": 1, **override},
    )
    wf.initialize()
    return wf


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_teacher_and_student_write_pseudo_masks_in_the_bundle_contract(tiny_demo, tmp_path):
    wf = workflow(tiny_demo, tmp_path)
    reversal = wf.parser.get_parsed_content("student#reversal")
    swaps = []
    reversal.teacher.register_load_state_dict_post_hook(lambda *_: swaps.append(student.state.epoch))
    teacher, student = (wf.parser.get_parsed_content(f"{n}#trainer") for n in ("teacher", "student"))
    wf.run()
    assert teacher.state.epoch == 1 and student.state.epoch == 2
    # the teacher's weights are loaded once from its best checkpoint (student epoch 0), then at the reversal: with
    # reversal_interval 1 the first is after epoch 2 x 1, and it wipes the best student it took
    assert swaps == [0, 2] and reversal.best is None
    wf.finalize()
    classes = json.loads(open(tiny_demo).read())["classes"]
    for name in ("teacher_best", "teacher_last", "student_best", "student_last"):
        state = torch.load(tmp_path / "models" / f"mil_{name}.pt", weights_only=True)
        assert name.endswith("last") or state["contract"]["classes"] == classes
    pseudo = tmp_path / "masks" / "datalist_pseudo.json"
    entries = load_decathlon_datalist(str(pseudo), False, "training")
    assert len(entries) == len(load_decathlon_datalist(tiny_demo, False, "training"))
    tags = {i["name"]: np.array(i["label"], bool) for i in pseudo_items(tiny_demo)}
    for entry in entries:
        assert entry["pseudo_layers"] == [entry["pseudo"]]
        mask = np.asarray(Image.open(entry["pseudo"]))
        image = Image.open(entry["image"])
        assert mask.dtype == np.uint8 and mask.shape == (image.height, image.width)
        name = os.path.splitext(os.path.basename(entry["pseudo"]))[0]
        assert set(np.unique(mask)) <= {*np.flatnonzero(tags[name]).tolist(), IGNORE}
        maps = np.load(tmp_path / "masks" / "mil_maps" / f"{name}.npy")
        assert maps.shape == (len(classes), *mask.shape) and (maps[~tags[name]] == 0).all()
        # the rule, from the stored (smoothed) map: the best tagged class where it reaches 0.5, else ignore
        best, top = maps.argmax(0), maps.max(0)
        unique = (maps == top).sum(0) == 1  # the stored maps are uint8: where two classes tie, float decided
        sure = (top >= 128) & unique
        assert (mask[sure] == best[sure]).all() and (mask[top < 127] == IGNORE).all()


def test_mil_input_size_trains_on_resized_patches_and_labels_whole_images_at_their_size(tiny_demo, tmp_path):
    wf = workflow(tiny_demo, tmp_path, student_epochs=1, mil_input_size=64)  # the tiny demo's patches are 32 px
    sizes = []
    for name in ("teacher", "student"):
        trainer = wf.parser.get_parsed_content(f"{name}#trainer")
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED, lambda e: sizes.append(e.state.batch[0]["image"].shape[-2:])
        )
    wf.run()
    wf.finalize()
    assert {tuple(s) for s in sizes} == {(64, 64)}
    for entry in load_decathlon_datalist(str(tmp_path / "masks" / "datalist_pseudo.json"), False, "training"):
        assert np.asarray(Image.open(entry["pseudo"])).shape == Image.open(entry["image"]).size[::-1]
    with pytest.raises(Exception) as info:  # before any training
        workflow(tiny_demo, tmp_path / "bad", mil_input_size=-1).run()
    assert "mil_input_size -1 needs" in repr(info.value) + repr(info.value.__cause__)
    assert not (tmp_path / "bad" / "models").exists()


def test_an_interrupted_run_resumes_without_training_the_teacher_again(tiny_demo, tmp_path):
    wf = workflow(tiny_demo, tmp_path, teacher_epochs=2, student_epochs=3, reversal_interval=0)
    student = wf.parser.get_parsed_content("student#trainer")

    def interrupt(_engine):
        raise RuntimeError("interrupted")

    student.add_event_handler(Events.EPOCH_STARTED(once=3), interrupt)
    with pytest.raises(Exception) as info:
        wf.run()
    assert "interrupted" in repr(info.value) + repr(info.value.__cause__)
    steps = student.state.epoch_length
    teacher_steps = wf.parser.get_parsed_content("teacher#trainer").state.iteration
    wf.finalize()
    models, masks = tmp_path / "models", tmp_path / "masks"
    assert not (masks / "datalist_pseudo.json").exists() and not (masks / "mil_masks").exists()
    teacher_best = digest(models / "mil_teacher_best.pt")

    resumed = workflow(tiny_demo, tmp_path, teacher_epochs=2, student_epochs=3, reversal_interval=0)
    resumed.run()
    teacher = resumed.parser.get_parsed_content("teacher#trainer")
    student = resumed.parser.get_parsed_content("student#trainer")
    assert teacher.state.iteration == teacher_steps == 2 * teacher.state.epoch_length  # nothing trained again
    assert student.state.epoch == 3 and student.state.iteration == 3 * steps  # epochs 1-2 were not repeated
    assert digest(models / "mil_teacher_best.pt") == teacher_best
    resumed.finalize()
    written = sorted((masks / "mil_masks").glob("*.png"))
    assert written and (masks / "datalist_pseudo.json").is_file()

    # an interrupted labelling pass: only the missing masks are made again
    written[0].unlink()
    kept = {p: p.stat().st_mtime_ns for p in written[1:]}
    again = workflow(tiny_demo, tmp_path, teacher_epochs=2, student_epochs=3, reversal_interval=0)
    assert [i["name"] for i in again.parser.get_parsed_content("pending")] == [written[0].stem]
    again.run()
    again.finalize()
    assert written[0].is_file() and all(p.stat().st_mtime_ns == t for p, t in kept.items())


def tiny_datalist(tmp_path, labels, side=32):
    images = []
    for name in ("train", "val"):
        Image.fromarray(np.full((side, side * len(labels), 3), 200, np.uint8)).save(tmp_path / f"{name}.png")
    for i, label in enumerate(labels):
        images.append(
            {"image": str(tmp_path / "train.png"), "label": label, "location": [0, i * side], "size": [side] * 2}
        )
    validation = [{"image": str(tmp_path / "val.png"), "label": labels[0], "location": [0, 0], "size": [side] * 2}]
    path = tmp_path / "datalist.json"
    write_datalist(path, ["stroma", "gland"], {"training": images, "validation": validation})
    return path


def data_error(info) -> str:
    cause = info.value
    while cause is not None and not isinstance(cause, DataError):
        cause = cause.__cause__ or cause.__context__
    assert cause is not None, info.value
    return str(cause)


@pytest.mark.parametrize(
    "labels, side, match",
    [
        ([[1, 1]] * 4, 32, r"every 'training' entry is tagged with every class \['stroma', 'gland'\]"),
        ([[1, 0], [0, 1], [1, 1], [1, 0]], 8, r"input \(8, 8\) is smaller than its stride 16"),
    ],
)
def test_bad_input_is_a_clear_error_before_any_output(tmp_path, labels, side, match):
    wf = workflow(tiny_datalist(tmp_path, labels, side), tmp_path)
    with pytest.raises(Exception) as info:
        wf.run()
    assert __import__("re").search(match, data_error(info))
    assert not (tmp_path / "masks").exists()


DIRS = {"ckpt_dir": "m", "pseudo_dir": "p", "eval_dir": "e", "log_dir": "l"}


def test_the_pseudo_source_chooses_the_stages():
    settings = {"mil": {"teacher_epochs": 3}, "mil_segment": {"layer_weights": [1.0]}, "segment": {"max_epochs": 2}}
    cam = stage_graph("c", DIRS, {}, settings)
    assert [s["name"] for s in cam] == ["classify", "pseudo_label", "segment", "evaluate"]
    assert "layer_weights" not in cam[2]["overrides"]
    mil = stage_graph("c", DIRS, {"datalist": "d.json"}, settings, pseudo_source="mil")
    assert [s["name"] for s in mil] == ["mil_pseudo_label", "segment", "evaluate"]
    assert mil[0]["config_file"] == ["c/common.json", "c/mil_pseudo_label.json"]
    assert mil[0]["outputs"] == ["p/mil/datalist_pseudo.json"] and "m/mil_*.pt" in mil[0]["clear"]
    assert mil[0]["overrides"] == {
        "datalist": "d.json",
        "teacher_epochs": 3,
        "output_dir": "p/mil",
        "ckpt_dir": "m",
        "log_dir": "l/mil",
    }
    assert mil[1]["overrides"]["pseudo_datalist"] == "p/mil/datalist_pseudo.json"
    assert mil[1]["overrides"]["layer_weights"] == [1.0] and mil[1]["overrides"]["max_epochs"] == 2
    sam = stage_graph("c", DIRS, {}, settings, pseudo_source="mil_sam")
    assert [s["name"] for s in sam] == ["mil_pseudo_label", "pseudo_label", "segment", "evaluate"]
    assert sam[1]["config_file"] == ["c/common.json", "c/pseudo_label.json", "c/mil_sam.json"]
    assert sam[2]["overrides"]["pseudo_datalist"] == "p/datalist_pseudo.json"
    with pytest.raises(DataError, match=r"must be one of \['cam', 'mil', 'mil_sam', 'cam_mil'\], got 'sam'"):
        stage_graph("c", DIRS, {}, settings, pseudo_source="sam")


def test_cam_mil_adds_the_mil_map_as_the_last_layer_and_needs_a_weight_for_it():
    configs_dir = str(BUNDLE / "configs")
    four = {"segment": {"layer_weights": [0.2, 0.6, 0.2, 0.2]}, "mil_segment": {"layer_weights": [1.0]}}
    both = stage_graph(configs_dir, DIRS, {}, four, pseudo_source="cam_mil")
    assert [s["name"] for s in both] == ["classify", "mil_pseudo_label", "pseudo_label", "segment", "evaluate"]
    configs = [os.path.basename(c) for c in both[2]["config_file"]]
    assert configs == ["common.json", "pseudo_label.json", "mil_layer.json"]
    assert both[3]["overrides"]["pseudo_datalist"] == "p/datalist_pseudo.json"
    assert both[3]["overrides"]["layer_weights"] == [0.2, 0.6, 0.2, 0.2]  # the user's, not mil_segment's one layer
    for bad in ({}, {"segment": {"layer_weights": [0.6, 0.2, 0.2]}}):
        with pytest.raises(DataError, match=r"cam_mil trains on 4 pseudo-mask layers \(classifier, .*, mil\)"):
            stage_graph(configs_dir, DIRS, {}, bad, pseudo_source="cam_mil")


@pytest.mark.slow  # about 50 s: three whole pipelines on the tiny demo
@pytest.mark.parametrize("source", ["mil", "mil_sam", "cam_mil"])
def test_run_training_with_mil_pseudo_masks(tmp_path, tiny_demo, source):
    folders = {k: tmp_path / k for k in ("ckpt_dir", "pseudo_dir", "eval_dir", "log_dir", "stages_dir")}
    meta = tmp_path / "metadata.json"
    meta.write_text((BUNDLE / "configs" / "metadata.json").read_text())
    tiny = {"mil_teacher_epochs": 1, "mil_student_epochs": 1, "max_epochs": 1, "cam_input_size": 32}
    sam = {"sam_backend": "tiny", "refine_iterations": 1} if source != "mil" else {}
    if source == "cam_mil":
        sam.update(cam_epochs=1, layer_weights=[0.2, 0.6, 0.2, 0.2])
    args = bundle_run(
        "training",
        BUNDLE / "configs" / "pipeline.json",
        meta_file=meta,
        datalist=tiny_demo,
        pseudo_source=source,
        **folders,
        **TINY,
        **tiny,
        **sam,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    log = result.stdout + result.stderr
    stages = {
        "mil": ["mil_pseudo_label", "segment", "evaluate"],
        "mil_sam": ["mil_pseudo_label", "pseudo_label", "segment", "evaluate"],
        "cam_mil": ["classify", "mil_pseudo_label", "pseudo_label", "segment", "evaluate"],
    }[source]
    assert all(f"stage {s}: finished" in log for s in stages) and ("stage classify" in log) == (source == "cam_mil")
    assert (folders["ckpt_dir"] / "model.pt").is_file() and (folders["eval_dir"] / "metrics.json").is_file()
    overlay = {"mil_sam": "mil_sam.json", "cam_mil": "mil_layer.json"}.get(source)
    if overlay:
        assert overlay in log and (folders["pseudo_dir"] / "sam_iter1").is_dir()
    if source == "cam_mil":  # three CAM layers and the MIL map's
        entries = json.loads((folders["pseudo_dir"] / "datalist_pseudo.json").read_text())["training"]
        assert all(len(e["pseudo_layers"]) == 4 for e in entries)
