"""Pseudo-masks: the IDS filter, fusion rules, the MLPS CAM-only path and writing."""

import numpy as np
import pytest

from scripts.errors import DataError
from scripts.images import read_mask
from scripts.sam.masks import IGNORE, cam_pseudo_mask, fuse, inside_degree, sam_pseudo_mask, save_pseudo_mask


def box_mask(shape, y0, x0, y1, x1):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_inside_degree():
    region = box_mask((10, 10), 0, 0, 10, 5)
    masks = np.stack([box_mask((10, 10), 0, 0, 10, 5), box_mask((10, 10), 0, 0, 10, 10), np.zeros((10, 10), bool)])
    np.testing.assert_allclose(inside_degree(masks, region), [1.0, 0.5, 0.0])
    np.testing.assert_allclose(inside_degree(masks, np.stack([region, ~region, region])), [1.0, 0.5, 0.0])


def test_ids_filter_keeps_masks_inside_their_class_region():
    cams = np.zeros((2, 20, 20), np.float32)
    cams[1, 5:15, 5:15] = 0.9
    cams[0] = 1 - cams[1]
    inside = box_mask((20, 20), 6, 6, 14, 14)
    spills = box_mask((20, 20), 0, 0, 20, 12)  # mostly outside the gland CAM
    nearly = box_mask((20, 20), 5, 5, 16, 15)  # 100 of 110 pixels inside: IDS 0.909
    mask, keep = sam_pseudo_mask(
        np.stack([inside, spills, nearly]),
        [1, 1, 1],
        cams,
        [1, 1],
        cam_threshold=0.5,
        ids_threshold=0.9,
        disagreement=0.5,
        confidence=0.5,
    )
    assert keep.tolist() == [True, False, True]
    assert (mask[6:14, 6:14] == 1).all()
    assert sam_pseudo_mask(
        np.stack([nearly]), [1], cams, [1, 1], ids_threshold=0.95, cam_threshold=0.5, disagreement=0.5, confidence=0.5
    )[1].tolist() == [False]


def test_overlaps_are_resolved_by_cam_score():
    cams = np.zeros((3, 10, 10), np.float32)
    cams[1, :, :5], cams[1, :, 5:] = 0.9, 0.6
    cams[2, :, :5], cams[2, :, 5:] = 0.6, 0.9
    out = fuse(np.ones((2, 10, 10), bool), [1, 2], cams, [0, 1, 1])
    assert (out[:, :5] == 1).all() and (out[:, 5:] == 2).all()


def test_untagged_classes_never_appear():
    cams = np.full((3, 8, 8), 0.9, np.float32)
    cams[2] = 1.0  # the strongest CAM, but the image is not tagged with class 2
    out = fuse(np.ones((2, 8, 8), bool), [2, 1], cams, [1, 1, 0])
    assert set(np.unique(out)) == {1}
    assert 2 not in cam_pseudo_mask(cams, [1, 1, 0])
    _, keep = sam_pseudo_mask(
        np.ones((1, 8, 8), bool),
        [2],
        cams,
        [1, 1, 0],
        cam_threshold=0.5,
        ids_threshold=0.9,
        disagreement=0.5,
        confidence=0.5,
    )
    assert keep.tolist() == [False]


def test_strong_disagreement_and_unsure_uncovered_pixels_are_ignored():
    cams = np.zeros((2, 10, 10), np.float32)
    cams[1, :, :4] = 0.9  # gland CAM agrees with the SAM mask here
    cams[0, :, 4:7] = 0.8  # the stroma CAM claims these columns the SAM mask covers
    cams[0, :, 7:] = 0.3  # uncovered and unsure
    cams[0, :, 9:] = 0.7  # uncovered and sure
    out = fuse(box_mask((10, 10), 0, 0, 10, 7)[None], [1], cams, [1, 1], disagreement=0.5, confidence=0.5)
    assert (out[:, :4] == 1).all() and (out[:, 4:7] == IGNORE).all()
    assert (out[:, 7:9] == IGNORE).all() and (out[:, 9:] == 0).all()
    lenient = fuse(box_mask((10, 10), 0, 0, 10, 7)[None], [1], cams, [1, 1], disagreement=0.9)
    assert (lenient[:, 4:7] == 1).all()


