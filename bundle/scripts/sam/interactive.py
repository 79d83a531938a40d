"""Interactive segmentation with WSI-SAM (``configs/interactive.json``): a slide or a tile and prompts in level-0
pixels (QuPath rectangles and points from a GeoJSON, or boxes and points from the command line) -> one polygon per
prompt as QuPath GeoJSON, and a mask PNG per prompt.

Prompts are grouped into regions (an HR view of ``region`` model pixels that holds them all, at the model's pixel
size; its LR view at twice it), each region read from the slide (only the level and the area it needs), encoded
once and all its prompts decoded in one batch. A box larger than the HR view enlarges its region's views up to the
LR view's size; a box larger than the LR view is refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from PIL import Image
from skimage.measure import label

from ..atomic import atomic_output
from ..constants import PALETTE
from ..data.annotations import geojson_features
from ..errors import DataError
from ..wsi.outputs import label_polygons
from .multires import MultiResSAM
from .views import ImageSource, Window

logger = logging.getLogger(__name__)


@dataclass
class Prompt:
    """One object to outline: a box (x0, y0, x1, y1) of level-0 pixel edges and/or positive points (x, y)."""

    where: str  # for messages: the file and feature, or the command-line argument
    box: np.ndarray | None = None
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    class_name: str = "object"

    @property
    def extent(self) -> np.ndarray:
        """(x0, y0, x1, y1): the box, else the points' bounding box (one pixel at least)."""
        if self.box is not None:
            return self.box
        return np.concatenate([self.points.min(0), self.points.max(0) + 1])

    @property
    def kind(self) -> tuple[bool, int]:
        """Prompts of one kind share a decoder batch."""
        return self.box is not None, len(self.points)


def _class_name(feature: dict, default: str) -> str:
    cls = (feature.get("properties") or {}).get("classification")
    name = cls.get("name") if isinstance(cls, dict) else cls
    return str(name) if name else default


def read_prompts(path: str | os.PathLike, class_name: str = "object") -> list[Prompt]:
    """Prompts of a QuPath GeoJSON: a rectangle (any polygon: its bounding box) is a box, a point a point prompt, a
    multi-point one prompt with several points; other geometries are skipped. The class is the feature's
    classification, else ``class_name``. No usable prompt is a DataError naming the file."""
    features = geojson_features(path, "prompt file")
    prompts = []
    for i, feature in enumerate(features):
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        kind, coords = (geometry or {}).get("type"), (geometry or {}).get("coordinates")
        where, name = f"{path}: feature {i}", _class_name(feature, class_name) if isinstance(feature, dict) else ""
        try:
            if kind == "Polygon":
                ring = np.asarray(coords[0], np.float64).reshape(-1, 2)
                prompts.append(Prompt(where, np.concatenate([ring.min(0), ring.max(0)]), class_name=name))
            elif kind in ("Point", "MultiPoint"):
                points = np.asarray(coords, np.float64).reshape(-1, 2)
                prompts.append(Prompt(where, None, points, name))
        except (TypeError, ValueError, IndexError) as e:
            raise DataError(f"{where}: bad {kind} coordinates ({e})") from e
    if not prompts:
        raise DataError(f"{path}: no usable prompts (QuPath rectangles or points) among {len(features)} feature(s)")
    return prompts


def command_line_prompts(image, boxes=None, points=None, class_name: str = "object") -> list[Prompt]:
    """``boxes`` [[x0, y0, x1, y1], ...] and ``points`` [[x, y], ...] (each point one prompt), level-0 pixels of
    ``image`` (named in messages)."""
    prompts = []
    for i, box in enumerate(boxes or []):
        if np.shape(box) != (4,):
            raise DataError(f"{image}: --boxes: box {i} must be [x0, y0, x1, y1], got {box!r}")
        prompts.append(Prompt(f"{image}: --boxes: box {i}", np.asarray(box, np.float64), class_name=class_name))
    for i, point in enumerate(points or []):
        if np.shape(point) != (2,):
            raise DataError(f"{image}: --points: point {i} must be [x, y], got {point!r}")
        prompts.append(Prompt(f"{image}: --points: point {i}", None, np.asarray([point], np.float64), class_name))
    return prompts


