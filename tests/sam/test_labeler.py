"""Stage 2 end to end on tiny random models: pseudo_label.json through monai.bundle, resume, atomic writes, the
decoder refinement, datalist_pseudo.json, empty CAMs, small images and bad checkpoints."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUNDLE, configs
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.data import load_decathlon_datalist

from scripts.atomic import atomic_output
from scripts.cam.maps import WholeImageCAM
from scripts.cam.net import CAMNet
from scripts.data.demo import prepare_demo
from scripts.errors import DataError
from scripts.images import read_mask
from scripts.sam.embeddings import Embeddings
from scripts.sam.labeler import PseudoLabelHandler
from scripts.sam.masks import save_pseudo_mask
from scripts.sam.model import load_sam
from scripts.sam.outputs import patch_size, pseudo_items, write_pseudo_datalist
from scripts.sam.refine import prompt_agreement
from scripts.sam.rules import Rules, cam_cell, object_classes
from scripts.seg.data import training_targets
from scripts.seg.maps import SegmentationMaps
from scripts.transforms import LoadPatchd

CONFIG = configs("pseudo_label.json")
RULES = {"ids_threshold": 0.9, "confidence": 0.0, "disagreement": 0.5, "box_rule": True}  # EP-SAM's filter
TINY = {
    "sam_backend": "tiny",
    "sam_image_size": 64,
    "cam_input_size": 32,
    "progress_bar": False,
    "refine_iterations": 0,
    "prompts#min_area": 16,
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A 64-px demo (3 training tiles in 32-px patches, 1 validation tile) and a random CAM checkpoint built from
    train_cam.json, as stage 1 would save it."""
    root = tmp_path_factory.mktemp("demo")
    datalist = prepare_demo(
        str(root), n_train=3, n_validation=1, n_test=0, tile_size=64, slide_size=64, patch_size=32, stride=32
    )
    parser = ConfigParser(ConfigParser.load_config_files(configs("train_cam.json")))
    parser.update({"bundle_root": str(BUNDLE), "datalist": datalist, "pretrained": False})
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), root / "cam_best.pt")
    return datalist, root / "cam_best.pt"


def workflow(demo, out, **override):
    torch.set_num_threads(1)
    datalist, checkpoint = demo
    wf = ConfigWorkflow(
        config_file=CONFIG,
        workflow_type=None,
        bundle_root=str(BUNDLE),
        datalist=datalist,
        cam_checkpoint=str(checkpoint),
        output_dir=str(out),
        **{**TINY, **override},
    )
    wf.initialize()
    return wf


def outputs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_one_refinement_round_through_monai_bundle(demo, tmp_path):
    wf = workflow(demo, tmp_path, refine_iterations=1)
    wf.run()
    sam, fresh = wf.parser.get_parsed_content("sam"), load_sam("tiny", image_size=64, seed=0)
    for part in ("image_encoder", "prompt_encoder"):
        before, after = getattr(fresh, part).state_dict(), getattr(sam, part).state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), f"{part} changed"
        assert not any(p.requires_grad for p in getattr(sam, part).parameters())
    saved = torch.load(tmp_path / "sam_decoder_iter1.pt", weights_only=True)
    assert saved.keys() == fresh.mask_decoder.state_dict().keys()  # the decoder only
    assert any(not torch.equal(saved[k], fresh.mask_decoder.state_dict()[k]) for k in saved)
    assert all(torch.equal(saved[k], v) for k, v in sam.mask_decoder.state_dict().items())

    data = json.loads((tmp_path / "datalist_pseudo.json").read_text())
    source = json.loads(Path(demo[0]).read_text())
    assert data["classes"] == source["classes"]
    assert load_decathlon_datalist(
        str(tmp_path / "datalist_pseudo.json"), False, "validation"
    ) == load_decathlon_datalist(demo[0], False, "validation")  # other splits kept, paths re-based
    assert len(data["training"]) == len(source["training"])
    for entry in data["training"]:
        assert entry["pseudo"].startswith("sam_iter1/") and len(entry["pseudo_layers"]) == 3
        assert all(p.startswith("cam_layers/") for p in entry["pseudo_layers"])
    loaded = load_decathlon_datalist(str(tmp_path / "datalist_pseudo.json"), False, "training")
    for entry in loaded:
        assert Path(entry["image"]).is_file() and all(
            Path(p).is_file() for p in [entry["pseudo"], *entry["pseudo_layers"]]
        )
        pseudo, tags = read_mask(entry["pseudo"]), np.flatnonzero(entry["label"])
        assert pseudo.shape == (64, 64)  # full-image masks, cropped per patch by the segmentation stage
    tile_tags = {}
    for entry in loaded:
        tile_tags.setdefault(entry["pseudo"], set()).update(np.flatnonzero(entry["label"]))
    for path, tags in tile_tags.items():
        assert set(np.unique(read_mask(path))) <= tags | {255}  # untagged classes never appear

    # what stage 3 reads: three layers through seg_data, a patch crop through LoadPatchd
    target = LoadPatchd(keys=["pseudo_0"], mask_keys=["pseudo_0"])(training_targets(loaded, 3)[1])["pseudo_0"]
    assert target.shape == (1, 32, 32)


