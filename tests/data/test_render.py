import csv
import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from scripts.data.demo import prepare_demo
from scripts.data.render import (
    CLASSES,
    GLAND,
    LYMPHOCYTES,
    NOT_TISSUE,
    STROMA,
    colour_mask,
    demo_figure,
    make_slide_array,
    make_tile,
)
from scripts.errors import DataError


def tile(seed, size=128, **kwargs):
    return make_tile(np.random.default_rng(seed), size, size, **kwargs)


def test_tiles_are_deterministic():
    a, b, c = tile(3), tile(3), tile(4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (128, 128, 3) and a[0].dtype == np.uint8
    assert a[1].shape == (128, 128) and a[1].dtype == np.uint8


def test_mask_holds_exactly_the_requested_classes():
    _, mask = tile(0, gland_fraction=0.0, lymphocyte_fraction=0.0)
    assert set(np.unique(mask)) == {STROMA}
    _, mask = tile(0, gland_fraction=0.3, lymphocyte_fraction=0.0)
    assert set(np.unique(mask)) == {STROMA, GLAND}
    assert 0.15 < np.mean(mask == GLAND) < 0.5
    _, mask = tile(0, size=192, gland_fraction=0.0, lymphocyte_fraction=0.2)
    assert set(np.unique(mask)) == {STROMA, LYMPHOCYTES}
    assert 0.1 < np.mean(mask == LYMPHOCYTES) < 0.4


def test_tiles_vary_in_class_content():
    present = np.array([[np.any(tile(seed)[1] == c) for c in range(len(CLASSES))] for seed in range(12)])
    assert present[:, STROMA].all()
    for c in (GLAND, LYMPHOCYTES):
        assert 0 < present[:, c].sum() < len(present), f"{CLASSES[c]} should be in some tiles but not all"


def test_colours_are_h_and_e():
    rgb, mask = tile(1, size=256, gland_fraction=0.3, lymphocyte_fraction=0.15)
    pixels = rgb.reshape(-1, 3).astype(float)
    stroma = pixels[mask.ravel() == STROMA].mean(0)
    assert stroma[0] > stroma[2] > stroma[1], f"stroma should be eosin pink, got mean RGB {stroma}"
    assert 150 < stroma[0] < 240
    brightness = pixels.mean(1)
    lymph = brightness[mask.ravel() == LYMPHOCYTES].mean()
    assert lymph < brightness[mask.ravel() == STROMA].mean() - 20, "lymphocyte clusters are dark nuclei"
    dark = pixels[brightness < np.percentile(brightness, 5)].mean(0)
    assert dark[2] > dark[1] and dark[0] > dark[1], f"nuclei should be haematoxylin purple, got {dark}"
    # glands: nuclear rim darker than the pale lumen at their centre
    gland = mask == GLAND
    assert brightness.reshape(mask.shape)[gland].max() > 215 and brightness.reshape(mask.shape)[gland].min() < 120


def test_slide_has_glass_and_tissue():
    rgb, mask = make_slide_array(np.random.default_rng(0), 384, 320, tissue_fraction=0.4)
    glass = mask == NOT_TISSUE
    assert glass.mean() == pytest.approx(0.6, abs=0.03)
    assert set(np.unique(mask[~glass])) <= {STROMA, GLAND, LYMPHOCYTES}
    assert np.abs(rgb[glass].astype(float) - 240).mean() < 3
    tissue = rgb[~glass].astype(float).mean(0)
    assert tissue.mean() < 200 and tissue[0] > tissue[1]
    assert glass[0].all() and glass[-1].all() and glass[:, 0].all() and glass[:, -1].all(), "tissue off the edges"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda rng: make_tile(rng, 16, 64), "at least 32"),
        (lambda rng: make_tile(rng, 64, 64, gland_fraction=1.2), "gland_fraction"),
        (lambda rng: make_tile(rng, 64, 64, lymphocyte_fraction=-0.1), "lymphocyte_fraction"),
        (lambda rng: make_tile(rng, 64, 64, scale=0), "scale"),
        (lambda rng: make_slide_array(rng, 64, 64, tissue_fraction=1.0), "tissue_fraction"),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(DataError, match=message):
        call(np.random.default_rng(0))


def test_colour_mask():
    mask = np.array([[STROMA, GLAND], [LYMPHOCYTES, NOT_TISSUE]], np.uint8)
    assert colour_mask(mask).shape == (2, 2, 3) and (colour_mask(mask)[1, 1] == 255).all()


def test_demo_figure(tmp_path):
    path = demo_figure(tmp_path / "fig.png", tile_size=64)
    assert Image.open(path).size == (4 * 64 + 3 * 6, 2 * 64 + 6 + 40)


def test_prepare_demo_end_to_end(tmp_path):
    kwargs = dict(n_train=3, n_validation=1, n_test=1, tile_size=96, slide_size=600, patch_size=64, stride=32)
    datalist = prepare_demo(tmp_path / "demo", **kwargs)
    root = tmp_path / "demo"
    data = json.loads((root / "datalist.json").read_text())
    assert datalist == str(root / "datalist.json")
    assert data["classes"] == list(CLASSES)
    assert [len(data[s]) for s in ("training", "validation", "test")] == [3 * 4, 4, 4]  # 2 x 2 patches per tile
    entry = data["training"][0]
    assert (root / entry["image"]).is_file() and (root / entry["mask"]).is_file() and len(entry["label"]) == 3
    labels = np.array([e["label"] for e in data["training"] + data["validation"] + data["test"]])
    assert labels[:, STROMA].any() and (labels.sum(0) < len(labels)).any()
    with open(root / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["split"] for r in rows] == ["training"] * 3 + ["validation", "test"]
    image = np.asarray(Image.open(root / "images" / f"{rows[0]['name']}.png"))
    mask = np.asarray(Image.open(root / "masks" / f"{rows[0]['name']}.png"))
    assert image.shape == (96, 96, 3) and mask.shape == (96, 96) and mask.max() < len(CLASSES)

    with tifffile.TiffFile(root / "slide" / "demo_slide.tif") as tif:
        assert [p.shape for p in tif.pages] == [(600, 600, 3), (300, 300, 3)]
    with tifffile.TiffFile(root / "slide" / "demo_slide_mask.tif") as tif:
        slide_mask = tif.pages[0].asarray()
        assert slide_mask.shape == (600, 600) and set(np.unique(slide_mask)) <= {0, 1, 2, NOT_TISSUE}
        assert np.mean(slide_mask == NOT_TISSUE) == pytest.approx(0.5, abs=0.05)

    # kept unless forced; forced or elsewhere, the same seed gives the same bytes
    before = (root / "datalist.json").stat().st_mtime_ns
    assert prepare_demo(root, **kwargs) == datalist
    assert (root / "datalist.json").stat().st_mtime_ns == before
    prepare_demo(tmp_path / "again", **kwargs)
    for name in ("images/training_000.png", "masks/test_000.png", "labels.csv", "slide/demo_slide_mask.tif"):
        assert (root / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_prepare_demo_rejects_bad_counts(tmp_path):
    with pytest.raises(DataError, match="training tile"):
        prepare_demo(tmp_path, n_train=0)
    assert not any(tmp_path.iterdir())
