"""Whole-slide inference on small synthetic slides with tiny networks: grid choice, tissue mask, output round trips,
interrupted runs, sharding over gloo ranks, bad input, inference.json through monai.bundle, and its MONAI Label keys
and slide inference sharing one input scaling and activation."""

import json
import os
import subprocess
import sys

import numpy as np
import openslide
import pytest
import tifffile
import torch
from conftest import BUNDLE, ROOT, bundle_run, shared
from PIL import Image
from torch import nn
from wsi_fixtures import CLASSES, GLASS, PINK, PURPLE, ColourNet, inference, inference_config, square_rgb, square_slide

from scripts.data.annotations import read_geojson
from scripts.data.render import make_slide_array
from scripts.errors import DataError
from scripts.wsi.inference import find_inputs, load_weights, shard
from scripts.wsi.plan import choose_grid, open_input
from scripts.wsi.pyramid_tiff import write_pyramidal_tiff

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def synthetic_slide(tmp_path_factory):
    rgb, mask = make_slide_array(np.random.default_rng(3), 768, 1024, tissue_fraction=0.35)
    path = tmp_path_factory.mktemp("slide") / "synthetic.tif"
    write_pyramidal_tiff(path, rgb, mpp=0.5, min_size=128)
    return str(path), mask


def test_grid_follows_mpp(tmp_path):
    reader, wsi = open_input(square_slide(tmp_path / "s.tif"))  # levels: 1, 2, 4 (512 x 768 at 0.5 um/px)
    same = choose_grid(reader, wsi, 0.5, 1.0)
    assert (same.level, same.downsample, same.height, same.width, same.mpp, same.scale) == (1, 2.0, 256, 384, 1.0, 1.0)
    near = choose_grid(reader, wsi, 0.5, 1.05)  # within 10 %: the level as it is
    assert (near.level, near.scale, near.mpp) == (1, 1.0, 0.5 * 2)
    between = choose_grid(reader, wsi, 0.5, 1.5)  # no level: resampled from the finer one
    assert (between.level, between.downsample, between.height, between.width) == (1, 3.0, 171, 256)
    assert between.scale == pytest.approx(1.5) and between.mpp == pytest.approx(1.5)
    finer = choose_grid(reader, wsi, 0.5, 0.25)  # the slide is coarser than the model: level 0 upsampled
    assert (finer.level, finer.height, finer.width, finer.scale) == (0, 1024, 1536, 0.5)
    as_is = choose_grid(reader, wsi, None, None)
    assert (as_is.level, as_is.downsample, as_is.mpp) == (0, 1.0, None)


def test_tissue_mask_and_tiles_on_a_synthetic_slide(synthetic_slide):
    path, truth = synthetic_slide
    plan = inference().plan(path)
    ds = int(plan.mask_downsample)
    tissue = truth[::ds, ::ds][: plan.mask.shape[0], : plan.mask.shape[1]] != 255
    iou = (plan.mask & tissue).sum() / (plan.mask | tissue).sum()
    assert iou > 0.85
    assert 0 < len(plan.tiles) < plan.total_tiles  # glass-only tiles are never read
    for ty, tx in plan.tiles:
        block = truth[ty * 2 : (ty + plan.tile) * 2, tx * 2 : (tx + plan.tile) * 2]
        assert (block != 255).any()