def test_refine_select_agreement_points_the_datalist_at_the_round_that_agrees_best(demo, tmp_path):
    workflow(demo, tmp_path, refine_iterations=2, refine_select="agreement").run()
    kept = int(np.nanargmax(prompt_agreement(tmp_path, pseudo_items(demo[0]), 2)))
    data = json.loads((tmp_path / "datalist_pseudo.json").read_text())
    assert all(entry["pseudo"].startswith(f"sam_iter{kept}/") for entry in data["training"])


def test_resume_after_interruption_is_identical_and_leaves_no_partial_files(demo, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    workflow(demo, reference).run()

    resumed = tmp_path / "resumed"
    save, calls = save_pseudo_mask, []

    def killed_on_the_sixth_mask(path, mask):  # image 1: 3 layers + SAM; image 2 dies writing its 2nd layer
        calls.append(path)
        if len(calls) == 6:
            with atomic_output(path) as tmp:
                tmp.write_bytes(b"half a PNG")
                raise RuntimeError("killed")
        save(path, mask)

    monkeypatch.setattr("scripts.sam.labeler.save_pseudo_mask", killed_on_the_sixth_mask)
    with pytest.raises(RuntimeError) as info:  # monai.bundle wraps the error of the expression it evaluated
        workflow(demo, resumed).run()
    assert "killed" in str(info.value.__cause__)
    monkeypatch.setattr("scripts.sam.labeler.save_pseudo_mask", save)
    assert not list(resumed.rglob("*.tmp*")) and not (resumed / "datalist_pseudo.json").exists()
    assert len(list((resumed / "sam_iter0").iterdir())) == 1

    labelled = []
    label = PseudoLabelHandler.label
    monkeypatch.setattr(
        PseudoLabelHandler, "label", lambda self, name, *a: labelled.append(name) or label(self, name, *a)
    )
    workflow(demo, resumed).run()
    assert labelled == ["training_001", "training_002"]  # only the missing images
    assert outputs(resumed).keys() == outputs(reference).keys()
    for name, content in outputs(reference).items():
        if name != "datalist_pseudo.json":
            assert outputs(resumed)[name] == content, name
    assert json.loads((resumed / "datalist_pseudo.json").read_text()) == json.loads(
        (reference / "datalist_pseudo.json").read_text()
    )


def test_an_interrupted_refinement_loads_its_saved_decoder_and_writes_only_missing_masks(demo, tmp_path):
    workflow(demo, tmp_path, refine_iterations=1).run()
    decoder = tmp_path / "sam_decoder_iter1.pt"
    before, saved_at = outputs(tmp_path), decoder.stat().st_mtime_ns
    (tmp_path / "sam_iter1" / "training_002.png").unlink()
    (tmp_path / "datalist_pseudo.json").unlink()
    workflow(demo, tmp_path, refine_iterations=1).run()
    assert decoder.stat().st_mtime_ns == saved_at  # loaded, not trained again
    assert outputs(tmp_path) == before


@pytest.fixture(scope="module")
def handler(tmp_path_factory):
    sam = load_sam("tiny", image_size=64)
    return PseudoLabelHandler(
        [], tmp_path_factory.mktemp("out"), sam, Rules(**RULES, prompt_args={"min_area": 4}), 2, Embeddings(sam)
    )


def test_empty_cam_gives_an_ignore_mask(handler):
    image = np.full((40, 50, 3), 200, np.uint8)
    handler.label("blank", image, np.zeros((2, 2, 40, 50), np.float32), np.array([True, True]))
    assert (read_mask(handler.out.sam("blank", 0)) == 255).all()
    assert all((read_mask(handler.out.layer("blank", i)) == 255).all() for i in range(2))


def test_image_smaller_than_the_sam_input(handler):
    image = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    cams = np.zeros((2, 2, 20, 30), np.float32)
    cams[:, 1, 5:15, 5:20] = 1.0
    cams[:, 0] = 1 - cams[:, 1]
    handler.label("small", image, cams, np.array([True, True]))
    mask = read_mask(handler.out.sam("small", 0))
    assert mask.shape == (20, 30) and set(np.unique(mask)) <= {0, 1, 255}


def test_whole_image_cam_on_an_image_smaller_than_the_window():
    network = CAMNet(3, pretrained=False).eval()
    cam = WholeImageCAM(["classifier", "backbone.blocks.5"], 32, (0.5,) * 3, (0.25,) * 3, window=32)
    maps = cam(torch.randint(0, 255, (1, 3, 20, 24), dtype=torch.uint8), network)
    assert maps.shape == (1, 2, 3, 20, 24) and maps.min() >= 0 and maps.max() <= 1


def test_items_group_patches_into_images(tmp_path):
    entries = [
        {"image": "a/x.png", "location": [0, 0], "size": [8, 8], "label": [1, 0]},
        {"image": "a/x.png", "location": [0, 8], "size": [8, 8], "label": [0, 1]},
        {"image": "b/x.png", "label": [1, 0]},
        {"image": "s.tif", "level": 0, "location": [16, 32], "size": [8, 8], "label": [0, 1]},
    ]
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"classes": ["a", "b"], "training": entries}))
    items = pseudo_items(path)
    assert [i["label"] for i in items] == [[1, 1], [1, 0], [0, 1]]
    assert (
        items[0]["name"].startswith("x_") and items[1]["name"].startswith("x_") and items[0]["name"] != items[1]["name"]
    )
    assert items[2]["name"] == "s_l0_y16_x32" and items[2]["location"] == [16, 32] and "location" not in items[0]
    assert patch_size(path) == 8
    path.write_text(json.dumps({"classes": ["a", "b"], "training": [*entries, {**entries[0], "size": [8, 16]}]}))
    with pytest.raises(DataError, match=r"patches have sizes \[\(8, 8\), \(8, 16\)\]"):
        patch_size(path)


