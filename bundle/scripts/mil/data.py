"""What MIL needs of the weak labels: negatives. A class no training patch lacks gives the teacher no untagged example,
so its Dice-to-tag target is all ones everywhere and its map learns to cover every pixel."""

from __future__ import annotations

import logging
import os

import numpy as np
from monai.data import load_decathlon_datalist

from ..data.datalist import read_classes
from ..errors import DataError

logger = logging.getLogger(__name__)


def check_negatives(datalist: str | os.PathLike, split: str = "training") -> list[str]:
    """The classes with no untagged ``split`` entry: a warning naming them, or a DataError when that is every class
    (all classes tagged everywhere: MIL has nothing to tell the classes apart by).

    Args:
        datalist: the datalist JSON.
        split: the split the MIL networks train on.

    Returns:
        The names of the classes without a negative (untagged) entry.
    """
    classes = read_classes(datalist)
    entries = load_decathlon_datalist(str(datalist), False, split)
    if not entries:
        raise DataError(f"{datalist}: no '{split}' entries to train the MIL networks on")
    tags = np.array([e["label"] for e in entries], bool)
    without = [c for c, tagged in zip(classes, tags.all(0)) if tagged]
    if len(without) == len(classes):
        raise DataError(
            f"{datalist}: every '{split}' entry is tagged with every class {classes}; MIL learns a class from the "
            "patches that lack it, so it needs some untagged patches for each class"
        )
    if without:
        logger.warning(
            "%s: no '%s' entry lacks class(es) %s: MIL has no negative example for them, and their maps will cover "
            "every patch tagged with them",
            datalist,
            split,
            without,
        )
    return without
