"""The three phases of whole-slide inference, each alone: plan (tiling, grid, tissue tiles, reading them), predict
(the tile model, labels and reduced probabilities) and write (label TIFF, GeoJSON, overlay, summary)."""

import json
import threading

import numpy as np
import pytest
import shapely
import tifffile
import torch
from monai.inferers import SlidingWindowInferer
from monai.transforms import ScaleIntensityRanged
from PIL import Image
from skimage.measure import find_contours
from wsi_fixtures import CLASSES, GLASS, PINK, PURPLE, ColourNet, inference, square_rgb, square_slide

from scripts.data.annotations import read_geojson
from scripts.errors import DataError
from scripts.wsi import inference as slide_inference
from scripts.wsi import outputs
from scripts.wsi.outputs import LabelStore, output_paths, reduced_labels, slide_summary, write_maps
from scripts.wsi.plan import TileDataset, plan_slide, tiling
from scripts.wsi.predict import TileModel, predict

torch.set_num_threads(1)


def test_tiling_puts_all_windows_on_one_grid():
    assert tiling(64, 0.25, 96, 4) == (64, 8, 96)  # stride 48: margin (64 - 48) / 2, tiles two strides wide
    assert tiling([64, 64], 0.5, 100, 8) == (64, 16, 96)  # stride 32 = lcm(32, 8): 100 rounds to 3 strides
    assert tiling(64, 0.25, 10, 4) == (64, 8, 48)  # at least one unit
    with pytest.raises(DataError, match="square roi_size"):
        tiling([64, 32], 0.25, 96, 4)


@pytest.fixture
def corner_plan(tmp_path):
    """A 384 x 384 PNG tile, glass with a pink block in its top-left 150 x 150 pixels, planned in 128-px tiles with an
    8-px margin at the model's pixel size."""
    rgb = np.full((384, 384, 3), GLASS, np.uint8)
    rgb[:150, :150] = PINK
    Image.fromarray(rgb).save(tmp_path / "corner.png")
    return plan_slide(
        str(tmp_path / "corner.png"),
        tile=128,
        margin=8,
        model_mpp=0.5,
        slide_mpp=None,
        mpp_tolerance=0.1,
        backend="cucim",
    )


def test_plan_lists_the_tissue_tiles_and_reads_them_with_their_margin(corner_plan):
    plan = corner_plan
    assert (plan.grid.height, plan.grid.width, plan.grid.mpp, plan.slide_mpp) == (384, 384, 0.5, 0.5)
    assert plan.total_tiles == 9 and plan.tiles == [(0, 0), (0, 128), (128, 0), (128, 128)]
    assert plan.mask_downsample == 1 and plan.mask[:150, :150].all() and plan.mask.sum() == 150 * 150
    image = TileDataset(plan, "cucim")[0]["image"].numpy()  # rows and columns -8 ... 136
    assert image.shape == (4, 144, 144) and image.dtype == np.uint8
    assert (image[:3, 0, 0] == PINK).all()  # outside the slide the edge repeats
    assert image[3, :8].max() == 0 and image[3, :, :8].max() == 0  # ... but it is not tissue
    assert image[3, 8:144, 8:144].all()


def constant(probabilities):
    """A tile model that gives every pixel of every tile the same class probabilities."""
    p = torch.tensor(probabilities).view(1, -1, 1, 1)
    return lambda image: p.expand(image.shape[0], -1, *image.shape[2:])


def test_predict_labels_tissue_and_reduces_probabilities(corner_plan, tmp_path):
    plan, f = corner_plan, 4
    labels = LabelStore(tmp_path / "labels.raw", 384, 384)
    probabilities = np.zeros((2, 96, 96), np.float16)
    batches = torch.utils.data.DataLoader(TileDataset(plan, "cucim"), batch_size=3)
    counts = predict(plan, batches, constant([0.25, 0.75]), labels, probabilities, f)
    expected = np.where(plan.mask, 1, 255)
    assert (labels[0:384, 0:384] == expected).all()
    assert counts[1] == 150 * 150 and counts.sum() == 4 * 128 * 128  # the inferred tiles only
    assert (probabilities[:, :37, :37] == np.array([0.25, 0.75], np.float16)[:, None, None]).all()
    assert probabilities[:, 38:64, 38:64].max() == 0  # off the tissue in an inferred tile
    assert probabilities[1, 37, 0] == np.float16(0.75 * 2 / 4)  # rows 148-151: half of it tissue
    assert probabilities[:, 64:].max() == 0  # tiles not inferred
    labels.close()


