"""WSI-SAM's model on a tiny random SAM: frozen SAM, only the trainable parts saved, a checkpoint tied to its base SAM,
the HR -> LR prompt mapping, and the LR view read from the real surroundings (slide) or padded (tile)."""

import numpy as np
import pytest
import torch

from scripts.errors import DataError
from scripts.sam.model import load_sam
from scripts.sam.multires import load_multires, trainable_parameters
from scripts.sam.multires_train import MultiResTrainer, component_prompts
from scripts.sam.views import GLASS, ImageSource, Window, map_prompts
from scripts.wsi.pyramid_tiff import write_pyramidal_tiff

torch.set_num_threads(1)


def square_rgb():
    """Glass with a pink tissue block (rows 64-448, cols 128-640) holding a purple square (rows 192-320, cols
    256-384)."""
    rgb = np.full((512, 768, 3), 245, np.uint8)
    rgb[64:448, 128:640] = (230, 150, 190)
    rgb[192:320, 256:384] = (100, 40, 140)
    return rgb


def square_slide(path, mpp=0.5):
    """:func:`square_rgb` as a pyramid (levels 0, 1, 2) with lossless tiles, so the colours are exact."""
    write_pyramidal_tiff(path, square_rgb(), mpp=mpp, compression="lzw", min_size=128)
    return str(path)


def scene():
    """A 64 x 96 image with two dark discs (class 1) on pink (class 0), and its mask."""
    mask = np.zeros((64, 96), np.uint8)
    rows, cols = np.indices(mask.shape)
    for cy, cx, r in ((20, 24, 10), (40, 66, 13)):
        mask[(rows - cy) ** 2 + (cols - cx) ** 2 <= r * r] = 1
    image = np.where(mask[..., None] == 1, [110, 60, 150], [235, 170, 200])
    noise = np.random.default_rng(0).normal(0, 8, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8), mask


def model(seed=0, **kwargs):
    return load_multires(load_sam("tiny", image_size=64, seed=seed), "tiny", **kwargs)


def region_of(m, image):
    window = Window((0.0, 0.0), 1.0, image.shape[:2])
    lr = np.full_like(image, GLASS)
    return m.region(image, window, lr)


def test_a_training_step_changes_the_trainable_parts_only():
    m = model().train()
    image, mask = scene()
    frozen = {k: v.clone() for k, v in m.sam.state_dict().items()}
    before = {k: v.clone() for k, v in m.trainable_state().items()}
    region = region_of(m, image)
    rng = np.random.default_rng(0)
    optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for kind in ("box", "points", "box+points"):  # two steps at least: the MLPs' last layers start at zero
        boxes, points, labels, targets = component_prompts(mask, [1], rng, kind)
        assert len(targets) == 2
        logits = m.sam.to_image(m(region, boxes, points, labels), region.hr.frame)
        target = torch.as_tensor(targets[:, None], dtype=torch.float32)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(frozen[k], v) for k, v in m.sam.state_dict().items()), "the base SAM changed"
    assert not any(p.requires_grad for p in m.sam.parameters())
    assert not m.sam.training  # TinyViT's BatchNorm statistics must not move either
    changed = [k for k, v in m.trainable_state().items() if not torch.equal(before[k], v)]
    assert {k.split(".")[0] for k in changed} == {"tokens", "mlps", "fusion"}


def test_an_untrained_model_gives_about_sams_masks():
    m = model()
    image, _ = scene()
    boxes = np.array([[8, 12, 31, 35], [26, 52, 54, 80]], np.float32)
    ours = m.predict(region_of(m, image), boxes).probs > 0.5
    sams = m.sam.predict(m.sam.embed(image), boxes).probs > 0.5
    assert ours.shape == sams.shape == (2, 64, 96)
    assert (ours != sams).mean() < 0.05  # only the extra token's share of the decoder's attention differs


def test_the_checkpoint_holds_only_the_trainable_parts_and_its_base_sam(tmp_path):
    m = model()
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1)
    m.save(tmp_path / "multires.pt")
    saved = torch.load(tmp_path / "multires.pt", weights_only=True)
    assert saved["base"] == "tiny" and saved["base_hash"] == m.base_hash
    assert not any(k.startswith("sam.") for k in saved["state"])
    assert sum(v.numel() for v in saved["state"].values()) == trainable_parameters(m) > 0
    other = model(checkpoint=tmp_path / "multires.pt")
    image, _ = scene()
    boxes = np.array([[8, 12, 31, 35]], np.float32)
    np.testing.assert_allclose(
        other.predict(region_of(other, image), boxes).probs, m.predict(region_of(m, image), boxes).probs, atol=1e-5
    )


def test_a_checkpoint_of_another_base_sam_is_refused(tmp_path):
    model(seed=0).save(tmp_path / "multires.pt")
    with pytest.raises(DataError, match=r"multires\.pt: a WSI-SAM checkpoint for the base SAM 'tiny'.*trained on"):
        model(seed=1, checkpoint=tmp_path / "multires.pt")


@pytest.mark.parametrize("origin", [(-20.0, 5.0), (100.0, 730.0)])  # past the top border / near the right one
def test_hr_boxes_reach_the_lr_view_at_half_size_plus_an_offset_and_back(origin):
    hr = Window(origin, 1.5, (48, 80))  # not square
    lr = hr.context()
    assert lr.downsample == 3.0 and lr.shape == hr.shape
    np.testing.assert_allclose(lr.centre, hr.centre)
    boxes = np.random.default_rng(0).uniform(0, 47, (20, 4))
    mapped = map_prompts(boxes, hr, lr)
    offset = np.array([48, 80, 48, 80]) / 4 - 0.25  # a quarter of the view per axis, pixel centres to centres
    np.testing.assert_allclose(mapped, boxes / 2 + offset)
    np.testing.assert_allclose(map_prompts(mapped, lr, hr), boxes)
    np.testing.assert_allclose(lr.to_level0(mapped), hr.to_level0(boxes))  # the same level-0 places


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return square_slide(tmp_path_factory.mktemp("slide") / "square.tif", mpp=0.5)


