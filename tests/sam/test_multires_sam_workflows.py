"""WSI-SAM's workflows on tiny random models: training through monai.bundle (multires_sam.json), stage 2 with
``sam_refiner: multires`` (pseudo_label.json), and interactive.json on a slide, with its bad inputs."""

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import torch
from conftest import BUNDLE, configs
from monai.bundle import ConfigWorkflow
from monai.data import load_decathlon_datalist
from test_labeler import TINY, demo, workflow  # noqa: F401  (demo: the stage-2 fixture)
from test_multires_sam import square_slide

from scripts.errors import DataError, user_error
from scripts.images import read_mask
from scripts.sam.interactive import InteractiveSegmentation
from scripts.sam.model import load_sam
from scripts.sam.multires import load_multires

torch.set_num_threads(1)
TINY_SAM = {"sam_backend": "tiny", "sam_image_size": 64, "progress_bar": False}


def run(config: str, common: bool = True, **overrides) -> ConfigWorkflow:
    files = configs(config) if common else str(BUNDLE / "configs" / config)
    wf = ConfigWorkflow(config_file=files, workflow_type=None, bundle_root=str(BUNDLE), **overrides)
    wf.initialize()
    wf.run()
    return wf


def test_one_epoch_of_training_on_pseudo_masks_through_monai_bundle(tiny_demo, tmp_path):
    """The demo's masks stand in for stage 2's pseudo-masks (a test of the mechanics, not of weak supervision)."""
    raw = json.loads(Path(tiny_demo).read_text())
    training = [{**e, "pseudo": e["mask"]} for e in load_decathlon_datalist(tiny_demo, False, "training")]
    pseudo = tmp_path / "datalist_pseudo.json"
    pseudo.write_text(json.dumps({"classes": raw["classes"], "training": training}))
    checkpoint = tmp_path / "multires_sam.pt"
    wf = run(
        "multires_sam.json",
        pseudo_datalist=str(pseudo),
        multires_checkpoint=str(checkpoint),
        epochs=1,
        sam_classes=["gland"] if "gland" in raw["classes"] else None,
        **TINY_SAM,
    )
    trainer = wf.parser.get_parsed_content("trainer")
    assert len(trainer.units) == len({e["image"] for e in training})  # one region per tile, not per patch
    saved = torch.load(checkpoint, weights_only=True)
    fresh = load_multires(load_sam("tiny", image_size=64), "tiny")
    assert saved["base"] == "tiny" and saved["base_hash"] == fresh.base_hash
    assert saved["state"].keys() == fresh.trainable_state().keys()
    assert any(not torch.equal(v, fresh.trainable_state()[k]) for k, v in saved["state"].items())
    assert all(
        torch.equal(v, fresh.sam.state_dict()[k]) for k, v in wf.parser.get_parsed_content("sam").state_dict().items()
    )


def test_stage_two_with_the_multires_refiner(demo, tmp_path):  # noqa: F811
    wf = workflow(demo, tmp_path, sam_refiner="multires", multires_epochs=1)
    wf.run()
    assert (tmp_path / "multires_sam.pt").is_file()
    assert not (tmp_path / "sam_decoder_iter1.pt").exists()
    data = json.loads((tmp_path / "datalist_pseudo.json").read_text())
    pseudo = {e["pseudo"] for e in data["training"]}
    assert pseudo and all("sam_iter1" in p for p in pseudo)
    for path in pseudo:
        assert read_mask(tmp_path / path if not Path(path).is_absolute() else path).ndim == 2
    with pytest.raises(Exception) as error:
        workflow(demo, tmp_path / "other", sam_refiner="both").run()
    assert "sam_refiner 'both' is unknown" in user_error(error.value)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return square_slide(tmp_path_factory.mktemp("slide") / "square.tif", mpp=0.5)


BOXES = [[260, 196, 380, 316], [140, 80, 200, 140], [600, 400, 630, 440], [150, 90, 190, 130], [10, 10, 40, 30]]


