"""The ``training`` run id (``configs/pipeline.json``): classify → pseudo-label → segment → [self-training rounds] →
evaluate, each stage a bundle workflow of its own run as ``[common.json, <stage>.json]`` with the pipeline's settings.
The pseudo-masks' source (``pseudo_source``) is the CAM (classify → pseudo-label), the IKD-MIL networks
(``mil_pseudo_label``, their masks straight to the segmentation), the MIL maps as SAM's prompts (``mil_sam``:
``mil_pseudo_label`` → ``pseudo_label`` with the ``mil_sam.json`` overlay), or the CAM with the MIL map as one more
MLPS layer (``cam_mil``: classify, ``mil_pseudo_label`` → ``pseudo_label`` with the ``mil_layer.json`` overlay).

:func:`stage_graph` is the one place the stages, their order, their outputs and what each is handed are defined.
:func:`run_stages` runs them. A stage is skipped only when its completion record (``<stages_dir>/<name>.json``,
written after the stage returned) holds the same fingerprint as now: a hash of the stage's configs, the settings
handed to it, the datalist's content, the bundle code, and the outputs of every stage before it; and its outputs are
still the files it wrote. Anything else re-runs the stage, and with it every later stage; the log says why.
A stage that runs starts from nothing (its outputs and work files are removed first), unless it is the same stage,
same fingerprint, resuming after an interruption: then its work files are kept (the pseudo-label stage resumes).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from monai.bundle import ConfigParser, ConfigWorkflow

from .atomic import atomic_output, writable_folder
from .data.datalist import check_mask_values, validate_datalist
from .errors import DataError
from .mil.masks import MILOutputs
from .sam.outputs import Outputs
from .sam.rules import object_classes
from .seg.data import eval_split

logger = logging.getLogger("pathology_wsss")
SCRIPTS = Path(__file__).resolve().parent


def _given(settings: Mapping | None) -> dict:
    """The settings the user gave: in ``pipeline.json`` null means "the stage config's own default"."""
    return {k: v for k, v in (settings or {}).items() if v is not None}


def _rounds(self_training) -> int:
    if isinstance(self_training, bool):
        return int(self_training)
    if not isinstance(self_training, int) or self_training < 0:
        raise DataError(f"self_training must be a number of rounds >= 0 (0: off), got {self_training!r}")
    return self_training


PSEUDO_SOURCES = ("cam", "mil", "mil_sam", "cam_mil")


def stage_graph(
    configs_dir: str,
    dirs: Mapping[str, str],
    shared: Mapping,
    settings: Mapping[str, Mapping],
    self_training: int | bool = 0,
    pseudo_source: str = "cam",
) -> list[dict]:
    """The stages of one ``run training``, as dicts of :func:`run_stage` arguments.

    Args:
        configs_dir: the bundle's ``configs`` folder; every stage runs ``common.json`` with its own config on top.
        dirs: ``ckpt_dir``, ``pseudo_dir``, ``eval_dir``, ``log_dir``: where the stages write.
        shared: settings handed to every stage (datalist, seed, device, ...); None values are left out.
        settings: per stage group (``classify``, ``pseudo_label``, ``mil``, ``segment``, ``mil_segment``, ``relabel``,
            ``self_training_segment``, ``evaluate``) the stage keys the user set; None values are left out, so a stage
            keeps its own default. ``mil_segment`` goes to the first segmentation of a MIL source (one mask per image).
        self_training: rounds after the first segmentation (True: one). Round k relabels the training images with
            round k-1's network (its predictions prompt SAM; masks in ``pseudo_dir/round<k>``) and trains a fresh
            network on them, into ``ckpt_dir/round<k>``; the last round's network is ``ckpt_dir/model.pt``.
        pseudo_source: ``"cam"`` (classify, pseudo_label), ``"mil"`` (mil_pseudo_label, masks in ``pseudo_dir/mil``),
            ``"mil_sam"`` (mil_pseudo_label, then pseudo_label prompting SAM with the MIL maps) or ``"cam_mil"``
            (classify, mil_pseudo_label, then pseudo_label with the MIL map as the last MLPS layer: ``segment``'s
            ``layer_weights`` must then hold one weight per CAM layer of ``pseudo_label.json`` and one for it).

    Returns:
        the stages in order, each ``{"name", "config_file", "outputs", "clear", "overrides"}``.
    """
    rounds, shared = _rounds(self_training), _given(shared)
    ckpt, pseudo, logs = dirs["ckpt_dir"], dirs["pseudo_dir"], dirs["log_dir"]

    def stage(name, configs, outputs, group=(), clear=(), **paths):
        overrides = dict(shared)
        for key in group:
            overrides.update(_given(settings.get(key)))
        configs = [str(Path(configs_dir) / c) for c in ("common.json", *configs)]
        return {
            "name": name,
            "config_file": configs,
            "outputs": [str(o) for o in outputs],
            "clear": [str(c) for c in clear],
            "overrides": {**overrides, **paths},
        }

    def labels(name, masks_dir, configs, group, **paths):
        out = Outputs(masks_dir)
        return stage(name, configs, [out.datalist], group, out.work_files(), output_dir=str(masks_dir), **paths)

    def segment(name, masks_dir, model_dir, group):
        return stage(
            name,
            ["train.json"],
            [f"{model_dir}/model.pt"],
            group,
            [f"{model_dir}/seg_last.pt"],
            pseudo_datalist=str(Outputs(masks_dir).datalist),
            ckpt_dir=model_dir,
            log_dir=f"{logs}/train",
        )

    first = f"{ckpt}/round1" if rounds else ckpt
    if pseudo_source not in PSEUDO_SOURCES:
        raise DataError(f"pseudo_source must be one of {list(PSEUDO_SOURCES)}, got {pseudo_source!r}")
    if pseudo_source == "cam_mil":
        _check_mil_layer_weights(configs_dir, settings)
    mil = MILOutputs(f"{pseudo}/mil")
    classify = stage(
        "classify",
        ["train_cam.json"],
        [f"{ckpt}/cam_best.pt"],
        ["classify"],
        [f"{ckpt}/cam_last.pt"],
        ckpt_dir=ckpt,
        log_dir=f"{logs}/train_cam",
    )
    mil_pseudo_label = stage(
        "mil_pseudo_label",
        ["mil_pseudo_label.json"],
        [mil.datalist],
        ["mil"],
        [*mil.work_files(), f"{ckpt}/mil_*.pt"],
        output_dir=str(mil.root),
        ckpt_dir=ckpt,
        log_dir=f"{logs}/mil",
    )

    def pseudo_label(*overlay):
        return labels("pseudo_label", pseudo, ["pseudo_label.json", *overlay], ["pseudo_label"], ckpt_dir=ckpt)

    stages = {
        "cam": [classify, pseudo_label(), segment("segment", pseudo, first, ["segment"])],
        "mil": [mil_pseudo_label, segment("segment", mil.root, first, ["segment", "mil_segment"])],
        "mil_sam": [
            mil_pseudo_label,
            pseudo_label("mil_sam.json"),
            segment("segment", pseudo, first, ["segment", "mil_segment"]),
        ],
        "cam_mil": [
            classify,
            mil_pseudo_label,
            pseudo_label("mil_layer.json"),
            segment("segment", pseudo, first, ["segment"]),
        ],
    }[pseudo_source]
    for k in range(2, rounds + 2):
        masks, model = f"{pseudo}/round{k}", ckpt if k == rounds + 1 else f"{ckpt}/round{k}"
        stages += [
            labels(
                f"relabel_round{k}",
                masks,
                ["pseudo_label.json", "relabel.json"],
                ["pseudo_label", "relabel"],
                seg_checkpoint=f"{ckpt}/round{k - 1}/model.pt",
            ),
            segment(f"segment_round{k}", masks, model, ["segment", "self_training_segment"]),
        ]
    stages.append(
        stage(
            "evaluate",
            ["train.json", "evaluate.json"],
            [f"{dirs['eval_dir']}/metrics.json"],
            ["evaluate"],
            ckpt_dir=ckpt,
            output_dir=dirs["eval_dir"],
        )
    )
    return stages


def _check_mil_layer_weights(configs_dir: str, settings: Mapping[str, Mapping]) -> None:
    """``cam_mil`` adds a pseudo-mask layer, so the stage-config default weights cannot fit: refuse before the first
    stage rather than after two."""
    layers = [*ConfigParser.load_config_file(Path(configs_dir) / "pseudo_label.json")["cam_layers"], "mil"]
    weights = _given(settings.get("segment")).get("layer_weights")
    if weights is None or len(weights) != len(layers):
        raise DataError(
            f"pseudo_source cam_mil trains on {len(layers)} pseudo-mask layers ({', '.join(layers)}): "
            f"set layer_weights to {len(layers)} weights, in that order (got {weights})"
        )


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _file_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def code_version() -> str:
    """A hash of the bundle's Python code: a stage run by other code is not reused."""
    return _sha(
        b"".join(p.relative_to(SCRIPTS).as_posix().encode() + p.read_bytes() for p in sorted(SCRIPTS.rglob("*.py")))
    )