def test_tile_model_scales_runs_tissue_windows_and_activates():
    """The scaling and the activation are the ones given; windows without tissue are skipped and give zeros."""
    image = torch.zeros(1, 4, 96, 96, dtype=torch.uint8)
    image[0, :3] = torch.tensor([100, 150, 190], dtype=torch.uint8).view(3, 1, 1)  # red 100: gland for ColourNet
    image[0, 3, :40, :40] = 1
    inferer = SlidingWindowInferer(32, 4, 0.0, mode="gaussian")
    scale = ScaleIntensityRanged("image", 0, 255, 0.0, 1.0)
    model = TileModel(ColourNet(), inferer, scale, torch.nn.Softmax(-3), num_classes=2)
    probs = model(image)
    assert probs.shape == (1, 2, 96, 96) and model.windows == 4  # the 2 x 2 windows touching rows/cols < 40
    gland = torch.sigmoid(torch.tensor(20 * (0.6 - 100 / 255)))
    assert torch.allclose(probs[0, 1, :64, :64], gland) and probs[0, :, 64:].max() == 0
    halved = TileModel(ColourNet(), inferer, ScaleIntensityRanged("image", 0, 510, 0.0, 1.0), torch.nn.Softmax(-3), 2)
    assert halved(image)[0, 1, 0, 0] > gland  # a darker red under another scaling: more gland


def test_write_phase_alone(corner_plan, tmp_path):
    plan, f = corner_plan, 4
    out = output_paths(tmp_path, "corner")
    assert [p.name for p in out.values()] == [
        "corner_labels.tif",
        "corner_probabilities.npy",
        "corner.geojson",
        "corner_overlay.png",
        "corner_summary.json",
    ]
    labels = np.where(plan.mask, 1, 255).astype(np.uint8)
    probabilities = np.zeros((2, 96, 96), np.float16)
    probabilities[1, :38, :38] = 1
    reduced = reduced_labels(probabilities)
    assert reduced.dtype == np.uint8 and (reduced[:38, :38] == 1).all() and (reduced[38:] == 255).all()
    polygons = write_maps(out, plan, labels, reduced, CLASSES, f)
    assert (tifffile.imread(out["labels"], level=0) == labels).all()
    glands = read_geojson(out["geojson"])
    assert polygons == len(glands) == 1 and glands[0].class_name == "gland"
    assert np.allclose(glands[0].exterior.max(0), 38 * f, atol=1)  # reduced pixels back in level-0 pixels
    assert Image.open(out["overlay"]).size[0] == 384
    counts = np.bincount(labels.ravel(), minlength=256)
    summary = slide_summary(
        plan, CLASSES, counts, model_mpp=0.5, windows=7, polygons=polygons, prob_downsample=f, seconds=1.25, outputs=out
    )
    assert summary["class_pixels"] == {"stroma": 0, "gland": 150 * 150} and summary["windows_inferred"] == 7
    assert summary["class_area_mm2"]["gland"] == pytest.approx(150 * 150 * 0.25e-6)
    assert summary["message"] == "4 of 9 tiles inferred, 0.02 tissue MP in 1.2 s"
    assert summary["outputs"]["summary"] == "corner_summary.json" and json.dumps(summary)


@pytest.mark.parametrize("read_bytes", [1, 60, 1 << 22])  # a row per read, a few rows per read, all rows at once
def test_label_store_reads_any_block_as_the_array_would(tmp_path, monkeypatch, read_bytes):
    monkeypatch.setattr(outputs, "READ_BYTES", read_bytes)
    array = np.random.default_rng(0).integers(0, 256, (37, 53)).astype(np.uint8)
    with LabelStore(tmp_path / "labels.raw", 37, 53) as store:
        store.write(0, 0, array)
        for rows, cols in [
            (slice(0, 37), slice(0, 53)),
            (slice(5, 20), slice(11, 12)),
            (slice(30, 60), slice(40, 70)),  # past the edges, as the pyramid's last tiles ask
            (slice(3, 3), slice(0, 5)),
            (slice(0, 5), slice(9, 9)),
        ]:
            assert np.array_equal(store[rows, cols], array[rows, cols])


