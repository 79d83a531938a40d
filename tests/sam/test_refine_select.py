"""Which decoder round's masks are final (``refine_select``): the last round's, or the round whose masks agree best with
their prompt source's mask (layer 0), which needs no ground truth."""

import numpy as np
import pytest
import torch
from PIL import Image

from scripts.errors import DataError
from scripts.sam.embeddings import Embeddings
from scripts.sam.masks import IGNORE
from scripts.sam.model import load_sam
from scripts.sam.outputs import Outputs
from scripts.sam.refine import DecoderRefinement, prompt_agreement
from scripts.sam.rules import Rules

ITEM = {"name": "tile", "label": [1, 1]}


def drifted(columns: int) -> np.ndarray:
    """A 16-px mask, left half class 0, right half class 1, with ``columns`` columns left of the middle turned to 1."""
    return (np.indices((16, 16))[1] >= 8 - columns).astype(np.uint8)


def prepared(tmp_path) -> Outputs:
    """Round masks on disk as a finished 2-round refinement leaves them: round 1 agrees exactly where it labels but
    leaves 40 pixels out, round 0 has drifted by 2 columns, round 2 by 4."""
    out = Outputs(tmp_path)
    out.layer("tile", 0).parent.mkdir()
    source = drifted(0)
    source[0] = IGNORE  # the rounds label this row: it must not count
    Image.fromarray(source).save(out.layer("tile", 0))
    round1 = drifted(0)
    round1[5:9, 2:12] = IGNORE  # left out: 24 pixels of class 0, 16 of class 1, each a miss
    for k, mask in enumerate((drifted(2), round1, drifted(4))):
        out.sam("tile", k).parent.mkdir()
        Image.fromarray(mask).save(out.sam("tile", k))
    return out


def refinement(tmp_path, select: str) -> DecoderRefinement:
    sam = load_sam("tiny", image_size=64, seed=0)
    out = Outputs(tmp_path)
    for k in (1, 2):  # finished rounds: their decoders are loaded, not retrained
        torch.save(sam.mask_decoder.state_dict(), out.decoder(k))
    rules = Rules(ids_threshold=0.5, confidence=0.0, disagreement=0.5, box_rule=True, objects=[1])
    return DecoderRefinement(
        sam, [ITEM], tmp_path, rules, Embeddings(sam), 2, 1, 1e-4, 1, progress_bar=False, select=select
    )


def test_prompt_agreement_is_the_miou_with_layer_0_over_the_pixels_it_labels(tmp_path):
    prepared(tmp_path)
    # round 0: class 0 keeps 6 of 8 columns (IoU 0.75), class 1 gains 2 (8 / 10); round 2: 4 / 8 and 8 / 12;
    # round 1: 15 labelled rows of 8 columns per class, 24 and 16 pixels left out
    expected = [(0.75 + 0.8) / 2, (96 / 120 + 104 / 120) / 2, (0.5 + 8 / 12) / 2]
    assert prompt_agreement(tmp_path, [ITEM], 2) == pytest.approx(expected)


def test_a_round_cannot_raise_its_agreement_by_leaving_pixels_out(tmp_path):
    out = prepared(tmp_path)
    abstaining = np.full((16, 16), IGNORE, np.uint8)
    abstaining[4:12, 6:10] = drifted(0)[4:12, 6:10]  # exact, but only where it labels
    Image.fromarray(abstaining).save(out.sam("tile", 1))
    agreement = prompt_agreement(tmp_path, [ITEM], 2)
    assert agreement[1] < agreement[2] < agreement[0]
    assert refinement(tmp_path, "agreement").run() == 0


def test_agreement_keeps_the_round_closest_to_its_prompts_and_last_keeps_the_last(tmp_path):
    prepared(tmp_path)
    assert refinement(tmp_path, "agreement").run() == 1
    assert refinement(tmp_path, "last").run() == 2


def test_an_unknown_selection_is_refused_by_name(tmp_path):
    with pytest.raises(DataError, match="refine_select 'best'"):
        refinement(tmp_path, "best")


def test_agreement_keeps_the_last_round_when_no_round_shares_a_labelled_pixel_with_its_prompts(tmp_path, caplog):
    out = prepared(tmp_path)
    Image.fromarray(np.full((16, 16), IGNORE, np.uint8)).save(out.layer("tile", 0))
    assert np.isnan(prompt_agreement(tmp_path, [ITEM], 2)).all()
    assert refinement(tmp_path, "agreement").run() == 2
    assert "last round is kept" in caplog.text