def _inputs(stage: dict, upstream: Mapping[str, Mapping[str, str]], code: str) -> dict:
    """What the stage reads, hashed part by part so that the log can say which part changed."""
    settings = json.loads(json.dumps(stage["overrides"], sort_keys=True, default=str))
    datalist = settings.get("datalist")
    configs = [stage["config_file"]] if isinstance(stage["config_file"], str) else stage["config_file"]
    return {
        "configs": {Path(c).name: _file_hash(c) for c in configs},
        "settings": settings,
        "datalist": _file_hash(datalist) if datalist and Path(datalist).is_file() else None,
        "code": code,
        "upstream": dict(upstream),
    }


def _changes(old: Mapping, new: Mapping) -> list[str]:
    """Why a recorded stage is stale, in words."""
    why = []
    for part in ("datalist", "configs", "code"):
        if old.get(part) != new[part]:
            why.append(f"{part} changed")
    keys = sorted(
        k
        for k in set(old.get("settings", {})) | set(new["settings"])
        if old.get("settings", {}).get(k) != new["settings"].get(k)
    )
    if keys:
        why.append(f"settings changed ({', '.join(keys)})")
    stages = sorted(
        s
        for s in set(old.get("upstream", {})) | set(new["upstream"])
        if old.get("upstream", {}).get(s) != new["upstream"].get(s)
    )
    if stages:
        why.append(f"output of {', '.join(stages)} changed")
    return why