def test_outputs_round_trip(tmp_path):
    si = inference()
    summary = si([square_slide(tmp_path / "square.tif")], tmp_path / "out")[0]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "square.geojson",
        "square_labels.tif",
        "square_overlay.png",
        "square_probabilities.npy",
        "square_summary.json",
    ]
    # the label TIFF: the inference level (1 um/px = level 1, 384 x 256) with its mpp, a pyramid OpenSlide opens
    slide = openslide.OpenSlide(str(out / "square_labels.tif"))
    assert slide.dimensions == (384, 256) and slide.level_count == 2 and slide.level_dimensions[1] == (192, 128)
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(1.0)
    labels = tifffile.imread(out / "square_labels.tif", level=0)
    expected = np.full((256, 384), 255, np.uint8)
    expected[32:224, 64:320] = 0
    expected[96:160, 128:192] = 1
    assert (labels == expected).mean() > 0.99  # only the tissue mask's low-resolution edge may differ
    assert (labels[100:156, 132:188] == 1).all() and (labels[40:90, 70:120] == 0).all()
    # GeoJSON in level-0 pixels: the gland polygon is the purple square (rows 192-320, cols 256-384)
    polygons = read_geojson(out / "square.geojson")
    glands = [p for p in polygons if p.class_name == "gland"]
    assert len(glands) == 1 and not glands[0].holes
    (x0, y0), (x1, y1) = glands[0].exterior.min(0), glands[0].exterior.max(0)
    step = summary["probability_downsample"]  # polygons come from the reduced map: one of its pixels of slack
    assert abs(x0 - 256) <= step and abs(x1 - 384) <= step and abs(y0 - 192) <= step and abs(y1 - 320) <= step
    stroma = [p for p in polygons if p.class_name == "stroma"]
    assert len(stroma) == 1 and len(stroma[0].holes) == 1  # the block with the square as its hole
    assert json.loads((out / "square.geojson").read_text())["features"][0]["properties"]["classification"]["name"]
    # probabilities at a reduced resolution, areas in mm2
    probs = np.load(out / "square_probabilities.npy")
    assert probs.shape == (2, 64, 96) and probs.dtype == np.float16 and 0 <= probs.min() and probs.max() <= 1
    assert summary["class_area_mm2"]["gland"] == pytest.approx(128 * 128 * 0.25e-6, rel=0.05)
    assert summary["tiles_inferred"] > 0 and summary["resampled"] is False
    assert Image.open(out / "square_overlay.png").size[0] >= 384


class Interrupt(nn.Module):
    def forward(self, x):
        raise KeyboardInterrupt


def test_interrupted_run_leaves_nothing(tmp_path):
    path = square_slide(tmp_path / "square.tif")
    with pytest.raises(KeyboardInterrupt):
        inference(Interrupt())([path], tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_existing_outputs_are_skipped_unless_overwrite(tmp_path):
    path = square_slide(tmp_path / "square.tif")
    inference()([path], tmp_path / "out")
    assert inference(Interrupt())([path], tmp_path / "out")[0]["skipped"]
    with pytest.raises(KeyboardInterrupt):
        inference(Interrupt(), overwrite=True)([path], tmp_path / "out")
    assert len(list((tmp_path / "out").iterdir())) == 5  # the earlier outputs stay whole


def _shard_rank(rank, world, init, result):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, shard([f"slide{i}.svs" for i in range(7)]))
    if rank == 0:
        with open(result, "w") as f:
            json.dump(gathered, f)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_get_disjoint_slides_covering_the_list(tmp_path):
    result = tmp_path / "shards.json"
    torch.multiprocessing.spawn(_shard_rank, args=(2, f"file://{tmp_path / 'init'}", str(result)), nprocs=2)
    first, second = json.loads(result.read_text())
    assert first and second and not set(first) & set(second)
    assert sorted(first + second) == sorted(f"slide{i}.svs" for i in range(7))