class InteractiveSegmentation:
    """Prompts on a slide or a tile -> polygons and masks (see the module docstring).

    Args:
        model: the WSI-SAM model; its ``mpp`` is the HR pixel size (None: the image's own pixels).
        region: the HR view's side in model pixels; the LR view covers twice it.
        slide_backend: slide reader, ``"cucim"`` (OpenSlide fallback) or ``"openslide"``.
        image_mpp: level 0's pixel size for files that record none (tiles, some TIFFs).
    """

    def __init__(self, model: MultiResSAM, region: int = 256, slide_backend: str = "cucim", image_mpp=None):
        if region < 16:
            raise DataError(f"interactive: region must be at least 16 pixels, got {region}")
        self.model, self.region, self.backend, self.image_mpp = model.eval(), int(region), slide_backend, image_mpp
        self.timings: list[dict] = []

    def check(self, prompts: list[Prompt], source: ImageSource, ds: float) -> None:
        """Each prompt inside the image, each box non-empty and no larger than the LR view."""
        height, width = source.size
        limit = 2 * self.region * ds
        for p in prompts:
            x0, y0, x1, y1 = p.extent
            if p.box is not None and (x1 <= x0 or y1 <= y0):
                raise DataError(f"{p.where}: empty box (x0, y0, x1, y1) = {p.box.tolist()}")
            if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
                raise DataError(
                    f"{p.where}: prompt (x0, y0, x1, y1) = {np.round(p.extent, 1).tolist()} lies outside "
                    f"{source.path} ({width} x {height} pixels)"
                )
            if max(x1 - x0, y1 - y0) > limit:
                raise DataError(
                    f"{p.where}: box of {x1 - x0:.0f} x {y1 - y0:.0f} level-0 pixels is larger than the LR view "
                    f"({limit:.0f} pixels: 2 x region {self.region} at {ds:.3g} level-0 pixels per model pixel); "
                    "draw a smaller box or raise region"
                )

    def windows(self, prompts: list[Prompt], source: ImageSource, ds: float) -> list[tuple[Window, list[int]]]:
        """Greedy regions: the next unplaced prompt's window (centred on it, moved inside the image where the image
        is larger), and every unplaced prompt of the same kind that fits inside it."""
        left = list(range(len(prompts)))
        out = []
        size = np.asarray(source.size, np.float64)
        while left:
            first = prompts[left[0]]
            x0, y0, x1, y1 = first.extent
            side = max(self.region, math.ceil(max(x1 - x0, y1 - y0) / ds))
            extent = side * ds
            centre = np.array([(y0 + y1) / 2, (x0 + x1) / 2])
            centre = np.where(size > extent, np.clip(centre, extent / 2, size - extent / 2), centre)
            window = Window.around(centre, ds, (side, side))
            wy0, wx0, wy1, wx1 = window.extent
            members = []
            for i in left:
                x0, y0, x1, y1 = prompts[i].extent
                if prompts[i].kind == first.kind and x0 >= wx0 and y0 >= wy0 and x1 <= wx1 and y1 <= wy1:
                    members.append(i)
            out.append((window, members))
            left = [i for i in left if i not in members]
        return out

    def __call__(
        self, image, output_dir, prompts_file=None, boxes=None, points=None, class_name: str = "object"
    ) -> Path:
        """Segment the prompts; returns the GeoJSON written (``<image stem>_prompts.geojson``, masks beside it)."""
        if not image:
            raise DataError("interactive: no image; give --image, a slide or a tile")
        prompts = command_line_prompts(image, boxes, points, class_name)
        if prompts_file:
            prompts = read_prompts(prompts_file, class_name) + prompts
        if not prompts:
            raise DataError(f"{image}: no prompts; give prompts (a GeoJSON) or boxes / points")
        source = ImageSource(image, self.backend, self.image_mpp)
        ds = source.downsample(self.model.mpp)
        self.check(prompts, source, ds)
        masks, features = {}, {}
        self.timings = []
        for window, members in self.windows(prompts, source, ds):
            start = time.perf_counter()
            hr = source.read(window)
            lr = source.read(window.context()) if self.model.use_lr else None
            region = self.model.region(hr, window, lr)
            encoded = time.perf_counter()
            group = [prompts[i] for i in members]
            boxes_v = points_v = labels = None
            if group[0].box is not None:  # edges -> inclusive level-0 pixel indices (y0, x0, y1, x1) -> view pixels
                edges = np.stack([p.box for p in group])
                boxes_v = window.to_view(np.stack([edges[:, 1], edges[:, 0], edges[:, 3] - 1, edges[:, 2] - 1], 1))
            if len(group[0].points):
                points_v = window.to_view(np.stack([p.points[:, ::-1] for p in group]))
                labels = np.ones(points_v.shape[:2], np.int64)
            probs = self.model.predict(region, boxes_v, points_v, labels).probs
            decoded = time.perf_counter()
            self.timings.append(
                {"prompts": len(group), "read_encode_s": encoded - start, "decode_s": decoded - encoded}
            )
            for i, p, prob in zip(members, group, probs):
                masks[i] = (prob > 0.5).astype(np.uint8) * 255, window
                features[i] = self.feature(i, p, prob > 0.5, window, source)
        name = Path(image).stem
        out = Path(output_dir)
        collection = {"type": "FeatureCollection", "features": []}
        for i in range(len(prompts)):
            mask, window = masks[i]
            mask_path = out / f"{name}_prompt{i}.png"
            with atomic_output(mask_path) as tmp:
                Image.fromarray(mask).save(tmp, format="PNG")
            if features[i] is not None:
                features[i]["properties"].update(
                    mask=mask_path.name,
                    mask_origin_xy=[window.origin[1], window.origin[0]],
                    mask_downsample=window.downsample,
                )
                collection["features"].append(features[i])
        target = out / f"{name}_prompts.geojson"
        with atomic_output(target) as tmp:
            Path(tmp).write_text(json.dumps(collection, indent=1))
        for k, t in enumerate(self.timings):
            logger.info(
                f"region {k}: {t['prompts']} prompt(s), read + encode {t['read_encode_s']:.3f} s, "
                f"decode {t['decode_s']:.3f} s"
            )
        logger.info(f"{image}: {len(collection['features'])} polygon(s) for {len(prompts)} prompt(s) -> {target}")
        return target

    def feature(self, i: int, prompt: Prompt, mask: np.ndarray, window: Window, source: ImageSource) -> dict | None:
        """The prompt's object as a QuPath annotation: the largest connected part of its mask, inside its box."""
        if prompt.box is not None:  # a box says the object lies inside it: no pixel outside counts
            y0, x0, y1, x1 = np.round(window.to_view(prompt.box[[1, 0, 3, 2]] - [0, 0, 1, 1])).astype(int)
            inside = np.zeros_like(mask)
            inside[max(y0, 0) : y1 + 1, max(x0, 0) : x1 + 1] = True
            mask = mask & inside
        parts = label(mask, connectivity=2)
        if parts.max() == 0:
            logger.warning(f"{prompt.where}: the model found no object; no polygon for this prompt")
            return None
        largest = np.argmax(np.bincount(parts.ravel())[1:]) + 1
        size = (window.shape[1] * window.downsample, window.shape[0] * window.downsample)
        outline = np.where(parts == largest, 0, 1).astype(np.uint8)  # label_polygons outlines class 0 of a label map
        polygons = label_polygons(outline, [prompt.class_name], window.downsample, size, 0, 0.5)
        offset = np.array([window.origin[1], window.origin[0]])
        shape = shapely.unary_union(
            [shapely.Polygon(p.exterior + offset, [h + offset for h in p.holes]).buffer(0) for p in polygons]
        )
        if prompt.box is not None:
            shape = shape.intersection(shapely.box(*prompt.box))
        if isinstance(shape, shapely.MultiPolygon | shapely.GeometryCollection):
            shape = max((g for g in shape.geoms if isinstance(g, shapely.Polygon)), key=lambda g: g.area, default=None)
        if shape is None or shape.is_empty:
            logger.warning(f"{prompt.where}: the model's mask lies outside the box; no polygon for this prompt")
            return None
        properties = {
            "objectType": "annotation",
            "name": f"prompt {i}",
            "classification": {"name": prompt.class_name, "color": [int(v) for v in PALETTE[1]]},
            "measurements": {"Area px^2": round(shape.area, 2)},
        }
        if source.mpp is not None:
            properties["measurements"]["Area µm^2"] = round(shape.area * source.mpp**2, 2)
        geometry = json.loads(shapely.to_geojson(shapely.set_precision(shape, 0.01)))
        return {"type": "Feature", "geometry": geometry, "properties": properties}
