import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundle"
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(BUNDLE))
os.environ.setdefault("CUFILE_LOGFILE_PATH", os.devnull)
os.environ.setdefault("CUFILE_LOGGING_LEVEL", "ERROR")


def bundle_run(run_id: str | None, config_file, **overrides) -> list[str]:
    """The arguments of ``python -m monai.bundle run [RUN_ID]`` on this bundle, as users type them: ``config_file`` a
    path or a list of paths, each override ``--key value``."""
    config = str(config_file if isinstance(config_file, (str, Path)) else [str(c) for c in config_file])
    args = ["-m", "monai.bundle", "run", *([run_id] if run_id else []), "--bundle_root", str(BUNDLE)]
    return [*args, "--config_file", config, *[a for k, v in overrides.items() for a in (f"--{k}", str(v))]]


def configs(*names: str) -> list[str]:
    """A stage's config files as the bundle runs them: the shared base ``common.json``, then the overlays."""
    return [str(BUNDLE / "configs" / name) for name in ("common.json", *names)]


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> str:
    """The tiny synthetic demo the workflow tests train on (4 training, 2 validation 64-px tiles cut into 32-px
    patches, no test split); one copy per session. Tests may add files beside it but must not change it."""
    from scripts.data.demo import prepare_demo

    root = tmp_path_factory.mktemp("tiny_demo")
    return prepare_demo(
        str(root), n_train=4, n_validation=2, n_test=0, tile_size=64, slide_size=64, patch_size=32, stride=32
    )


def shared(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test: users and fresh machines do not have it. Where ../shared/data
    exists a missing path fails the test instead: the real-data tests must run wherever the real data is."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        if SHARED_DATA.is_dir():
            pytest.fail(f"{path} not present although {SHARED_DATA} is: the real-data test cannot run", pytrace=False)
        pytest.skip(f"{path} not present (real data lives only in ../shared/data)")
    return path


def check_evaluation_report(metrics: dict, datalist: str | Path, split: str = "validation") -> None:
    """A ``metrics.json`` of :class:`scripts.seg.metrics.SegmentationReport` against the masks it was computed on: each
    labelled pixel of the split's distinct masks counted once, in its ground-truth row of the confusion matrix, and
    the mIoU the one of those counts (the mean IoU over the classes present in ground truth or prediction)."""
    import numpy as np
    from monai.data import load_decathlon_datalist

    from scripts.images import read_mask

    confusion = np.array(metrics["confusion_matrix"])
    n = len(metrics["classes"])
    masks = {e["mask"] for e in load_decathlon_datalist(str(datalist), False, split)}
    truth = sum(np.bincount(read_mask(m).ravel(), minlength=256)[:n] for m in masks)
    assert confusion.sum(1).tolist() == truth.tolist(), (confusion, truth)
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    assert metrics["miou"] == pytest.approx(np.mean(np.diag(confusion)[union > 0] / union[union > 0]))


def train_on_one_batch(config_file, entries_key: str, broken: str | None = None, **overrides):
    """A learning test's run: the config's own trainer (run id ``run``) with ``overrides`` (one fixed batch, no
    augmentation), optionally broken on purpose (``"learning rate 0"``, or a :func:`break_loss` way). Returns the loss
    of every step, the trained network in eval mode with BatchNorm statistics recomputed on the batch (a few dozen fast
    steps leave the running averages behind the weights), and the batch (``entries_key``'s entries, loaded as the
    config validates)."""
    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow
    from monai.data import DataLoader, Dataset
    from monai.handlers import from_engine

    if broken == "learning rate 0":
        overrides["learning_rate"] = 0.0
    torch.manual_seed(0)  # the initial weights; the run's set_determinism seeds the rest
    wf = ConfigWorkflow(config_file=config_file, workflow_type="train", bundle_root=str(BUNDLE), **overrides)
    wf.initialize()
    trainer, losses = wf.parser.get_parsed_content("train#trainer"), []
    record = from_engine(["loss"], first=True)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(record(e.state.output)))
    if broken in ("loss detached", "labels shuffled"):
        trainer.loss_function = break_loss(trainer.loss_function, broken)
    wf.run()
    network = wf.parser.get_parsed_content("network")
    entries = wf.parser.get_parsed_content(entries_key.removesuffix("#data")).data  # as the dataset holds them
    data = Dataset(entries, wf.parser.get_parsed_content("validate#preprocessing"))
    batch = next(iter(DataLoader(data, batch_size=len(entries))))
    torch.optim.swa_utils.update_bn([batch["image"]], network)
    wf.finalize()
    return losses, network.eval(), batch


def break_loss(loss, how: str):
    """A trainer's loss function broken on purpose, for the learning tests' must-fail checks. ``"loss detached"``: the
    same value, but no gradient reaches the network; ``"labels shuffled"``: each prediction is scored against another
    sample's target, in a new random order every step (``loss(pred, target)``, samples along the first axis)."""
    import torch

    if how == "loss detached":
        return lambda pred, target: loss(pred.detach(), target) + 0 * pred.sum()
    if how == "labels shuffled":
        return lambda pred, target: loss(pred, target[torch.randperm(len(target))])
    raise ValueError(how)
