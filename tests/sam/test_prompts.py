"""Prompts from CAMs: objects (components, or watershed instances from CAM peaks) -> boxes, positive points at the
peak and CAM-weighted, negatives from other classes; only object classes are prompted."""

import numpy as np
import pytest
from skimage.draw import disk

from scripts.errors import DataError
from scripts.sam.prompts import cam_prompts, instances


def blobs(shape, centres, radius, value=1.0):
    cam = np.zeros(shape, np.float32)
    for c in centres:
        cam[disk(c, radius, shape=shape)] = value
    return cam


def cones(shape, centres, radius):
    """A CAM that peaks at each centre and falls off linearly, like a blurred object; touching where they overlap."""
    rows, cols = np.indices(shape)
    return np.max([np.clip(1 - np.hypot(rows - y, cols - x) / radius, 0, None) for y, x in centres], 0).astype(
        np.float32
    )


def test_no_component_gives_empty_prompts_of_the_right_shapes():
    cases = [(np.zeros((2, 40, 50)), [1, 1]), (np.full((2, 40, 50), np.nan), [1, 1]), (np.ones((2, 40, 50)), [0, 0])]
    for cams, tags in cases:
        p = cam_prompts(cams, tags)
        assert len(p) == 0 and p.boxes.shape == (0, 4) and p.points.shape[::2] == (0, 2) and p.classes.shape == (0,)


def test_one_component_gives_its_box_with_margin_and_points_inside():
    cam = blobs((60, 80), [(30, 40)], 10) * np.linspace(0.8, 1, 80)
    p = cam_prompts(cam[None], [1], margin=3, n_positive=4, n_negative=2)
    assert len(p) == 1 and p.classes.tolist() == [0]
    rows, cols = np.nonzero(cam)
    np.testing.assert_array_equal(p.boxes[0], [rows.min() - 3, cols.min() - 3, rows.max() + 3, cols.max() + 3])
    positives = p.points[0][p.labels[0] == 1].astype(int)
    assert len(positives) == 4 and cam[positives[:, 0], positives[:, 1]].all()
    assert (p.labels[0] != 0).all()  # a single class has no "other class" for negatives


def test_boxes_are_clipped_to_the_image():
    cam = np.zeros((30, 30), np.float32)
    cam[0:5, 20:28] = 1
    p = cam_prompts(cam[None], [1], margin=10, min_area=1)
    np.testing.assert_array_equal(p.boxes[0], [0, 10, 14, 29])


def test_many_components_tiny_ones_dropped_strongest_first():
    cam = blobs((100, 100), [(20, 20), (70, 70)], 8, 0.7) + blobs((100, 100), [(20, 75)], 12, 0.9)
    cam[90, 5] = 1.0  # a one-pixel speckle
    p = cam_prompts(cam[None], [1], min_area=10)
    y0, x0, y1, x1 = p.boxes[0]
    assert len(p) == 3 and y0 < 20 < y1 and x0 < 75 < x1  # the biggest, brightest blob comes first
    assert len(cam_prompts(cam[None], [1], min_area=1)) == 4
    assert len(cam_prompts(cam[None], [1], min_area=10, max_components=2)) == 2


def test_points_follow_the_cam_and_padding_is_marked():
    cam = np.zeros((40, 40), np.float32)
    cam[10:30, 10:20] = 1.0
    cam[10:30, 20:30] = 0.5  # as many pixels as the left half, half the CAM: half as likely
    cam[33:36, 33:36] = 0.6  # 9 pixels: fewer than the points asked for
    p = cam_prompts(cam[None], [1], n_positive=12, min_area=1, rng=1)
    counts = (p.labels == 1).sum(axis=1)
    assert counts.tolist() == [12, 9] and (p.labels[1, 9:] == -1).all()
    left = [cam_prompts(cam[None], [1], n_positive=1, rng=s).points[0, 0, 1] < 20 for s in range(300)]
    assert np.mean(left) > 0.55  # 2/3 expected; uniform sampling would give 1/2


