"""The ``training`` run id: classify → pseudo-label → segment → evaluate, each stage its own bundle workflow.

A stage is skipped when a previous run finished it: its completion record (``<records_dir>/<name>.json``, by default
``<bundle_root>/stages``,
written only after the stage returned) exists and every output it lists is still there. A stage interrupted half
way therefore runs again, even though checkpoints saved on the way (or on the exception) exist.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from monai.bundle import ConfigWorkflow

from .atomic import atomic_output
from .errors import DataError

logger = logging.getLogger("pathology_wsss")


def _record(records_dir: str, name: str) -> Path:
    return Path(records_dir) / f"{name}.json"


def _finished(record: Path, outputs: Sequence[str]) -> bool:
    return record.is_file() and all(Path(o).exists() for o in outputs)


def run_stage(
    records_dir: str, name: str, config_file: str | Sequence[str], outputs: Sequence[str], overrides: dict,
    run_id: str = "run", force: bool = False,
) -> bool:
    """Run one stage's workflow with ``overrides`` unless it already finished; returns whether it ran."""
    record = _record(records_dir, name)
    if not force and _finished(record, outputs):
        logger.info("stage %s: done before (%s), skipped; force it with --force \"['%s']\"", name, record, name)
        return False
    record.unlink(missing_ok=True)
    logger.info("stage %s: %s", name, config_file)
    start = time.perf_counter()
    workflow = ConfigWorkflow(config_file=config_file, workflow_type=None, run_id=run_id, **overrides)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    missing = [o for o in outputs if not Path(o).exists()]
    if missing:
        raise DataError(f"stage {name} finished without writing {', '.join(missing)}")
    seconds = round(time.perf_counter() - start, 1)
    with atomic_output(record) as tmp:
        Path(tmp).write_text(json.dumps({"config_file": config_file, "outputs": list(outputs), "seconds": seconds}, indent=1))
    logger.info("stage %s: finished in %.1f s", name, seconds)
    return True


def run_stages(
    records_dir: str, stages: Sequence[dict], force: bool | Iterable[str] = False, skip: Iterable[str] = (),
) -> list[str]:
    """Run ``stages`` (dicts of :func:`run_stage` arguments, in order); returns the names that ran.

    ``force`` is True (all) or stage names; forcing a stage re-runs every later stage too, since their inputs change.
    ``skip`` names stages whose outputs the user made some other way (e.g. a classifier trained alone with
    ``train_cam.json``): they must exist, and the stage does not run.
    """
    names = [s["name"] for s in stages]
    forced = set(names) if force is True else set(force or ())
    skipped = set(skip or ())
    unknown = (forced | skipped) - set(names)
    if unknown:
        raise DataError(f"force/skip: unknown stage(s) {sorted(unknown)}; the stages are {names}")
    ran: list[str] = []
    for stage in stages:
        if stage["name"] in skipped:
            missing = [o for o in stage["outputs"] if not Path(o).exists()]
            if missing:
                raise DataError(f"stage {stage['name']} is skipped but its output(s) {', '.join(missing)} do not exist")
            logger.info("stage %s: skipped as asked; using %s", stage["name"], ", ".join(stage["outputs"]))
            continue
        must = stage["name"] in forced or bool(ran)
        if run_stage(records_dir, **stage, force=must):
            ran.append(stage["name"])
    return ran


def self_training_stages(rounds: int, bundle_root: str, ckpt_dir: str, pseudo_dir: str, relabel: dict,
                         segment: dict) -> list[dict]:
    """The stages of ``rounds`` self-training rounds after the first segmentation (0 or False: none; True: one).

    Round k (2 .. rounds + 1) relabels the training images with round k-1's network (``relabel.json``: its predictions
    prompt SAM; masks in ``pseudo_dir/round<k>``) and trains a fresh network on those SAM masks, into
    ``ckpt_dir/round<k>``; the last round's network is ``ckpt_dir/model.pt``, the first round's ``ckpt_dir/round1``.
    ``relabel`` and ``segment`` are the overrides the rounds share.
    """
    if not isinstance(rounds, int) or rounds < 0:
        raise DataError(f"self_training must be a number of rounds >= 0 (0: off), got {rounds!r}")
    rounds, configs = int(rounds), Path(bundle_root) / "configs"
    stages = []
    for k in range(2, rounds + 2):
        previous = f"{ckpt_dir}/round{k - 1}/model.pt"
        masks = f"{pseudo_dir}/round{k}/datalist_pseudo.json"
        ckpt = ckpt_dir if k == rounds + 1 else f"{ckpt_dir}/round{k}"
        stages += [
            {"name": f"relabel_round{k}", "config_file": [str(configs / "pseudo_label.json"), str(configs / "relabel.json")],
             "outputs": [masks], "overrides": {**relabel, "seg_checkpoint": previous, "output_dir": str(Path(masks).parent)}},
            {"name": f"segment_round{k}", "config_file": str(configs / "train.json"), "outputs": [f"{ckpt}/model.pt"],
             "overrides": {**segment, "pseudo_datalist": masks, "ckpt_dir": ckpt, "layer_weights": [1.0]}},
        ]
    return stages


def eval_split(datalist: str) -> str:
    """The split evaluation reports on: ``test`` when its entries carry masks, else ``validation`` (GlaS dev)."""
    data = json.loads(Path(datalist).read_text())
    test = data.get("test") or []
    return "test" if test and all("mask" in e for e in test) else "validation"


def _score(value) -> str:
    """A score from metrics.json: NaN (a class absent from prediction and ground truth) is stored as null."""
    return "n/a" if value is None else f"{value:.3f}"


def report(eval_dir: str) -> dict:
    """Log the evaluation's headline scores and where its files are; returns ``metrics.json``."""
    eval_dir = Path(eval_dir)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    per_class = ", ".join(f"{c} {_score(metrics[f'iou_{c}'])}" for c in metrics["classes"])
    logger.info("evaluation on %d images: mIoU %s, Dice %s (OEEM-style %s), pixel accuracy %s; IoU per class: %s",
                metrics["images"], *(_score(metrics[k]) for k in ("miou", "mean_dice", "dice", "pixel_accuracy")), per_class)
    logger.info("metrics: %s; per image: %s; overlays: %s", eval_dir / "metrics.json", eval_dir / "per_image.csv",
                eval_dir / "overlays")
    return metrics
