"""scripts/viewer.py: MONAI Label's dialect (x first, label 0 background) translated in one place; and train.json on
MONAI Label's datastore entries (image + a pathologist's label mask), without MONAI Label installed."""

import json

import numpy as np
import pytest
import torch
from conftest import BUNDLE, configs
from monai.bundle import ConfigWorkflow
from PIL import Image

from scripts.constants import IGNORE
from scripts.errors import DataError
from scripts.viewer import FromViewerLabeld, LoadRegiond, ToViewerLabeld, region_entry
from scripts.wsi.pyramid_tiff import write_pyramidal_tiff

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def gradient_slide(tmp_path_factory):
    """A 300 x 500 slide whose red channel is the row and green the column: any read says where it came from."""
    yy, xx = np.mgrid[0:300, 0:500]
    rgb = np.stack([yy % 256, xx % 256, (yy // 256) * 100 + (xx // 256) * 10], -1).astype(np.uint8)
    path = tmp_path_factory.mktemp("slide") / "gradient.tif"
    write_pyramidal_tiff(path, rgb, mpp=0.5, min_size=64)
    return str(path), rgb


def test_region_request_becomes_a_datalist_entry():
    request = {"image": "/s/slide.svs", "location": [300, 500], "size": [900, 600], "level": 1}
    assert region_entry(request) == {"image": "/s/slide.svs", "location": [500, 300], "size": [600, 900], "level": 1}
    tile = {"image": "/s/tile.PNG", "location": [10, 20], "size": [2048, 2048], "level": 0}  # QuPath sends these too
    assert region_entry(tile) == {"image": "/s/tile.PNG"}
    with pytest.raises(DataError, match="slide.svs: a whole slide; ask for a region"):
        region_entry({"image": "/s/slide.svs"})
    with pytest.raises(DataError, match=r"slide.svs: no slide region at \(x, y\) = \(-5, 0\)"):
        region_entry({"image": "/s/slide.svs", "location": [-5, 0], "size": [10, 10]})


def test_a_region_is_read_where_the_viewer_asked(gradient_slide):
    path, rgb = gradient_slide
    load = LoadRegiond(keys="image", backend="openslide")
    data = load({"image": path, "location": [260, 40], "size": [200, 100], "level": 0})  # x 260..459, y 40..139
    expected = rgb[40:140, 260:460].transpose(2, 0, 1).astype(int)
    assert np.abs(data["image"].astype(int) - expected).max() <= 8  # JPEG tiles: near, not equal
    assert data["location"] == [260, 40]  # left for MONAI Label's polygons, in its own order
    half = load({"image": path, "location": [100, 50], "size": [60, 40], "level": 1})["image"]
    assert half.shape == (3, 40, 60)  # size at the level, location at level 0
    with pytest.raises(
        DataError, match=r"\(x, y\) = \(450, 0\) of size \(w, h\) = \(100, 100\) .* inside the slide \(500 x 300 pixels"
    ):
        load({"image": path, "location": [450, 0], "size": [100, 100], "level": 0})
    with pytest.raises(DataError, match="level 7 does not exist"):
        load({"image": path, "location": [0, 0], "size": [10, 10], "level": 7})


def test_a_region_at_another_pixel_size_is_resampled_to_the_models(gradient_slide):
    path, _ = gradient_slide  # 0.5 um/px at level 0, 1.0 at level 1
    load = LoadRegiond(keys="image", backend="openslide", mpp=1.0)
    fine = load({"image": path, "location": [260, 40], "size": [200, 100], "level": 0})
    assert fine["image"].shape == (3, 50, 100) and fine["region_shape"] == [100, 200]
    coarse = load({"image": path, "location": [260, 40], "size": [100, 50], "level": 1})
    assert coarse["image"].shape == (3, 50, 100) and "region_shape" not in coarse  # already the model's
    np.testing.assert_allclose(fine["image"], coarse["image"], atol=12)  # the same place, at the same pixel size
    pred = torch.zeros(1, 50, 100, dtype=torch.long)
    pred[:, :, 50:] = 1
    label = ToViewerLabeld(keys="pred")({"pred": pred, "region_shape": fine["region_shape"]})["pred"]
    assert label.shape == (200, 100) and (label[:100] == 1).all() and (label[100:] == 2).all()  # W x H, region size


def test_prediction_becomes_the_viewers_label():
    pred = torch.tensor([[[0, 1, 2], [2, 2, 0]]])  # 1 x H=2 x W=3 class indices
    out = ToViewerLabeld(keys="pred")({"pred": pred})["pred"]
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[1, 3], [2, 3], [3, 1]])  # W x H, class k as k + 1


def test_pathologists_label_becomes_class_indices():
    label = np.array([[[0, 1, 2], [3, 0, 1]]], np.uint8)
    convert = FromViewerLabeld(keys="label", num_classes=3)
    out = convert({"label": label, "viewer_label": "l.png"})["label"]
    np.testing.assert_array_equal(out, [[[IGNORE, 0, 1], [2, IGNORE, 0]]])  # unpainted pixels never train
    np.testing.assert_array_equal(convert({"label": label})["label"], label)  # pseudo-masks pass unchanged
    with pytest.raises(DataError, match="l.png: label value 3, but the model has 2 classes"):
        FromViewerLabeld(keys="label", num_classes=2)({"label": label, "viewer_label": "l.png"})


def test_train_json_learns_from_a_monai_label_datastore(tmp_path):
    """What MONAI Label's trainer passes: ``{"image", "label"}`` entries of tiles of different sizes, no pseudo-labels
    in the bundle, classes from the metadata. One epoch: crops/pads batch, the metric is against the labels."""
    rng = np.random.default_rng(0)
    entries = []
    for i, (h, w) in enumerate([(70, 90), (300, 280), (120, 260)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(tmp_path / f"t{i}.png")
        label = rng.integers(0, 4, (h, w)).astype(np.uint8)  # 0 unpainted, 1..3 the demo's three classes
        Image.fromarray(label).save(tmp_path / f"l{i}.png")
        entries.append({"image": str(tmp_path / f"t{i}.png"), "label": str(tmp_path / f"l{i}.png")})
    wf = ConfigWorkflow(
        config_file=configs("train.json"),
        workflow_type="train",
        bundle_root=str(BUNDLE),
        pseudo_dir=str(tmp_path / "none"),
        ckpt_dir=str(tmp_path / "models"),
        log_dir=str(tmp_path / "logs"),
        pretrained=False,
        num_workers=0,
        progress_bar=False,
        **{"train#dataset#data": entries[:2], "validate#dataset#data": entries[2:], "train#trainer#max_epochs": 1},
    )
    wf.initialize()
    classes = json.loads((BUNDLE / "configs" / "metadata.json").read_text())["network_data_format"]["outputs"]
    assert wf.parser.get_parsed_content("classes") == list(classes["pred"]["channel_def"].values())
    small = wf.parser.get_parsed_content("train#dataset")[0]
    assert small["image"].shape == (3, 256, 256) and small["label"].shape[1:] == (256, 256)
    assert (small["label"] == IGNORE).float().mean() > 0.9  # padding and unpainted pixels are ignored
    wf.run()
    saved = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert saved["contract"]["classes"] == ["stroma", "gland", "lymphocytes"]
    assert "val_label_miou" in wf.parser.get_parsed_content("validate#evaluator").state.metrics
    wf.finalize()