def _output_hashes(outputs: Sequence[str]) -> dict[str, str]:
    return {o: _file_hash(o) for o in outputs}


def _produced(stage: dict) -> dict[str, str]:
    """Hashes of everything a stage leaves for the next ones: its outputs and its work files (the pseudo-mask PNGs
    that ``datalist_pseudo.json`` points to), so that a mask edited by hand re-runs the stages that read it."""
    files = set(stage["outputs"])
    for pattern in stage.get("clear", []):
        for path in map(Path, glob.glob(pattern)):
            files |= {str(f) for f in path.rglob("*") if f.is_file()} if path.is_dir() else {str(path)}
    return _output_hashes(sorted(f for f in files if Path(f).is_file()))


def _clear(stage: dict) -> None:
    for pattern in [*stage["outputs"], *stage.get("clear", [])]:
        for path in glob.glob(pattern):
            shutil.rmtree(path) if Path(path).is_dir() else Path(path).unlink()


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write(path: Path, data: dict, indent: int = 1) -> None:
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def run_stage(
    records_dir: str, stage: dict, upstream: Mapping[str, Mapping[str, str]], code: str, force: bool = False
) -> tuple[bool, dict[str, str]]:
    """Run one stage unless its record is current; returns (whether it ran, what it produced: see :func:`_produced`)."""
    name, records = stage["name"], Path(records_dir)
    record, started = records / f"{name}.json", records / f"{name}.started.json"
    inputs = _inputs(stage, upstream, code)
    done = _read(record)
    if done is not None and not force:
        produced = _produced(stage)
        outputs_now = {o: produced[o] for o in stage["outputs"] if o in produced}
        why = _changes(done.get("inputs", {}), inputs)
        if outputs_now != done.get("outputs"):
            why.append("its outputs were changed or removed")
        if not why:
            logger.info(
                "stage %s: done before with the same inputs (%s), skipped; force it with --force \"['%s']\"",
                name,
                record,
                name,
            )
            return False, produced
        logger.info("stage %s: runs again: %s", name, "; ".join(why))
    record.unlink(missing_ok=True)
    resuming = not force and (_read(started) or {}).get("inputs") == inputs
    if resuming:
        logger.info("stage %s: resuming an interrupted run with the same inputs", name)
    else:
        _clear(stage)
    _write(started, {"inputs": inputs})
    logger.info("stage %s: %s", name, ", ".join(inputs["configs"]))
    start = time.perf_counter()
    workflow = ConfigWorkflow(config_file=stage["config_file"], workflow_type=None, run_id="run", **stage["overrides"])
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    missing = [o for o in stage["outputs"] if not Path(o).exists()]
    if missing:
        raise DataError(f"stage {name} finished without writing {', '.join(missing)}")
    seconds = round(time.perf_counter() - start, 1)
    outputs = _output_hashes(stage["outputs"])
    _write(record, {"config_file": stage["config_file"], "inputs": inputs, "outputs": outputs, "seconds": seconds})
    started.unlink(missing_ok=True)
    logger.info("stage %s: finished in %.1f s", name, seconds)
    return True, _produced(stage)


