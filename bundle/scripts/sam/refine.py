"""EP-SAM's rounds of fine-tuning SAM's mask decoder on its own pseudo-masks."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine
from ignite.handlers import ProgressBar
from monai.losses import DiceLoss

from ..atomic import atomic_output
from ..checkpoints import read_state
from ..errors import DataError
from ..images import read_mask
from ..seg.metrics import confusion_matrix, present_mean, scores
from .embeddings import Embeddings
from .labeler import load_cams
from .masks import IGNORE, save_pseudo_mask
from .model import SegmentAnything
from .outputs import Outputs
from .prompts import Prompts
from .rules import Rules

logger = logging.getLogger(__name__)

SELECTIONS = ("last", "agreement")


def prompt_agreement(output_dir: str | os.PathLike, items: Sequence[dict], rounds: int) -> list[float]:
    """Per decoder round 0..``rounds``, the mIoU of its pseudo-masks against layer 0's mask (the prompt source's own:
    the first CAM layer, the MIL map, or the previous round's network) over the pixels the source labels, where the
    round leaving a pixel out (255) counts as a miss: otherwise a round could score higher by labelling less. No
    ground truth is in it: it says how far each round has drifted from the evidence its prompts came from."""
    out, n = Outputs(output_dir), len(items[0]["label"])
    counts = np.zeros((rounds + 1, n + 1, n + 1), np.int64)  # class n: the round left the pixel out
    for item in items:
        source = read_mask(out.layer(item["name"], 0))
        labelled = source != IGNORE
        for k in range(rounds + 1):
            mask = read_mask(out.sam(item["name"], k))[labelled]
            counts[k] += confusion_matrix(np.where(mask == IGNORE, n, mask), source[labelled], n + 1)
    return [present_mean(scores(cm)["iou"][:n]) for cm in counts]


def fit_prompts(loss_of, optimizer, data: list, epochs: int, seed: int, sam: SegmentAnything, progress_bar: bool):
    """Train on prompted samples with ignite: ``data`` shuffled per epoch (by ``seed``), one optimizer step per
    sample on ``loss_of(engine, sample)`` (None: nothing to learn from it), SAM's autocast off meanwhile (fp16
    gradients would need a GradScaler; the trained parts are small). Shared by the decoder refinement and WSI-SAM.
    Returns the last loss."""

    def step(engine: Engine, sample) -> float:
        loss = loss_of(engine, sample)
        if loss is None:
            return float("nan")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    trainer = Engine(step)
    if progress_bar:
        ProgressBar(persist=False).attach(trainer, output_transform=lambda loss: {"loss": loss})
    order = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=True, generator=order, collate_fn=lambda x: x)
    amp, sam.amp = sam.amp, False
    try:
        trainer.run(loader, max_epochs=epochs)
    finally:
        sam.amp = amp
    return trainer.state.output


class DecoderRefinement:
    """EP-SAM's iterative refinement: ``iterations`` rounds of (fine-tune SAM's mask decoder on the current
    pseudo-masks, prompted with boxes and points from their components; regenerate the masks from the CAM prompts).

    The image and prompt encoders stay frozen (their outputs do not depend on the decoder), so the cached embeddings
    serve every round. Loss: soft Dice + binary cross-entropy of each prompt's mask against the pixels of its class
    inside its box, ignore pixels excluded. Each round's decoder is saved; a finished round is loaded, not retrained.

    Args:
        sam: the SAM model; its mask decoder is fine-tuned in place.
        items: the units of work (:func:`scripts.sam.outputs.pseudo_items`).
        output_dir: the stage's output folder: round k trains on round k-1's masks and writes its own and its decoder.
        rules: the prompt and fusion rules (and seed) of the first pass.
        embeddings: the SAM embedding cache of the first pass.
        iterations: rounds to run, >= 0 (0: the first pass's masks are final).
        epochs: passes over the images per round, >= 1.
        learning_rate: AdamW learning rate of the mask decoder.
        prompts_per_step: prompts sampled from an image per optimiser step, >= 1.
        progress_bar: show a progress bar during each round's training.
        select: whose masks are final: ``"last"`` round's, or the round (0 included) whose masks agree best with
            their prompt source (:func:`prompt_agreement`): the rounds fine-tune on their own output and can drift.
    """

    def __init__(
        self,
        sam: SegmentAnything,
        items: Sequence[dict],
        output_dir: str | os.PathLike,
        rules: Rules,
        embeddings: Embeddings,
        iterations: int,
        epochs: int,
        learning_rate: float,
        prompts_per_step: int,
        progress_bar: bool = True,
        select: str = "last",
    ):
        if select not in SELECTIONS:
            raise DataError(f"refine_select {select!r} is unknown; use one of {SELECTIONS}")
        if iterations < 0 or epochs < 1 or prompts_per_step < 1:
            raise DataError(
                f"refinement needs iterations >= 0, epochs >= 1, prompts_per_step >= 1; got {iterations}, "
                f"{epochs}, {prompts_per_step}"
            )
        self.sam, self.items, self.out, self.rules, self.embeddings = (
            sam,
            list(items),
            Outputs(output_dir),
            rules,
            embeddings,
        )
        self.iterations, self.epochs, self.lr, self.per_step = iterations, epochs, learning_rate, prompts_per_step
        self.progress_bar, self.select = progress_bar, select
        self.dice = DiceLoss(reduction="mean")

    def run(self) -> int:
        """Runs the missing rounds; returns the round whose masks are the final pseudo-masks (``select``)."""
        for frozen in (self.sam.image_encoder, self.sam.prompt_encoder):
            frozen.requires_grad_(False)
        for k in range(1, self.iterations + 1):
            path = self.out.decoder(k)
            if path.exists():
                self.sam.mask_decoder.load_state_dict(read_state(path, f"SAM mask decoder of round {k}"))
            else:
                self._fine_tune(k)
                with atomic_output(path) as tmp:
                    torch.save(self.sam.mask_decoder.state_dict(), tmp)
            self._regenerate(k)
        if self.select == "last":
            return self.iterations
        agreement = prompt_agreement(self.out.root, self.items, self.iterations)
        if np.isnan(agreement).all():
            logger.warning("no decoder round labels a pixel its prompt source labels: the last round is kept")
            return self.iterations
        best = int(np.nanargmax(agreement))
        logger.info(f"decoder rounds agree with their prompts {np.round(agreement, 4).tolist()}: round {best} kept")
        return best

    def _fine_tune(self, k: int) -> None:
        data = []
        for item in self.items:
            pseudo, tags = read_mask(self.out.sam(item["name"], k - 1)), np.asarray(item["label"], bool)
            prompts = self.rules.mask_prompts(item["name"], pseudo, tags, k)
            if len(prompts):
                data.append((item, pseudo, prompts))
        if not data:
            logger.warning(f"refinement round {k}: no pseudo-mask has a labelled component; the decoder is unchanged")
            return
        decoder = self.sam.mask_decoder.train().requires_grad_(True)
        optimizer = torch.optim.AdamW(decoder.parameters(), lr=self.lr, weight_decay=1e-4)

        def loss_of(engine: Engine, sample) -> torch.Tensor:
            item, pseudo, prompts = sample
            embedding = self.embeddings(item)
            rng = self.rules.rng(item["name"], k, engine.state.iteration)
            pick = np.sort(rng.choice(len(prompts), min(self.per_step, len(prompts)), replace=False))
            logits, _ = self.sam.decode_logits(
                embedding, prompts.boxes[pick], prompts.points[pick], prompts.labels[pick]
            )
            logits = self.sam.to_image(logits, embedding.frame)
            target, valid = self._targets(pseudo, prompts, pick, logits.device)
            loss = self.dice(torch.sigmoid(logits) * valid, target * valid)
            return loss + F.binary_cross_entropy_with_logits(logits, target, weight=valid)

        last = fit_prompts(loss_of, optimizer, data, self.epochs, self.rules.seed + k, self.sam, self.progress_bar)
        logger.info(f"refinement round {k}: {len(data)} images x {self.epochs} epoch(s), last loss {last:.4f}")
        decoder.eval()

    @staticmethod
    def _targets(pseudo: np.ndarray, prompts: Prompts, pick: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per prompt the pixels of its class inside its box (N, 1, H, W), and where the pseudo-mask is labelled."""
        rows, cols = np.arange(pseudo.shape[0])[:, None], np.arange(pseudo.shape[1])[None]
        target = []
        for (y0, x0, y1, x1), c in zip(prompts.boxes[pick], prompts.classes[pick]):
            target.append((pseudo == c) & (rows >= y0) & (rows <= y1) & (cols >= x0) & (cols <= x1))
        target = torch.as_tensor(np.stack(target)[:, None], dtype=torch.float32, device=device)
        valid = torch.as_tensor(pseudo != IGNORE, dtype=torch.float32, device=device)
        return target, valid.expand_as(target)

    def _regenerate(self, k: int) -> None:
        todo = [item for item in self.items if not self.out.sam(item["name"], k).exists()]
        for item in todo:
            name, tags = item["name"], np.asarray(item["label"], bool)
            cams = load_cams(self.out.cam(name))
            prompts = self.rules.prompts(name, cams, tags)
            embedding = self.embeddings(item) if len(prompts) else None
            save_pseudo_mask(self.out.sam(name, k), self.rules.sam_mask(self.sam, embedding, cams, tags, prompts))
        logger.info(f"refinement round {k}: wrote {len(todo)} pseudo-masks to {self.out.sam('', k).parent}")
