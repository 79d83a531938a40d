"""Slide inference when things go wrong: a full disk at each writer (simulated: the writer raises ENOSPC), too little
free space, temporary files (one folder per slide, removed on failure, after a SIGKILL, and by the next run), a NaN
network or checkpoint, and images smaller than the tissue mask's debris size. Each failure is a one-line DataError
naming the file, and leaves nothing in the output folder."""

import errno
import fcntl
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tifffile
import torch
from conftest import BUNDLE, ROOT
from PIL import Image
from torch import nn
from wsi_fixtures import GLASS, PINK, PURPLE, ColourNet, inference, inference_config, square_rgb, square_slide

from scripts.errors import DataError
from scripts.wsi import outputs
from scripts.wsi.inference import load_weights
from scripts.wsi.outputs import ProbabilityStore, disk_needs, reduced_labels
from scripts.wsi.plan import debris_size

torch.set_num_threads(1)

OUTPUT_NAMES = [
    "square.geojson",
    "square_labels.tif",
    "square_overlay.png",
    "square_probabilities.npy",
    "square_summary.json",
]


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def failing_pwrite(suffix: str):
    """``os.pwrite`` that fails with ENOSPC on files whose name ends with ``suffix`` (and writes the others)."""
    real = os.pwrite

    def pwrite(fd, data, offset):
        if fd_path(fd).endswith(suffix):
            enospc()
        return real(fd, data, offset)

    return pwrite


# the writers of one slide, each made to meet a full disk: (what to patch, the output the error must name)
FULL_DISK = {
    "probabilities chunk": (
        lambda mp: mp.setattr(os, "pwrite", failing_pwrite("_probabilities.npy")),
        "square_probabilities.npy",
    ),
    "label scratch": (lambda mp: mp.setattr(os, "pwrite", failing_pwrite("_labels.raw")), "square_labels.tif"),
    "label TIFF": (lambda mp: mp.setattr(tifffile.TiffWriter, "write", enospc), "square_labels.tif"),
    "GeoJSON": (lambda mp: mp.setattr(outputs.json, "dump", enospc), "square.geojson"),
    "overlay": (lambda mp: mp.setattr(Image.Image, "save", enospc), "square_overlay.png"),
}


@pytest.mark.parametrize("writer", FULL_DISK)
def test_full_disk_is_one_line_naming_the_output_and_leaves_nothing(tmp_path, monkeypatch, writer):
    """Before: the probability map was a memory map, and a full disk killed the process with SIGBUS (exit 135, nothing
    logged), leaving ``.square.*.labels.tmp`` and ``.square_probabilities.*.tmp.npy``."""
    path, out = square_slide(tmp_path / "square.tif"), tmp_path / "out"
    patch, name = FULL_DISK[writer]
    with monkeypatch.context() as mp:
        patch(mp)
        with pytest.raises(DataError) as error:
            inference()([path], out)
    message = str(error.value)
    assert message.startswith("1 of 1 inputs failed:\n")
    assert f"{out / name}: no space left on device while writing the outputs of {path}" in message
    assert message.split("\n")[1] == f"{path}: {error.value.failed[path]}"  # the input, then why
    assert os.listdir(out) == []  # no output, no partial folder, no temporary file
    inference()([path], out)  # space again: the run completes
    assert sorted(os.listdir(out)) == OUTPUT_NAMES


def test_other_write_errors_and_a_failed_move_leave_nothing(tmp_path, monkeypatch):
    path, out = square_slide(tmp_path / "square.tif"), tmp_path / "out"
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith("_overlay.png"):  # labels, probabilities and GeoJSON already moved
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)
    with pytest.raises(DataError, match=rf"{out / 'square_overlay.png'}: cannot write the outputs of .*Input/output"):
        inference()([path], out)
    assert os.listdir(out) == []  # those moved before it are taken back: the outputs are a set


class Counting(nn.Module):
    """ColourNet that counts its calls."""

    def __init__(self):
        super().__init__()
        self.net, self.calls = ColourNet(), 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def test_free_space_is_checked_before_any_tile(tmp_path, monkeypatch):
    path, out, network = square_slide(tmp_path / "square.tif"), tmp_path / "out", Counting()
    needs = disk_needs(256, 384, 2, 4)  # the 1 um/px grid of the square slide
    assert needs["label scratch file"] == 256 * 384 and needs["probabilities"] == 2 * 2 * 64 * 96 + 128
    usage = outputs.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: usage._replace(free=5_000_000))
    numbers = (
        r"about 16.1 MB needed \(label scratch file 98.3 kB, probabilities 24.7 kB, label TIFF \+ GeoJSON \+ "
        r"overlay \(estimate\) 16.0 MB\), 5.0 MB free"
    )
    with pytest.raises(DataError, match=rf"{out}: not enough free disk space for the outputs of {path}: {numbers}"):
        inference(network)([path], out)
    assert network.calls == 0 and os.listdir(out) == []