def _kind(value) -> str | None:
    """The type a setting must keep: what a config's literal default says (None for an expression or null)."""
    if value is None or isinstance(value, str) and value[:1] in "$@%":
        return None
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number" if isinstance(value, float) else "a whole number"
    return {str: "a string", list: "a list", dict: "a dict"}.get(type(value))


_ACCEPTED = {
    "true/false": bool,
    "a whole number": int,
    "a number": (int, float),
    "a string": str,
    "a list": (list, tuple),
    "a dict": dict,
}


def check_setting_types(stage: dict) -> None:
    """A setting whose value is of another kind than the stage config's own default (``--cam_epochs abc``,
    ``--layer_weights 0.5``) is refused here, naming it, instead of failing inside a trainer with a traceback."""
    parser = ConfigParser()
    parser.read_config(stage["config_file"])
    for key, value in stage["overrides"].items():
        want = _kind(parser[key]) if key in parser else None
        if want and (not isinstance(value, _ACCEPTED[want]) or isinstance(value, bool) != (want == "true/false")):
            raise DataError(
                f"setting {key} (stage {stage['name']}): expected {want} like its default "
                f"{parser[key]!r}, got {value!r}"
            )


def preflight(records_dir: str, stages: Sequence[dict]) -> None:
    """What would otherwise fail after hours of training, checked before the first stage: the datalist is valid
    (training and validation entries, see :func:`validate_datalist`), the masks the evaluation reads hold only class
    values, every setting keeps its default's kind (:func:`check_setting_types`), ``sam_classes`` are among the
    classes, and every output folder is writable."""
    classes = {}
    for datalist in sorted({s["overrides"]["datalist"] for s in stages if "datalist" in s["overrides"]}):
        classes[datalist] = validate_datalist(datalist, require=("training", "validation"))["classes"]
        check_mask_values(datalist, eval_split(datalist))
    for stage in stages:
        check_setting_types(stage)
        settings = stage["overrides"]
        if "datalist" in settings:
            object_classes(classes[settings["datalist"]], settings.get("sam_classes"))
    folders = {Path(records_dir)} | {Path(o).parent for s in stages for o in s["outputs"]}
    for folder in sorted(folders):
        writable_folder(folder)