def test_negatives_come_from_other_tagged_classes_inside_the_box():
    gland = blobs((80, 80), [(40, 40)], 15)
    stroma = 1 - gland
    stroma[:, 70:] = 0.0  # a far stroma strip outside the gland's box carries no negatives
    untagged = np.ones_like(gland)
    p = cam_prompts(np.stack([stroma, gland, untagged]), [1, 1, 0], n_positive=2, n_negative=5, margin=4)
    assert set(p.classes.tolist()) == {0, 1}  # the untagged class gets no prompts
    (i,) = np.flatnonzero(p.classes == 1)
    negatives = p.points[i][p.labels[i] == 0].astype(int)
    y0, x0, y1, x1 = p.boxes[i]
    assert len(negatives) == 5 and (stroma[negatives[:, 0], negatives[:, 1]] >= 0.5).all()
    assert ((negatives >= [y0, x0]) & (negatives <= [y1, x1])).all()


def test_four_classes_and_determinism():
    rng = np.random.default_rng(0)
    cams = np.stack([blobs((64, 64), rng.integers(8, 56, (3, 2)), 6) * rng.uniform(0.6, 1) for _ in range(4)])
    a = cam_prompts(cams, [1, 0, 1, 1], n_positive=3, n_negative=3, min_area=20, rng=5)
    b = cam_prompts(cams, [1, 0, 1, 1], n_positive=3, n_negative=3, min_area=20, rng=np.random.default_rng(5))
    c = cam_prompts(cams, [1, 0, 1, 1], n_positive=3, n_negative=3, min_area=20, rng=6)
    assert len(a) > 3 and 1 not in a.classes
    assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("boxes", "points", "labels", "classes"))
    assert not np.array_equal(a.points, c.points)


def test_touching_objects_with_two_peaks_give_two_prompts():
    cam = cones((60, 100), [(30, 30), (30, 64)], 24)  # one connected blob, two peaks 34 px apart
    assert len(cam_prompts(cam[None], [1], threshold=0.2, min_area=10)) == 1  # components merge them
    p = cam_prompts(cam[None], [1], threshold=0.2, min_area=10, margin=0, n_positive=3, min_distance=16)
    assert len(p) == 2
    peaks = sorted(map(tuple, p.points[:, 0].astype(int).tolist()))
    assert peaks == [(30, 30), (30, 64)]  # the first positive point is the object's peak
    for box, points, labels in zip(p.boxes, p.points, p.labels):
        y0, x0, y1, x1 = box
        assert len([x for _, x in peaks if x0 <= x <= x1]) == 1  # each box holds one of the objects, not both
        assert len({tuple(q) for q in points[labels == 1].tolist()}) == 3  # the peak is not drawn again
    assert len(cam_prompts(cam[None], [1], threshold=0.2, min_area=10, min_distance=40)) == 1  # peaks too close


def test_instances_cover_the_region_and_a_flat_component_keeps_one_peak():
    cam = cones((60, 100), [(30, 30), (30, 64)], 24)
    region = cam >= 0.2
    labels, peaks = instances(cam, region, 16)
    assert labels.max() == 2 and ((labels > 0) == region).all()
    assert [labels[tuple(q)] for q in peaks] == [1, 2]
    flat = np.ones((20, 30), np.float32)  # no local maximum stands out: the whole image is one object
    labels, peaks = instances(flat, flat > 0, 8)
    assert labels.max() == 1 and (labels == 1).all() and len(peaks) == 1
    labels, peaks = instances(cam, region, None)
    assert labels.max() == 1 and peaks is None


def test_only_object_classes_are_prompted_and_background_gives_negatives():
    gland = cones((80, 80), [(40, 40)], 20)
    stroma = 1 - gland  # background-like: everywhere the gland is not
    p = cam_prompts(np.stack([stroma, gland]), [1, 1], n_negative=3, objects=[1])
    assert p.classes.tolist() == [1]  # no whole-image box for stroma
    negatives = p.points[0][p.labels[0] == 0].astype(int)
    rows, cols = negatives.T
    assert len(negatives) == 3 and (stroma[rows, cols] > gland[rows, cols]).all()
    assert set(cam_prompts(np.stack([stroma, gland]), [1, 1]).classes.tolist()) == {0, 1}  # objects=None: every class
    assert len(cam_prompts(np.stack([stroma, gland]), [1, 0], objects=[1])) == 0  # an untagged object class: nothing


@pytest.mark.parametrize("shape,tags,threshold", [((2, 5, 5), [1], 0.5), ((5, 5), [1], 0.5), ((1, 5, 5), [1], 0.0)])
def test_bad_arguments_are_refused(shape, tags, threshold):
    with pytest.raises(DataError):
        cam_prompts(np.zeros(shape), tags, threshold=threshold)