def test_unwritable_output_folder_is_named_before_any_tile(tmp_path):
    path, network = square_slide(tmp_path / "square.tif"), Counting()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match="a_file/out: the output folder cannot be written"):
        inference(network)([path], tmp_path / "a_file" / "out")
    assert network.calls == 0


def test_leftovers_of_killed_runs_are_removed_by_the_next_run(tmp_path):
    """A killed run's partial folder (lock not held) and the temporary files of versions before it go; those of other
    slides stay. Before: ``.NAME.*.labels.tmp`` and ``.NAME_probabilities.*.tmp.npy`` stayed for ever."""
    path, out = square_slide(tmp_path / "square.tif"), tmp_path / "out"
    (out / ".square.partial").mkdir(parents=True)
    for name in ("lock", "square_labels.raw", "square_probabilities.npy"):
        (out / ".square.partial" / name).write_bytes(b"x" * 100)
    old = [
        ".square.k2j_a9x1.labels.tmp",
        ".square_probabilities.0123abcd.tmp.npy",
        ".square_labels.89abcdef.tmp.tif",
        ".square.0123abcd.tmp.geojson",
        ".square_overlay.0123abcd.tmp.png",
        ".square_summary.0123abcd.tmp.json",
    ]
    others = [".square_other.0123abcd.tmp.json", ".other.k2j_a9x1.labels.tmp", ".square.partial.txt", "notes.txt"]
    for name in old + others:
        (out / name).write_bytes(b"x")
    inference()([path], out)
    assert sorted(os.listdir(out)) == sorted(OUTPUT_NAMES + others)
    (out / ".square.partial").mkdir()  # a killed --overwrite run of a slide that is done
    for name in old:
        (out / name).write_bytes(b"x")
    assert inference()([path], out)[0]["skipped"]
    assert sorted(os.listdir(out)) == sorted(OUTPUT_NAMES + others)


def test_a_live_run_keeps_its_partial_folder(tmp_path):
    path, out = square_slide(tmp_path / "square.tif"), tmp_path / "out"
    (out / ".square.partial").mkdir(parents=True)
    with open(out / ".square.partial" / "lock", "w") as lock:
        lock.write("4242\n")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(DataError, match=r"\.square\.partial: another run \(process 4242\) is writing the outputs"):
            inference()([path], out)
        assert os.listdir(out) == [".square.partial"] and os.listdir(out / ".square.partial") == ["lock"]
    inference()([path], out)  # the lock released: the folder is a leftover
    assert sorted(os.listdir(out)) == OUTPUT_NAMES


KILLED_RUN = """
import sys, time
sys.path[:0] = {paths!r}
import torch
from torch import nn
from wsi_fixtures import inference

class Hang(nn.Module):
    def forward(self, x):
        open({ready!r}, "w").close()
        time.sleep(600)

inference(Hang())([{slide!r}], {out!r})
"""


def test_sigkill_leaks_nothing_across_runs(tmp_path):
    """A run killed (SIGKILL) while predicting leaves only its ``.NAME.partial`` folder; the next run removes it."""
    path, out, ready = square_slide(tmp_path / "square.tif"), tmp_path / "out", tmp_path / "ready"
    paths = [str(BUNDLE), str(ROOT / "tests"), str(ROOT / "tests" / "wsi")]
    script = textwrap.dedent(KILLED_RUN.format(paths=paths, ready=str(ready), slide=path, out=str(out)))
    child = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 300
        while not ready.exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert ready.exists(), "the child never reached the network"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert os.listdir(out) == [".square.partial"]  # everything it had made, under one name
    assert {"lock", "square_labels.raw", "square_probabilities.npy"} <= set(os.listdir(out / ".square.partial"))
    inference()([path], out)
    assert sorted(os.listdir(out)) == OUTPUT_NAMES


class NaNNet(nn.Module):
    def forward(self, x):
        return torch.full_like(x[:, :2], float("nan"))


def test_nan_network_output_names_the_checkpoint_and_the_slide(tmp_path):
    """Before: a NaN-weight checkpoint labelled every pixel one class, exit 0."""
    path, out = square_slide(tmp_path / "square.tif"), tmp_path / "out"
    with pytest.raises(
        DataError,
        match=rf"{path}: models/model.pt: the network's output is NaN or infinite on {path} "
        r"\(the tile at grid row \d+, column \d+\)",
    ):
        inference(NaNNet(), checkpoint="models/model.pt")([path], out)
    assert os.listdir(out) == []
    with pytest.raises(DataError, match="the network \\(no checkpoint: random weights\\): the network's output is NaN"):
        inference(NaNNet())([path], out)