def test_datalist_is_not_written_before_the_masks(demo, tmp_path):
    with pytest.raises(DataError, match="training_000.png: pseudo-mask"):
        write_pseudo_datalist(demo[0], tmp_path, 0, 3)
    assert not (tmp_path / "datalist_pseudo.json").exists()


def test_sam_classes_pick_the_prompted_classes_in_both_passes(demo, tmp_path):
    rules = workflow(demo, tmp_path, sam_classes=["gland"]).parser.get_parsed_content("rules")
    assert rules.objects == [1]
    assert rules.prompt_args["min_distance"] is None  # default: one prompt per CAM component, no watershed split
    assert workflow(demo, tmp_path).parser.get_parsed_content("rules").objects is None  # default: every class
    cams = np.zeros((3, 48, 48), np.float32)
    cams[1, 8:40, 8:40] = np.hanning(32)[:, None] * np.hanning(32)[None]  # one gland
    cams[0] = 1 - cams[1]  # stroma all around it
    pseudo = np.where(cams[1] > cams[0], 1, 0).astype(np.uint8)
    tags = np.array([True, True, False])
    for objects, classes in ((None, {0, 1}), ([1], {1})):
        r = Rules(**RULES, prompt_args={"min_area": 4, "min_distance": 8}, objects=objects)
        assert set(r.prompts("x", cams, tags).classes.tolist()) == classes  # CAM prompts, first pass and rounds
        assert set(r.mask_prompts("x", pseudo, tags, 1).classes.tolist()) == classes  # the decoder's training prompts
    with pytest.raises(DataError, match=r"sam_classes \['tumour'\] are not among"):
        object_classes(["stroma", "gland"], ["gland", "tumour"])


def test_cam_cell_follows_the_scale_the_cam_reads_the_image_at():
    assert cam_cell(16, 112, 112) == 16 and cam_cell(16, 448, 224) == 32 and cam_cell(32, None, 224) == 32


def test_segmentation_maps_are_one_layer_of_class_probabilities_from_0_1_inputs():
    seen = []

    def network(x):
        seen.append(float(x.max()))
        return torch.stack([x[:, 0], 1 - x[:, 0]], 1) * 4  # class 0 where the red channel is bright

    image = torch.zeros(1, 3, 40, 56)
    image[:, 0, :, :20] = 255
    maps = SegmentationMaps(roi_size=16)(image, network)
    assert maps.shape == (1, 1, 2, 40, 56) and max(seen) <= 1.0
    torch.testing.assert_close(maps.sum(2), torch.ones(1, 1, 40, 56))
    assert maps[0, 0, 0, :, :10].min() > 0.98 and maps[0, 0, 1, :, 30:].min() > 0.98  # softmax(4, 0)
    # a network blind to the right half of each window: averaged over flips, the maps of a mirrored image are the
    # mirrored maps (the window grid is symmetric here); without TTA they are not
    half = lambda x: torch.cat([network(x)[..., :8], torch.zeros_like(network(x)[..., 8:])], -1)  # noqa: E731
    image = torch.rand(1, 3, 40, 56) * 255
    for tta, equivariant in (("none", False), ("flip", True)):
        maps = SegmentationMaps(16, tta=tta)
        assert torch.allclose(maps(image.flip(-1), half), maps(image, half).flip(-1), atol=1e-5) == equivariant
    with pytest.raises(DataError, match="unknown tta"):
        SegmentationMaps(16, tta="rot45")