def test_inside_its_box_sam_draws_the_boundary():
    cams = np.zeros((3, 10, 12), np.float32)
    cams[1, 1:9, 1:9] = 0.9  # a blurry gland CAM, wider than the gland SAM finds
    cams[0, 1:9, 1:3] = 0.2  # stroma has some evidence at the blob's left edge, none on the right
    cams[1, :, 10:] = 0.9  # a gland the CAM sees outside every box: it stays
    sam = box_mask((10, 12), 3, 3, 7, 7)[None]
    box = [[1, 1, 8, 8]]
    out = fuse(sam, [1], cams, [1, 1, 0], boxes=box)
    assert (out[3:7, 3:7] == 1).all() and (out[:, 10:] == 1).all()
    assert (out[1:9, 1:3] == 0).all()  # outside the mask, inside the box: the other tagged class
    assert (out[1:3, 3:9] == 0).all()  # the only other tagged class, even with no CAM
    assert (fuse(sam, [1], cams, [1, 1, 1], boxes=box)[1:3, 3:9] == IGNORE).all()  # several others, no CAM: unsure
    assert (fuse(sam, [1], cams, [0, 1, 0], boxes=box)[1:3, 3:9] == IGNORE).all()  # no other tagged class
    assert (fuse(sam, [1], cams, [1, 1, 0])[1:9, 1:9] == 1).all()  # without boxes the CAM keeps its blob
    masks, keep = sam_pseudo_mask(
        np.concatenate([sam, ~sam]),
        [1, 1],
        cams,
        [1, 1, 0],
        boxes=box * 2,
        cam_threshold=0.5,
        ids_threshold=0.9,
        disagreement=0.5,
        confidence=0.5,
    )
    assert keep.tolist() == [True, False] and (masks[1:3, 3:9] == 0).all()  # a rejected mask's box changes nothing


@pytest.mark.parametrize("cams", [np.zeros((2, 12, 9)), np.full((2, 12, 9), np.nan)])
def test_a_cam_without_foreground_gives_an_all_ignore_mask(cams):
    masks = np.ones((1, 12, 9), bool)
    for out in (
        sam_pseudo_mask(
            masks, [1], cams, [1, 1], cam_threshold=0.5, ids_threshold=0.9, disagreement=0.5, confidence=0.5
        )[0],
        cam_pseudo_mask(cams, [1, 1]),
    ):
        assert out.dtype == np.uint8 and out.shape == (12, 9) and (out == IGNORE).all()
    assert (fuse(np.zeros((0, 12, 9), bool), [], np.ones((2, 12, 9)), [0, 0]) == IGNORE).all()


def test_mlps_one_map_per_layer():
    layers = np.random.default_rng(0).uniform(0, 1, (3, 4, 16, 16)).astype(np.float32)
    maps = cam_pseudo_mask(layers, [1, 0, 1, 1], confidence=0.4)
    assert maps.shape == (3, 16, 16) and set(np.unique(maps)) <= {0, 2, 3, IGNORE}
    for layer, m in zip(layers, maps):
        np.testing.assert_array_equal(m, cam_pseudo_mask(layer, [1, 0, 1, 1], confidence=0.4))


def test_save_pseudo_mask(tmp_path):
    mask = np.array([[0, 1], [255, 3]], np.uint8)
    save_pseudo_mask(tmp_path / "a" / "m.png", mask)
    np.testing.assert_array_equal(read_mask(tmp_path / "a" / "m.png"), mask)
    with pytest.raises(DataError, match="bad.png: .*uint8"):
        save_pseudo_mask(tmp_path / "bad.png", mask.astype(np.int64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_bad_shapes_are_refused():
    with pytest.raises(DataError, match="tags"):
        cam_pseudo_mask(np.zeros((2, 4, 4)), [1, 1, 1])


def test_one_mask_per_object_and_an_unprompted_background_class():
    """Binary gland task, prompts for glands only: each gland's kept mask draws its outline inside its own box;
    stroma (never prompted) takes the rest where its CAM wins; a rejected gland mask leaves the CAM's blob."""
    cams = np.zeros((2, 20, 40), np.float32)
    cams[1, 2:18, 2:18] = cams[1, 2:18, 22:38] = 0.9  # two glands, two CAM blobs
    cams[0] = 1 - cams[1]
    kept = box_mask((20, 40), 4, 4, 16, 16)  # SAM's outline of the left gland, tighter than the blurry CAM
    spills = box_mask((20, 40), 0, 20, 20, 40)  # SAM's mask of the right gland leaks into stroma: IDS 0.64
    boxes = [[2, 2, 17, 17], [2, 22, 17, 37]]
    out, keep = sam_pseudo_mask(
        np.stack([kept, spills]),
        [1, 1],
        cams,
        [1, 1],
        boxes=boxes,
        cam_threshold=0.5,
        ids_threshold=0.9,
        disagreement=0.5,
        confidence=0.5,
    )
    assert keep.tolist() == [True, False]
    assert (out[kept] == 1).all() and (out[2:18, 2:18][~kept[2:18, 2:18]] == 0).all()
    assert (out[2:18, 22:38] == 1).all()  # the rejected mask's box has no say: the CAM keeps that gland
    assert (out[:, 18:22] == 0).all() and (out[0:2] == 0).all()  # stroma wherever no gland is