def test_nan_weights_are_refused_when_loaded(tmp_path):
    net = nn.Conv2d(3, 2, 1)
    state = net.state_dict()
    state["weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "diverged.pt")
    with pytest.raises(
        DataError,
        match=r"diverged.pt: the segmentation model checkpoint holds NaN or infinite weights "
        r"\(1 tensors, e.g. weight\)",
    ):
        load_weights(nn.Conv2d(3, 2, 1), str(tmp_path / "diverged.pt"), "cpu")


def test_inference_json_names_its_checkpoint():
    parser = inference_config(ckpt_path="/models/seg.pt", device="$torch.device('cpu')")
    parser["slide_inference"]["network"] = "$torch.nn.Identity()"
    assert parser.get_parsed_content("slide_inference").network_name == "/models/seg.pt"


# ----------------------------------------------------------------------------------- images smaller than the mask


def test_debris_size_is_capped_for_small_images():
    assert debris_size(10_000, 10_000) == debris_size(512, 512) == 128 * 128  # slides: unchanged
    assert debris_size(64, 64) == 16 * 16 and debris_size(100, 300) == 100 * 300 / 16


@pytest.mark.parametrize("size", [32, 64, 100])
def test_tiles_smaller_than_the_debris_size_get_a_tissue_decision(tmp_path, size):
    """Before: a tile under 128 x 128 px was always "no tissue" (its one object was smaller than the debris size)."""
    rgb = np.full((size, size, 3), PINK, np.uint8)
    rgb[size // 4 : size // 2, size // 4 : size // 2] = PURPLE
    glass, speck = np.full_like(rgb, GLASS), np.full_like(rgb, GLASS)
    speck[4:7, 4:7] = PINK  # 9 px, under a sixteenth of the tile: debris
    for name, image in (("tissue", rgb), ("glass", glass), ("speck", speck)):
        Image.fromarray(image).save(tmp_path / f"{name}.png")
    tissue, empty, specked = inference(mpp=0.5)(
        [tmp_path / f"{n}.png" for n in ("tissue", "glass", "speck")], tmp_path / "out"
    )
    labels = tifffile.imread(tmp_path / "out" / "tissue_labels.tif")
    expected = np.zeros((size, size), np.uint8)
    expected[size // 4 : size // 2, size // 4 : size // 2] = 1
    assert tissue["tissue_pixels"] == size * size and (labels == expected).all()
    assert empty["tissue_pixels"] == 0 and specked["tissue_pixels"] == 0


def test_a_slide_smaller_than_the_debris_size(tmp_path):
    path = square_slide(tmp_path / "small.tif", rgb=square_rgb()[128:256, 192:320])  # 128 x 128, purple 64 x 64
    summary = inference(mpp=0.5)([path], tmp_path / "out")[0]
    assert summary["tissue_pixels"] == 128 * 128 and summary["class_pixels"]["gland"] == 64 * 64


# ------------------------------------------------------------------------------------------ the probability store


def test_probability_store_writes_what_a_memory_map_would(tmp_path):
    rng = np.random.default_rng(0)
    expected = np.lib.format.open_memmap(tmp_path / "memmap.npy", "w+", np.float16, (3, 37, 53))
    with ProbabilityStore(tmp_path / "store.npy", (3, 37, 53)) as store:
        for y, x, h, w in ((0, 0, 10, 53), (10, 5, 8, 20), (30, 40, 7, 13)):  # whole rows, and parts of rows
            block = rng.random((3, h, w), np.float32)
            store[:, y : y + h, x : x + w] = block
            expected[:, y : y + h, x : x + w] = block
        expected.flush()
        assert (store.rows(5, 35) == expected[:, 5:35]).all()
        assert (reduced_labels(store, band=4) == reduced_labels(np.asarray(expected))).all()
        with pytest.raises(IndexError):
            store[:, 30:40, 0:5] = np.zeros((3, 10, 5))
    assert (tmp_path / "store.npy").read_bytes() == (tmp_path / "memmap.npy").read_bytes()
    del expected


def test_probability_store_header_matches_numpy(tmp_path):
    with ProbabilityStore(tmp_path / "p.npy", (2, 3, 4)):
        pass
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 3, 4), np.float16))
    assert (tmp_path / "p.npy").read_bytes() == buffer.getvalue()


def test_outputs_are_complete_after_a_failed_slide(tmp_path):
    """A slide that fails at its network (NaN) does not stop the next one; the summary of the good one is whole."""
    good, bad = square_slide(tmp_path / "good.tif"), str(tmp_path / "bad.png")
    green = square_rgb()
    green[200:220, 300:320] = (0, 255, 0)
    Image.fromarray(green).save(bad)

    class GreenIsNaN(nn.Module):
        def forward(self, x):
            out = ColourNet()(x)
            return torch.where(((x[:, 1] == 1) & (x[:, 0] == 0))[:, None].any((2, 3), keepdim=True), torch.nan, out)

    with pytest.raises(DataError, match=r"1 of 2 inputs failed:\n.*bad.png") as error:
        inference(GreenIsNaN(), mpp=0.5)([bad, good], tmp_path / "out")
    assert list(error.value.failed) == [bad] and error.value.summaries[0]["slide"] == good
    assert json.loads((tmp_path / "out" / "good_summary.json").read_text())["tiles_inferred"] > 0
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith((".", "bad"))]
