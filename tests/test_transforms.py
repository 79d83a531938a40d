"""LoadPatchd (tiles and slides through one transform) and the H&E stain jitter."""

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from scripts.errors import DataError
from scripts.transforms import LoadPatchd, RandHEDJitterd


@pytest.fixture
def tile(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (40, 60), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "tile.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return rgb, mask, str(tmp_path / "tile.png"), str(tmp_path / "mask.png")


def test_tile_patch_and_mask_channel_first(tile):
    rgb, mask, image_path, mask_path = tile
    out = LoadPatchd(keys=("image", "mask"))(
        {"image": image_path, "mask": mask_path, "location": [5, 10], "size": [16, 24], "label": [1, 0]}
    )
    assert out["image"].shape == (3, 16, 24) and out["image"].dtype == np.uint8
    np.testing.assert_array_equal(out["image"], rgb[5:21, 10:34].transpose(2, 0, 1))
    np.testing.assert_array_equal(out["mask"], mask[None, 5:21, 10:34])
    assert out["label"] == [1, 0]
    out["image"][:] = 0  # callers may write: the cached tile must not change
    again = LoadPatchd()({"image": image_path, "location": [5, 10], "size": [16, 24]})
    np.testing.assert_array_equal(again["image"], rgb[5:21, 10:34].transpose(2, 0, 1))


def test_whole_tile_without_location(tile):
    rgb, _, image_path, _ = tile
    np.testing.assert_array_equal(LoadPatchd()({"image": image_path})["image"], rgb.transpose(2, 0, 1))


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"location": [30, 0], "size": [16, 16]}, r"does not lie inside the 40 x 60 image"),
        ({"location": [-1, 0], "size": [16, 16]}, r"does not lie inside"),
    ],
)
def test_patch_outside_the_tile_is_refused(tile, entry, match):
    with pytest.raises(DataError, match=match):
        LoadPatchd()({"image": tile[2], **entry})


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.png: file not found"):
        LoadPatchd()({"image": str(tmp_path / "nope.png")})


def test_slide_patch_matches_the_pixels(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (128, 160, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, (128, 160), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "slide.tif", rgb, tile=(64, 64), photometric="rgb")
    tifffile.imwrite(tmp_path / "labels.tif", labels, tile=(64, 64), photometric="minisblack")
    entry = {
        "image": str(tmp_path / "slide.tif"),
        "mask": str(tmp_path / "labels.tif"),
        "location": [10, 20],
        "size": [32, 48],
        "level": 0,
    }
    out = LoadPatchd(keys=("image", "mask"), backend="openslide")(entry)
    np.testing.assert_array_equal(out["image"], rgb[10:42, 20:68].transpose(2, 0, 1))
    np.testing.assert_array_equal(out["mask"], labels[None, 10:42, 20:68])
    with pytest.raises(DataError, match="needs 'location' and 'size'"):
        LoadPatchd(backend="openslide")({"image": entry["image"], "level": 0})
    # a slide patch's pseudo-mask is a PNG of just that patch (stage 2 writes one per slide patch)
    Image.fromarray(labels[10:42, 20:68]).save(tmp_path / "pseudo.png")
    out = LoadPatchd(keys=("image", "pseudo"), backend="openslide")({**entry, "pseudo": str(tmp_path / "pseudo.png")})
    np.testing.assert_array_equal(out["pseudo"], labels[None, 10:42, 20:68])
    with pytest.raises(DataError, match="mask for a slide patch of size"):
        LoadPatchd(keys=("pseudo",), backend="openslide")(
            {**entry, "size": [16, 16], "pseudo": str(tmp_path / "pseudo.png")}
        )


def test_hed_jitter_changes_stain_and_keeps_range():
    rng = np.random.default_rng(2)
    image = torch.from_numpy(rng.uniform(0.3, 0.9, (3, 16, 16)).astype(np.float32))
    identity = RandHEDJitterd("image", prob=1.0, alpha=0.0, beta=0.0)({"image": image})["image"]
    torch.testing.assert_close(identity, image)  # an exact round trip, unlike skimage.color.rgb2hed
    jitter = RandHEDJitterd("image", prob=1.0, alpha=0.3, beta=0.05)
    jitter.set_random_state(0)
    out = jitter({"image": image})["image"]
    assert isinstance(out, torch.Tensor) and out.shape == image.shape
    assert 0 <= out.min() and out.max() <= 1 and (out - image).abs().mean() > 0.01
    untouched = RandHEDJitterd("image", prob=0.0)({"image": image})["image"]
    assert untouched is image