def test_the_lr_view_of_a_slide_holds_the_slide_around_the_hr_region(slide):
    """The HR view covers the purple square (rows 192-320, cols 256-384); its LR view reaches the pink tissue around
    it: slide pixels, not padding."""
    source = ImageSource(slide)
    assert source.size == (512, 768) and source.mpp == pytest.approx(0.5)
    hr = Window((192.0, 256.0), 1.0, (128, 128))
    hr_pixels, lr_pixels = source.read(hr), source.read(hr.context())
    truth = square_rgb()
    assert np.array_equal(hr_pixels, truth[192:320, 256:384])
    reduced = truth[128:384, 192:448].reshape(128, 2, 128, 2, 3).mean((1, 3))
    assert np.abs(lr_pixels.astype(float) - reduced).max() <= 2
    outside = np.ones((128, 128), bool)
    outside[32:96, 32:96] = False  # the HR region inside the LR view
    assert (np.abs(lr_pixels[outside].astype(float) - (230, 150, 190)).max(1) <= 2).mean() > 0.9  # pink tissue


def test_the_lr_view_is_padded_only_past_the_slide_border(slide):
    hr = Window((0.0, 0.0), 1.0, (64, 64))  # the slide's top-left corner: the LR view starts 32 px before it
    lr_pixels = ImageSource(slide).read(hr.context())
    assert (lr_pixels[:16] == GLASS).all() and (lr_pixels[:, :16] == GLASS).all()
    truth = square_rgb()[:96, :96].reshape(48, 2, 48, 2, 3).mean((1, 3))
    assert np.abs(lr_pixels[16:, 16:].astype(float) - truth).max() <= 2


def test_the_lr_view_of_a_tile_is_the_tile_padded_where_it_ends(tmp_path):
    from PIL import Image

    image, _ = scene()
    Image.fromarray(image).save(tmp_path / "tile.png")
    source = ImageSource(tmp_path / "tile.png")
    window = Window((0.0, 0.0), 1.0, source.size)
    lr_pixels = source.read(window.context())
    assert lr_pixels.shape == image.shape
    assert (lr_pixels[:16] == GLASS).all() and (lr_pixels[:, :24] == GLASS).all() and (lr_pixels[-16:] == GLASS).all()
    reduced = image.reshape(32, 2, 48, 2, 3).mean((1, 3))
    assert np.abs(lr_pixels[16:48, 24:72].astype(float) - reduced).max() <= 2


def test_training_prompts_are_noisy_boxes_and_points_of_each_component():
    _, mask = scene()
    rng = np.random.default_rng(0)
    boxes, points, labels, targets = component_prompts(mask, [1], rng, "box+points", box_noise=0.2, n_points=4)
    assert boxes.shape == (2, 4) and points.shape == (2, 4, 2) and (labels == 1).all()
    for box, pts, target in zip(boxes, points, targets):
        rows, cols = np.nonzero(target)
        exact = np.array([rows.min(), cols.min(), rows.max(), cols.max()])
        side = np.array([np.ptp(rows) + 1, np.ptp(cols) + 1] * 2)
        assert (np.abs(box - exact) <= 0.2 * side + 1e-6).all() and not np.allclose(box, exact)
        assert target[tuple(pts.astype(int).T)].all()
    none = component_prompts(mask, [0], rng, "box", min_area=10**6)
    assert none[0].shape == (0, 4) and none[3].shape == (0, 64, 96)


def fit(tmp_path, learning_rate: float) -> tuple[float, float]:
    """:class:`MultiResTrainer` on the scene (its mask as the pseudo-mask, boxes only) for 80 steps; returns the mean
    IoU of the two discs' masks, box-prompted, before and after."""
    from PIL import Image

    image, mask = scene()
    Image.fromarray(image).save(tmp_path / "scene.png")
    Image.fromarray(mask).save(tmp_path / "pseudo.png")
    unit = {
        "name": "scene",
        "image": str(tmp_path / "scene.png"),
        "pseudo": str(tmp_path / "pseudo.png"),
        "label": [1, 1],
    }
    m = model()
    trainer = MultiResTrainer(
        m,
        [unit],
        tmp_path / "multires.pt",
        objects=[1],
        epochs=80,
        learning_rate=learning_rate,
        prompt_types=["box"],
        box_noise=0.0,
        progress_bar=False,
    )
    boxes, _, _, targets = component_prompts(mask, [1], np.random.default_rng(0), "box", box_noise=0.0)

    def iou() -> float:
        masks = m.predict(trainer.region(unit), boxes).probs > 0.5
        return float(np.mean([(a & b).sum() / (a | b).sum() for a, b in zip(masks, targets)]))

    before = iou()
    trainer.run()
    return before, iou()


def test_training_on_pseudo_masks_fits_them(tmp_path):
    before, after = fit(tmp_path, 1e-2)
    assert after > max(before + 0.2, 0.8), (before, after)
    (tmp_path / "lr0").mkdir()
    frozen_before, frozen_after = fit(tmp_path / "lr0", 0.0)
    assert frozen_after == pytest.approx(frozen_before, abs=1e-6)  # learning rate 0: nothing learnt
