"""Soak: slide inference over 100 inputs in one process -- small synthetic slides and PNG tiles, 64-256 px, a tiny
random network, some inputs bad -- with the process's memory and open files sampled after every input."""

import json
import os

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from torch import nn
from wsi_fixtures import GLASS, PINK, PURPLE, inference

from scripts.errors import DataError
from scripts.wsi.outputs import OUTPUTS
from scripts.wsi.pyramid_tiff import write_pyramidal_tiff

torch.set_num_threads(1)

GOOD, WARM_UP = 84, 15


class TinyNet(nn.Module):
    """Random 3-class convolutions; NaN on windows holding a pure green pixel (a bad input for this network)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))

    def forward(self, x):
        green = ((x[:, 1] == 1) & (x[:, 0] == 0)).flatten(1).any(1)
        return torch.where(green[:, None, None, None], torch.nan, self.net(x))


def tissue(rng, height, width) -> np.ndarray:
    """Glass with a pink block and purple blobs, a little noise."""
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[:] = GLASS
    y0, x0 = rng.integers(0, height // 4), rng.integers(0, width // 4)
    rgb[y0 : y0 + height * 3 // 4, x0 : x0 + width * 3 // 4] = PINK
    for y, x in rng.integers(0, min(height, width), (6, 2)):
        rgb[y : y + 12, x : x + 12] = PURPLE
    return np.clip(rgb + rng.integers(-6, 7, rgb.shape), 0, 255).astype(np.uint8)


def make_inputs(folder, rng) -> tuple[list[str], dict[str, str]]:
    """84 good inputs (slides and tiles, some glass only) and 16 bad ones with what their error must say."""
    good, bad = [], {}
    for i in range(GOOD):
        height, width = (int(v) for v in rng.integers(64, 257, 2))
        rgb = tissue(rng, height, width) if i % 12 else np.full((height, width, 3), GLASS, np.uint8)
        if i % 2:
            Image.fromarray(rgb).save(folder / f"tile{i:02d}.png")
            good.append(str(folder / f"tile{i:02d}.png"))
        else:
            good.append(
                write_pyramidal_tiff(folder / f"slide{i:02d}.tif", rgb, mpp=0.5, compression="lzw", min_size=64)
            )
    slide = open(good[2], "rb").read()
    for i in range(4):
        (folder / f"truncated{i}.tif").write_bytes(slide[: len(slide) // (i + 2)])
        bad[str(folder / f"truncated{i}.tif")] = "truncated slide file|corrupt or truncated"
    png = open(good[1], "rb").read()
    for i in range(3):
        (folder / f"corrupt{i}.png").write_bytes(png[:60] + bytes(rng.integers(0, 256, 500, np.uint8)))
        bad[str(folder / f"corrupt{i}.png")] = "cannot read the image"
        (folder / f"text{i}.png").write_text("not an image\n" * 20)
        bad[str(folder / f"text{i}.png")] = "cannot read the image"
    for name in ("empty0.tif", "empty1.tif", "empty2.png"):
        (folder / name).write_bytes(b"")
        bad[str(folder / name)] = "slide file is empty|cannot read the image"
    bad[str(folder / "missing.tif")] = "slide file not found"
    for i in range(2):
        rgb = tissue(rng, 128, 128)
        rgb[60:64, 60:64] = (0, 255, 0)
        Image.fromarray(rgb).save(folder / f"green{i}.png")
        bad[str(folder / f"green{i}.png")] = "the network's output is NaN or infinite"
    return good, bad


def test_soak_100_inputs(tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    rng = np.random.default_rng(0)
    good, bad = make_inputs(folder, rng)
    inputs = good + list(bad)
    assert len(inputs) == 100
    inputs = [inputs[i] for i in rng.permutation(100)]
    si = inference(TinyNet(), classes=["a", "b", "c"], checkpoint="tiny.pt")
    process, rss, fds = psutil.Process(), [], []
    predict_slide = si.predict_slide

    def sampled(path, output_dir):  # after each input's prediction, the previous input's outputs being written
        try:
            return predict_slide(path, output_dir)
        finally:
            rss.append(process.memory_info().rss)
            fds.append(process.num_fds())

    si.predict_slide = sampled
    with pytest.raises(DataError) as error:
        si(inputs, out)

    # every bad input named, with its reason, and counted
    message = str(error.value)
    assert message.startswith(f"{len(bad)} of 100 inputs failed:\n")
    assert sorted(error.value.failed) == sorted(bad)
    lines = message.split("\n")[1:]
    assert len(lines) == len(bad)
    for path, reason in bad.items():
        line = next(line for line in lines if line.startswith(f"{path}: "))
        assert any(r in line for r in reason.split("|")), line
    # every good input's outputs complete, nothing else left
    assert len(error.value.summaries) == len(good)
    names = sorted(os.listdir(out))
    stems = [os.path.splitext(os.path.basename(p))[0] for p in good]
    assert names == sorted(stem + suffix for stem in stems for suffix in OUTPUTS.values())
    for stem in stems:
        summary = json.loads((out / f"{stem}_summary.json").read_text())
        probabilities = np.load(out / f"{stem}_probabilities.npy")
        assert probabilities.shape[0] == 3 and np.isfinite(probabilities).all()
        assert (summary["tissue_pixels"] > 0) == (not stem.endswith(("00", "12", "24", "36", "48", "60", "72")))
    # memory and open files flat after the warm-up
    assert len(rss) == 100
    base = max(rss[:WARM_UP])
    growth = max(rss[WARM_UP:]) / base - 1
    assert growth < 0.10, f"RSS grew {100 * growth:.1f} % after the warm-up ({base / 2**20:.0f} MB)"
    assert max(fds[WARM_UP:]) <= max(fds[:WARM_UP]), fds
