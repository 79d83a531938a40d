"""Stage-3 datalist views: held-back images, pseudo-mask layers as loader keys, whole images for evaluation."""

import pytest

from scripts.errors import DataError
from scripts.seg.data import hold_out, layer_keys, training_targets, whole_images


def patches(n_images, per_image=3):
    return [
        {
            "image": f"/d/img_{i}.png",
            "mask": f"/d/m_{i}.png",
            "location": [0, 32 * j],
            "size": [32, 32],
            "label": [1, 0],
        }
        for i in range(n_images)
        for j in range(per_image)
    ]


def test_hold_out_keeps_images_whole_and_is_deterministic():
    entries = patches(20)
    kept, held = hold_out(entries, 0.1)
    held_images = {e["image"] for e in held}
    assert len(held_images) == 2 and len(held) == 6
    assert not held_images & {e["image"] for e in kept} and len(kept) + len(held) == len(entries)
    assert hold_out(list(reversed(entries)), 0.1)[1][0]["image"] in held_images  # order does not matter


def test_hold_out_edge_cases():
    assert len({e["image"] for e in hold_out(patches(3), 0.1)[1]}) == 1  # at least one image held back
    assert hold_out(patches(1), 0.5) == (patches(1), [])  # a single image is never held back
    assert hold_out(patches(4), 0) == (patches(4), [])
    with pytest.raises(DataError, match=r"holdout fraction must be in \[0, 1\)"):
        hold_out(patches(4), 1.0)


def test_training_targets_single_and_multi_layer():
    entry = {"image": "a.png", "pseudo": "p.png", "pseudo_layers": ["l0.png", "l1.png", "l2.png"]}
    assert training_targets([entry], 1)[0]["pseudo_0"] == "p.png"
    three = training_targets([entry], 3)[0]
    assert [three[k] for k in layer_keys(3)] == ["l0.png", "l1.png", "l2.png"]
    assert training_targets([{"image": "a.png", "pseudo_layers": ["l0.png"]}], 1)[0]["pseudo_0"] == "l0.png"
    with pytest.raises(DataError, match="a.png: 0 pseudo-mask layer"):
        training_targets([{"image": "a.png"}], 1)
    with pytest.raises(DataError, match="a.png: 3 pseudo-mask layer.*2 layer weight"):
        training_targets([entry], 2)


def test_whole_images_collapse_patches():
    images = whole_images(patches(2) + [{"image": "/e/tile.png", "mask": "/e/tile_mask.png", "label": [1, 1]}])
    assert images == [
        {"image": "/d/img_0.png", "mask": "/d/m_0.png", "name": "img_0"},
        {"image": "/d/img_1.png", "mask": "/d/m_1.png", "name": "img_1"},
        {"image": "/e/tile.png", "mask": "/e/tile_mask.png", "name": "tile"},
    ]


@pytest.mark.parametrize(
    "entries, match",
    [
        ([{"image": "a.png", "label": [1]}], "a.png: no ground-truth 'mask'"),
        ([{"image": "s.tif", "mask": "m.tif", "level": 0, "location": [0, 0], "size": [8, 8]}], "s.tif: a slide patch"),
        ([{"image": "x/a.png", "mask": "m"}, {"image": "y/a.png", "mask": "m"}], "share the name 'a'"),
        ([], "no images to evaluate"),
    ],
)
def test_whole_images_refuses_what_it_cannot_evaluate(entries, match):
    with pytest.raises(DataError, match=match):
        whole_images(entries)
