"""The bundle's two MONAI Label tasks: segmentation (a label image for a tile, polygons for a slide region) and
training on a pathologist's corrections. The bundle's configs do the work; these classes adapt MONAI Label's stock
bundle tasks to them. The conventions (x first, label 0 background, class k as k + 1) live in the bundle's
``scripts/viewer.py``."""

from __future__ import annotations

import contextlib
import os
import sys

import torch
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.transform.post import FindContoursd
from monailabel.transform.writer import PolygonWriter


@contextlib.contextmanager
def on_path(bundle: str):
    """The bundle importable (MONAI Label takes it off ``sys.path`` after each step)."""
    sys.path.insert(0, bundle)
    try:
        yield
    finally:
        sys.path.remove(bundle)


def is_region_request(data) -> bool:
    """A request from ``/infer/wsi`` (QuPath, DSA) wants polygons; only its form has ``min_poly_area``."""
    return bool(data) and "min_poly_area" in data


class Segmentation(BundleInferTask):
    """``configs/inference.json``: a tile gives a label image (0 background, class k as k + 1); a slide region (or a
    tile sent to ``/infer/wsi``) gives polygons per class in level-0 pixels."""

    def __init__(self, bundle: str, conf: dict):
        super().__init__(bundle, conf, type="segmentation", add_post_restore=False, load_strict=True)
        if not self.is_valid():
            return
        with on_path(bundle):
            classes = self.bundle_config.get_parsed_content("classes")
        self.labels = {name: index + 1 for index, name in enumerate(classes)}
        # MONAI Label's multi-GPU split of a region divides by the GPU count: zero on a CPU
        self._config.update({"multi_gpu": torch.cuda.device_count() > 1})

    def info(self):
        return {**super().info(), "pathology": True}

    def post_transforms(self, data=None):
        post = super().post_transforms(data)
        if is_region_request(data):
            post.append(FindContoursd(keys="pred", labels=self.labels))
        return post

    def writer(self, data, extension=None, dtype=None):
        if is_region_request(data):
            return PolygonWriter(label=self.output_label_key, json=self.output_json_key)(data)
        return super().writer(data, extension=extension, dtype=dtype)


class Training(BundleTrainTask):
    """``configs/train.json`` on ``common.json``, on the datastore's labelled images: label 0 (unpainted) is ignored,
    label k trains class k - 1; tiles are cropped or padded to the bundle's patch size. The best epoch on the
    validation split (``val_label_miou``, against the corrections) becomes ``models/model.pt``."""

    def __init__(self, bundle: str, conf: dict):
        super().__init__(bundle, conf, load_strict=True)
        if self.is_valid():
            self.bundle_config_path = [self._common(), self.bundle_config_path]  # what monai.bundle.run reads

    def _common(self) -> str:
        return os.path.join(self.bundle_path, "configs", "common.json")

    def _load_bundle_config(self, path, config):
        return super()._load_bundle_config(path, [self._common(), config] if isinstance(config, str) else config)

    def config(self):
        return {
            **super().config(),
            "max_epochs": self.bundle_config.get("max_epochs"),
            "multi_gpu": torch.cuda.device_count() > 1,
        }