def test_find_inputs(tmp_path):
    for name in ("b.svs", "a.tif", "c.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert find_inputs(input_dir=tmp_path) == [str(tmp_path / n) for n in ("a.tif", "b.svs", "c.png")]
    assert find_inputs(str(tmp_path / "*.svs")) == [str(tmp_path / "b.svs")]
    assert find_inputs([str(tmp_path / "a.tif"), str(tmp_path / "a.tif")]) == [str(tmp_path / "a.tif")]
    with pytest.raises(DataError, match=r"\*\.ndpi: the pattern matches no file"):
        find_inputs(str(tmp_path / "*.ndpi"))
    with pytest.raises(DataError, match="no input"):
        find_inputs()


def test_bad_inputs(tmp_path):
    si, out = inference(), tmp_path / "out"
    with pytest.raises(DataError, match="missing.svs: slide file not found"):
        si([tmp_path / "missing.svs"], out)
    good = square_slide(tmp_path / "good.tif")
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(open(good, "rb").read()[:5000])
    with pytest.raises(DataError, match=r"1 of 2 inputs failed:\n.*truncated.tif: truncated slide file"):
        si([truncated, good], out)
    assert (out / "good_summary.json").exists() and not list(out.glob("truncated*"))  # the good one still done
    with pytest.raises(DataError, match="nomp.tif: the slide records no pixel size .* --slide_mpp"):
        si([square_slide(tmp_path / "nomp.tif", mpp=None)], out)
    assert inference(slide_mpp=0.5)([tmp_path / "nomp.tif"], out)[0]["mpp"] == 1.0  # the explicit override
    assert inference(mpp=None)([tmp_path / "nomp.tif"], tmp_path / "as_is")[0]["grid_size"] == [512, 768]
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with pytest.raises(DataError, match="a_file/out: the output folder cannot be written"):
        si([good], blocked / "out")


def test_bad_checkpoints_name_the_file(tmp_path):
    net = nn.Conv2d(3, 2, 1)
    with pytest.raises(DataError, match="missing.pt: model checkpoint not found"):
        load_weights(net, str(tmp_path / "missing.pt"), "cpu")
    (tmp_path / "damaged.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="damaged.pt: cannot read the segmentation model checkpoint"):
        load_weights(net, str(tmp_path / "damaged.pt"), "cpu")
    torch.save(nn.Conv2d(3, 5, 1).state_dict(), tmp_path / "other.pt")
    with pytest.raises(DataError, match="other.pt: not a segmentation model checkpoint of this network"):
        load_weights(net, str(tmp_path / "other.pt"), "cpu")
    torch.save(nn.Conv2d(3, 2, 1).state_dict(), tmp_path / "good.pt")
    assert load_weights(net, str(tmp_path / "good.pt"), "cpu") is net


def test_glass_only_slide_gives_empty_outputs(tmp_path):
    path = square_slide(tmp_path / "glass.tif", rgb=np.full((512, 768, 3), GLASS, np.uint8))
    summary = inference()([path], tmp_path / "out")[0]
    assert summary["message"].startswith("no tissue found") and summary["tiles_inferred"] == 0
    assert json.loads((tmp_path / "out" / "glass.geojson").read_text())["features"] == []
    assert (tifffile.imread(tmp_path / "out" / "glass_labels.tif") == 255).all()


def test_rgba_and_grey_tiles(tmp_path):
    rgb = np.full((200, 300, 3), GLASS, np.uint8)
    rgb[40:160, 60:240] = PINK
    rgb[80:120, 100:140] = PURPLE
    alpha = np.full((200, 300, 1), 255, np.uint8)
    alpha[:, :30] = 0  # transparent: composited on white
    Image.fromarray(np.concatenate([rgb, alpha], 2), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb.mean(2).astype(np.uint8), "L").save(tmp_path / "grey.png")
    summaries = inference(mpp=0.5)([tmp_path / "rgba.png", tmp_path / "grey.png"], tmp_path / "out")
    rgba, grey = summaries
    assert rgba["grid_size"] == [200, 300] and rgba["class_pixels"]["gland"] == pytest.approx(40 * 40, rel=0.05)
    assert grey["tissue_pixels"] == 0 and grey["message"].startswith("no tissue")  # grey has no saturation: no H&E


def test_real_slides(tmp_path):
    cmu = shared("wsi", "CMU-1-Small-Region.svs")
    tcga = shared("wsi", "tcga-cr-7395-01a-01-ts1.svs")
    with pytest.raises(DataError, match="records no pixel size"):
        inference(mpp=8.0).plan(str(tcga))
    si = inference(mpp=8.0, slide_mpp=2.0)
    summaries = si([cmu, tcga], tmp_path / "out")
    for summary in summaries:
        slide = openslide.OpenSlide(summary["slide"])
        labels = openslide.OpenSlide(str(tmp_path / "out" / summary["outputs"]["labels"]))
        assert labels.dimensions == tuple(summary["grid_size"][::-1])
        assert float(labels.properties["openslide.mpp-x"]) == pytest.approx(summary["mpp"], rel=1e-3)
        w, h = slide.dimensions
        for polygon in read_geojson(tmp_path / "out" / summary["outputs"]["geojson"]):
            assert polygon.exterior.min() >= 0 and (polygon.exterior <= [w, h]).all()


@pytest.mark.slow
def test_inference_config_through_monai_bundle(tmp_path):
    """The run id `inference` on a folder (a slide, a tile and a broken tile), as users call it (with flip TTA): the
    good ones done, the run failing after them and naming the broken one; and MONAI Label's keys on a tile."""
    folder = tmp_path / "in"
    folder.mkdir()
    square_slide(folder / "square.tif")
    Image.fromarray(square_rgb()).save(folder / "tile.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    result = subprocess.run(
        [
            sys.executable,
            *bundle_run(
                "inference",
                BUNDLE / "configs" / "inference.json",
                input_dir=folder,
                output_dir=tmp_path / "out",
                ckpt_path="$None",
                roi_size="[64, 64]",
                tile_size=128,
                num_workers=1,
                progress_bar=False,
                tta="flip",
            ),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "randomly initialised" in result.stdout + result.stderr
    assert f"1 of 3 inputs failed: {folder / 'broken.png'}: cannot read the image" in " ".join(result.stderr.split())
    assert {json.loads(p.read_text())["slide"] for p in (tmp_path / "out").glob("*_summary.json")} == {
        str(folder / "square.tif"),
        str(folder / "tile.png"),
    }

    parser = inference_config(roi_size=[64, 64])
    for key in ("network_def", "preprocessing", "inferer", "postprocessing", "device", "bundle_root"):
        assert key in parser, key
    data = parser.get_parsed_content("preprocessing")({"image": str(folder / "tile.png")})
    network = parser.get_parsed_content("network").eval()
    with torch.no_grad():
        data["pred"] = parser.get_parsed_content("inferer")(data["image"][None], network)[0]
    pred = parser.get_parsed_content("postprocessing")(data)["pred"]
    assert pred.dtype == np.uint8 and pred.shape == (768, 512) and pred.min() >= 1  # MONAI Label's: x first, 0 unused


def monai_label_labels(parser, path) -> np.ndarray:
    """A tile through the keys MONAI Label's BundleInferTask reads: preprocessing, inferer with network,
    postprocessing; its (W, H) label, class k as k + 1, back as the bundle's (H, W) class indices."""
    data = parser.get_parsed_content("preprocessing")({"image": str(path)})
    network = parser.get_parsed_content("network").eval()
    with torch.no_grad():
        data["pred"] = parser.get_parsed_content("inferer")(data["image"][None], network)[0]
    return parser.get_parsed_content("postprocessing")(data)["pred"].T - 1


def slide_labels(parser, path, output_dir) -> np.ndarray:
    """A tile through the config's ``slide_inference``: its label TIFF's full-resolution level."""
    summary = parser.get_parsed_content("slide_inference")([path], output_dir)[0]
    return tifffile.imread(output_dir / summary["outputs"]["labels"], level=0)


ON_CPU = {"device": "$torch.device('cpu')", "amp": False, "num_workers": 0, "progress_bar": False}


TINY = {
    "_target_": "BasicUNet",
    "spatial_dims": 2,
    "in_channels": 3,
    "out_channels": "$len(@classes)",
    "features": [4, 4, 8, 8, 16, 4],
}


def textured_tile(path, size: int = 192) -> None:
    """An H&E-like texture, tissue everywhere so that every pixel is compared."""
    rng = np.random.default_rng(0)
    rgb = np.empty((size, size, 3), np.uint8)
    rgb[:] = PINK
    for y, x in rng.integers(0, size, (40 * size**2 // 192**2, 2)):
        rgb[max(0, y - 8) : y + 8, max(0, x - 8) : x + 8] = PURPLE
    rgb = np.clip(rgb + rng.integers(-8, 9, rgb.shape), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def test_monai_label_keys_and_slide_inference_give_the_same_labels(tmp_path):
    """The same tile, the same random network, the two paths of inference.json: the same labels, pixel for pixel.

    One window covers the tile (roi = tile, no overlap): slide inference blends windows' probabilities and MONAI
    Label's inferer blends logits, so where windows overlap the two may differ by design, not by their transforms."""
    textured_tile(tmp_path / "tile.png")
    parser = inference_config(**ON_CPU, roi_size=[192, 192], overlap=0.0, tile_size=192, network_def=TINY)
    torch.manual_seed(0)
    slide = slide_labels(parser, tmp_path / "tile.png", tmp_path / "out")
    monai_label = monai_label_labels(parser, tmp_path / "tile.png")
    assert slide.shape == monai_label.shape == (192, 192) and (slide != 255).all()
    assert len(np.unique(slide)) >= 2  # the random network's labels vary, so agreeing means something
    np.testing.assert_array_equal(slide, monai_label)


@pytest.mark.parametrize(
    "override, gland_where",
    [
        ({}, "purple"),
        ({"scale_intensity#a_max": 510}, "all"),  # red 230 -> 0.45: dark enough for ColourNet's gland everywhere
        ({"activation": {"_target_": "torch.nn.Softmin", "dim": -3}}, "pink"),  # the classes' order reversed
    ],
    ids=["shipped", "scaling", "activation"],
)
def test_both_paths_take_scaling_and_activation_from_the_config(tmp_path, override, gland_where):
    """Change inference.json's ``scale_intensity`` or ``activation`` and slide inference follows, as MONAI Label's
    keys do: neither path has a copy of its own."""
    Image.fromarray(square_rgb()).save(tmp_path / "square.png")
    parser = inference_config(**ON_CPU, roi_size=[64, 64], tile_size=128, classes=CLASSES, **override)
    parser["network"] = ColourNet()
    slide = slide_labels(parser, tmp_path / "square.png", tmp_path / "out")
    tissue = slide != 255
    purple = (square_rgb() == PURPLE).all(-1)
    gland = {"purple": purple, "all": np.ones_like(purple), "pink": ~purple}[gland_where]
    assert tissue.mean() > 0.4 and (slide[tissue] == gland[tissue]).all()
    np.testing.assert_array_equal(slide[tissue], monai_label_labels(parser, tmp_path / "square.png")[tissue])


def test_onnxruntime_backend_gives_the_labels_of_pytorch(tmp_path):
    """``run inference`` with ``--backend onnxruntime``: the checkpoint exported once beside itself, the same labels
    as the PyTorch network on a tile where overlapping windows blend."""
    textured_tile(tmp_path / "tile.png", 256)
    settings = {
        **ON_CPU,
        "roi_size": [64, 64],
        "tile_size": 128,
        "network_def": TINY,
        "input": str(tmp_path / "tile.png"),
    }
    torch.manual_seed(0)
    network = inference_config(**settings).get_parsed_content("network")
    torch.save({"model": network.state_dict()}, tmp_path / "model.pt")
    labels = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        parser = inference_config(
            **settings, ckpt_path=str(tmp_path / "model.pt"), backend=backend, output_dir=str(out)
        )
        parser.get_parsed_content("run")
        labels[backend] = tifffile.imread(out / "tile_labels.tif", level=0)
    assert (tmp_path / "model.onnx").is_file()
    assert len(np.unique(labels["torch"])) >= 2  # the random network's labels vary, so agreeing means something
    assert (labels["onnxruntime"] == labels["torch"]).mean() >= 0.999
