"""SAM image embeddings, computed once per image and shared by the first pass and every refinement round."""

from __future__ import annotations

import logging

import numpy as np

from ..transforms import LoadPatchd
from .model import Embedding, SegmentAnything

logger = logging.getLogger(__name__)


class Embeddings:
    """SAM image embeddings by item name. The encoder stays frozen, so an image is encoded once for the first pass
    and every refinement round (``cache``: kept in memory, ~4 MB per image for LiteMedSAM; off -> re-encoded).

    Args:
        sam: the SAM model whose image encoder makes the embeddings.
        cache: keep each embedding in memory; False re-encodes the image at every call.
        slide_backend: slide reader, ``"cucim"`` or ``"openslide"`` (see :class:`scripts.transforms.LoadPatchd`).
    """

    def __init__(self, sam: SegmentAnything, cache: bool = True, slide_backend: str = "cucim"):
        self.sam, self.cache, self.store = sam, cache, {}
        self.load = LoadPatchd(keys="image", backend=slide_backend)

    def __call__(self, item: dict, image: np.ndarray | None = None) -> Embedding:
        if item["name"] in self.store:
            return self.store[item["name"]]
        if image is None:
            image = self.load(item)["image"].transpose(1, 2, 0)
        embedding = self.sam.embed(image)
        if self.cache:
            self.store[item["name"]] = embedding
        return embedding