def test_polygon_rings_stay_within_the_tolerance_and_lose_their_collinear_points():
    labels = np.zeros((60, 60), np.uint8)
    labels[10:30, 5:50] = 1  # a rectangle: 4 corners after simplification
    yy, xx = np.mgrid[:60, :60]
    labels[(yy - 45) ** 2 + (xx - 30) ** 2 < 100] = 1  # a disc: a staircase outline
    rings = find_contours(np.pad(labels == 1, 1), 0.5)
    for tolerance in (0.5, 2.0):
        for ring, simple in zip(rings, outputs.simplified(rings, tolerance)):
            assert len(simple) < len(ring) and (simple[0] == ring[0]).all() and (simple[-1] == ring[-1]).all()
            assert shapely.LineString(ring).hausdorff_distance(shapely.LineString(simple)) <= tolerance
    polygons = outputs.label_polygons(labels, ["stroma", "gland"], 1.0, (60, 60))
    glands = sorted((p for p in polygons if p.class_name == "gland"), key=lambda p: len(p.exterior))
    assert len(glands) == 2 and len(glands[0].exterior) == 4  # the rectangle's corners only
    assert outputs.simplified([], 0.5) == []


def test_a_slide_is_written_while_the_next_is_predicted(tmp_path, monkeypatch):
    """The write phase of slide 1 runs in the writer thread while slide 2 is predicted (it sees slide 2's prediction
    start), and the outputs are those of the phases run one after the other, the summaries in input order."""
    variant = square_rgb()
    variant[96:160, 420:520] = PURPLE  # a second gland
    paths = [square_slide(tmp_path / "a.tif"), square_slide(tmp_path / "b.tif", rgb=variant)]
    predicting_b, seen = threading.Event(), {}
    real_predict, real_write = slide_inference.predict, slide_inference.write_maps

    def predict(plan, *args, **kwargs):
        if plan.path.endswith("b.tif"):
            predicting_b.set()
        return real_predict(plan, *args, **kwargs)

    def write_maps(tmp, plan, *args, **kwargs):
        if plan.path.endswith("a.tif"):
            seen["b predicted meanwhile"] = predicting_b.wait(timeout=30)
        return real_write(tmp, plan, *args, **kwargs)

    monkeypatch.setattr(slide_inference, "predict", predict)
    monkeypatch.setattr(slide_inference, "write_maps", write_maps)
    overlapped = inference()(paths, tmp_path / "overlapped")
    assert seen == {"b predicted meanwhile": True}
    monkeypatch.setattr(slide_inference, "write_maps", real_write)
    serial = inference(overlap_writes=False)(paths, tmp_path / "serial")
    assert [s["slide"] for s in overlapped] == [s["slide"] for s in serial] == paths
    for name in ("a", "b"):
        for suffix in ("_labels.tif", ".geojson", "_overlay.png", "_probabilities.npy"):
            files = [tmp_path / run / f"{name}{suffix}" for run in ("overlapped", "serial")]
            assert files[0].read_bytes() == files[1].read_bytes(), files[0].name
    assert overlapped[1]["class_pixels"] != overlapped[0]["class_pixels"]


def test_a_write_that_fails_in_the_writer_thread_names_its_slide_only(tmp_path, monkeypatch):
    paths = [square_slide(tmp_path / "a.tif"), square_slide(tmp_path / "b.tif")]
    real = outputs.json.dump

    def dump(data, file, *args, **kwargs):
        if file.name.endswith("a.geojson"):
            raise OSError(28, "No space left on device")
        return real(data, file, *args, **kwargs)

    monkeypatch.setattr(outputs.json, "dump", dump)
    with pytest.raises(DataError, match=r"^1 of 2 inputs failed:\n.*a.geojson: no space left") as error:
        inference()(paths, tmp_path / "out")
    assert list(error.value.failed) == [paths[0]] and [s["slide"] for s in error.value.summaries] == [paths[1]]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "b.geojson",
        "b_labels.tif",
        "b_overlay.png",
        "b_probabilities.npy",
        "b_summary.json",
    ]