def run_stages(
    records_dir: str, stages: Sequence[dict], force: bool | Iterable[str] = False, skip: Iterable[str] = ()
) -> list[str]:
    """Run ``stages`` (see :func:`stage_graph`) in order; returns the names that ran.

    Args:
        records_dir: where the completion records go.
        stages: the stage dicts.
        force: True (all) or stage names to run from nothing; every later stage re-runs too, since its inputs change.
        skip: stages whose outputs the user made some other way (e.g. a classifier trained alone with
            ``train_cam.json``): they must exist, and the stage does not run.
    """
    names = [s["name"] for s in stages]
    forced = set(names) if force is True else set(force or ())
    skipped = set(skip or ())
    unknown = (forced | skipped) - set(names)
    if unknown:
        raise DataError(f"force/skip: unknown stage(s) {sorted(unknown)}; the stages are {names}")
    preflight(records_dir, stages)
    code, upstream, ran, forcing = code_version(), {}, [], False
    for stage in stages:
        name = stage["name"]
        if name in skipped:
            missing = [o for o in stage["outputs"] if not Path(o).exists()]
            if missing:
                raise DataError(f"stage {name} is skipped but its output(s) {', '.join(missing)} do not exist")
            logger.info("stage %s: skipped as asked; using %s", name, ", ".join(stage["outputs"]))
            upstream[name] = _produced(stage)
            continue
        forcing = forcing or name in forced
        did, upstream[name] = run_stage(records_dir, stage, upstream, code, force=forcing)
        if did:
            ran.append(name)
    return ran


def record_classes(metadata: str | os.PathLike, datalist: str | os.PathLike) -> None:
    """Write the datalist's class names into ``metadata.json``'s output ``channel_def`` (what MONAI Label and older
    checkpoints read), so that the bundle describes the network ``run training`` just trained; unchanged: untouched."""
    path, classes = Path(metadata), validate_datalist(datalist, require=())["classes"]
    meta = json.loads(path.read_text())
    output = meta["network_data_format"]["outputs"]["pred"]
    channel_def = {str(i): name for i, name in enumerate(classes)}
    if output.get("channel_def") == channel_def and output.get("num_channels") == len(classes):
        return
    output.update(channel_def=channel_def, num_channels=len(classes))
    _write(path, meta, indent=4)
    logger.info("%s: channel_def set to the datalist's classes %s", path, classes)


def _score(value) -> str:
    """A score from metrics.json: NaN (a class absent from prediction and ground truth) is stored as null."""
    return "n/a" if value is None else f"{value:.3f}"


def report(eval_dir: str) -> dict:
    """Log the evaluation's headline scores and where its files are; returns ``metrics.json``."""
    eval_dir = Path(eval_dir)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    per_class = ", ".join(f"{c} {_score(metrics[f'iou_{c}'])}" for c in metrics["classes"])
    logger.info(
        "evaluation on %d images: mIoU %s, Dice %s (OEEM-style %s), pixel accuracy %s; IoU per class: %s",
        metrics["images"],
        *(_score(metrics[k]) for k in ("miou", "mean_dice", "dice", "pixel_accuracy")),
        per_class,
    )
    logger.info(
        "metrics: %s; per image: %s; overlays: %s",
        eval_dir / "metrics.json",
        eval_dir / "per_image.csv",
        eval_dir / "overlays",
    )
    return metrics
