"""Learning test of SAM's decoder refinement: :class:`DecoderRefinement` (its own loop, loss and optimiser) fine-tunes a
tiny random SAM's mask decoder on one fixed pseudo-mask and must then fit it; broken on purpose (learning rate 0,
logits detached from the decoder, targets shuffled among the prompts) it must not."""

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from PIL import Image

import scripts.sam.refine
from scripts.sam.embeddings import Embeddings
from scripts.sam.model import load_sam
from scripts.sam.outputs import Outputs
from scripts.sam.refine import DecoderRefinement
from scripts.sam.rules import Rules

torch.set_num_threads(1)
TAGS = np.array([True, True, False])  # stroma and gland; SAM is prompted for the glands only
STEPS = 150  # one image per epoch: one optimiser step each, with all three prompts; under a second on a CPU
LEARNING_RATE = 1e-2  # pseudo_label.json's 1e-4 is for thousands of steps from LiteMedSAM's weights
BREAKS = ("learning rate 0", "logits detached", "targets shuffled")


def scene() -> tuple[np.ndarray, np.ndarray]:
    """A 64-px RGB image and its mask: three glands (discs of radius 9, 7, 11: class 1) in stroma (class 0)."""
    mask = np.zeros((64, 64), np.uint8)
    rows, cols = np.indices(mask.shape)
    for cy, cx, r in ((14, 14, 9), (16, 46, 7), (46, 30, 11)):
        mask[(rows - cy) ** 2 + (cols - cx) ** 2 <= r * r] = 1
    image = np.where(mask[..., None] == 1, [110, 60, 150], [235, 170, 200])
    noise = np.random.default_rng(0).normal(0, 8, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8), mask


def refine(tmp_path, monkeypatch, broken: str | None = None) -> tuple[list[float], np.ndarray]:
    """One refinement round of ``STEPS`` epochs on the scene, its pseudo-mask being the truth; returns the loss of every
    step and, per gland, the IoU of the refined decoder's mask (prompted as in training) with the gland."""
    image, mask = scene()
    out = Outputs(tmp_path)
    Image.fromarray(image).save(tmp_path / "scene.png")
    out.sam("scene", 0).parent.mkdir()
    Image.fromarray(mask).save(out.sam("scene", 0))  # the round-0 pseudo-mask: what round 1 trains on
    out.cam("scene").parent.mkdir()
    np.save(out.cam("scene"), (np.stack([mask == c for c in range(3)]) * 255).astype(np.uint8))  # for regenerating
    item = {"image": str(tmp_path / "scene.png"), "label": TAGS.astype(int).tolist(), "name": "scene"}

    sam = load_sam("tiny", image_size=64, seed=0)
    rules = Rules(
        ids_threshold=0.5,
        confidence=0.0,
        disagreement=0.5,
        box_rule=True,
        prompt_args={"margin": 3, "min_area": 16},
        objects=[1],
    )
    embeddings = Embeddings(sam)
    refinement = DecoderRefinement(
        sam,
        [item],
        tmp_path,
        rules,
        embeddings,
        iterations=1,
        epochs=STEPS,
        learning_rate=0.0 if broken == "learning rate 0" else LEARNING_RATE,
        prompts_per_step=8,
        progress_bar=False,
    )
    if broken == "logits detached":  # the loss as before, but no gradient reaches the decoder
        decode = sam.decode_logits

        def detached(*args, **kwargs):
            logits, iou = decode(*args, **kwargs)
            return logits.detach() + 0 * logits, iou

        sam.decode_logits = detached
    elif broken == "targets shuffled":  # each step gives every prompt the target of another, in a new random order
        targets = refinement._targets

        def shuffled(*args):
            target, valid = targets(*args)
            return target[torch.randperm(len(target))], valid

        refinement._targets = shuffled
    losses = []

    class Recorded(Engine):  # the refinement's own trainer, its step losses recorded
        def __init__(self, step):
            super().__init__(step)
            self.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: losses.append(engine.state.output))

    monkeypatch.setattr(scripts.sam.refine, "Engine", Recorded)
    torch.manual_seed(0)
    refinement.run()

    prompts = rules.mask_prompts("scene", mask, TAGS, 1)  # the prompts the round trained with
    assert len(prompts) == 3
    masks = sam.predict(embeddings(item), prompts.boxes, prompts.points, prompts.labels).probs > 0.5
    rows, cols = np.indices(mask.shape)
    ious = []
    for predicted, (y0, x0, y1, x1) in zip(masks, prompts.boxes):
        gland = (mask == 1) & (rows >= y0) & (rows <= y1) & (cols >= x0) & (cols <= x1)
        ious.append((predicted & gland).sum() / (predicted | gland).sum())
    return losses, np.array(ious)


def learned(losses: list[float], ious: np.ndarray) -> bool:
    """The criterion: the loss fell to at most half its first value and every gland's mask has IoU >= 0.9 (the untrained
    decoder's are below 0.15)."""
    return len(losses) == STEPS and losses[-1] <= losses[0] / 2 and ious.min() >= 0.9


def test_the_decoder_fits_a_fixed_pseudo_mask(tmp_path, monkeypatch):
    losses, ious = refine(tmp_path, monkeypatch)
    assert learned(losses, ious), (losses[0], losses[-1], ious)
    assert (tmp_path / "sam_decoder_iter1.pt").is_file() and (tmp_path / "sam_iter1" / "scene.png").is_file()


@pytest.mark.parametrize("broken", BREAKS)
def test_a_broken_refinement_does_not_fit(tmp_path, monkeypatch, broken):
    losses, ious = refine(tmp_path, monkeypatch, broken)
    assert not learned(losses, ious), (losses[0], losses[-1], ious)