def test_interactive_config_gives_one_polygon_per_box_inside_it(slide, tmp_path):
    """Box 0 (120 px) is larger than the 64-px HR view: its views grow; box 3 lies in box 1's region."""
    prompts = tmp_path / "prompts.geojson"
    point = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [320, 250]}, "properties": {}}
    prompts.write_text(json.dumps({"type": "FeatureCollection", "features": [point]}))
    out = tmp_path / "out"
    wf = run(
        "interactive.json",
        common=False,
        image=slide,
        boxes=BOXES,
        prompts=str(prompts),
        output_dir=str(out),
        region=64,
        class_name="gland",
        **TINY_SAM,
    )
    timings = wf.parser.get_parsed_content("segmenter").timings
    assert sum(t["prompts"] for t in timings) == 6 and len(timings) == 5  # boxes 1 and 3 share a region
    features = json.loads((out / "square_prompts.geojson").read_text())["features"]
    names = [f["properties"]["name"] for f in features]
    assert names == [f"prompt {i}" for i in range(6)]  # the GeoJSON's point first, then the boxes
    for feature, box in zip(features[1:], BOXES):
        polygon = shapely.from_geojson(json.dumps(feature["geometry"]))
        assert polygon.is_valid and polygon.area > 0
        assert polygon.within(shapely.box(*box).buffer(1e-6)), (polygon.bounds, box)
        properties = feature["properties"]
        mask = read_mask(out / properties["mask"]) > 0  # the prompt's whole HR view (downsample 1 here)
        assert properties["mask_downsample"] == 1.0
        x, y = np.asarray(polygon.representative_point().coords[0]) - properties["mask_origin_xy"]
        assert mask[int(y), int(x)], "the polygon outlines the mask, not what lies around it"
        assert 0 < polygon.area <= 1.1 * mask.sum()
        area = feature["properties"]["measurements"]
        assert area["Area µm^2"] == pytest.approx(area["Area px^2"] * 0.25, rel=1e-3)
        assert feature["properties"]["classification"]["name"] == "gland"
    masks = sorted(p.name for p in out.glob("square_prompt*.png"))
    assert masks == [f"square_prompt{i}.png" for i in range(6)]


@pytest.fixture(scope="module")
def segmenter():
    return InteractiveSegmentation(load_multires(load_sam("tiny", image_size=64), "tiny", mpp=0.5), region=64)


@pytest.mark.parametrize(
    "box, problem",
    [
        ([700, 10, 800, 50], r"lies outside .*square\.tif \(768 x 512 pixels\)"),
        ([100, 100, 100, 150], "empty box"),
        ([0, 0, 200, 100], "larger than the LR view"),
    ],
)
def test_a_bad_box_is_refused_naming_the_slide(slide, segmenter, tmp_path, box, problem):
    with pytest.raises(DataError, match=rf"square\.tif: --boxes: box 0: .*{problem}"):
        segmenter(slide, tmp_path, boxes=[box])
    assert not list(tmp_path.iterdir())


def test_a_geojson_without_prompts_is_refused_naming_it(slide, segmenter, tmp_path):
    line = {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [5, 5]]}, "properties": {}}
    path = tmp_path / "lines.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [line]}))
    with pytest.raises(DataError, match=r"lines\.geojson: no usable prompts"):
        segmenter(slide, tmp_path / "out", prompts_file=path)


def test_a_checkpoint_for_another_base_sam_is_refused_naming_it(slide, tmp_path):
    load_multires(load_sam("tiny", image_size=64, seed=1), "tiny").save(tmp_path / "other.pt")
    with pytest.raises(Exception) as error:
        run(
            "interactive.json",
            common=False,
            image=slide,
            boxes=BOXES[:1],
            checkpoint=str(tmp_path / "other.pt"),
            **TINY_SAM,
        )
    assert "other.pt: a WSI-SAM checkpoint for the base SAM 'tiny'" in user_error(error.value)
    assert np.all([not p.name.startswith("square") for p in tmp_path.iterdir()])
