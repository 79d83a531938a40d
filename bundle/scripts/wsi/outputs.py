"""Phase 3 of whole-slide inference: what it leaves behind, written so that memory does not grow with the slide.

- :func:`output_paths`: a slide's five outputs (label TIFF, probabilities, GeoJSON, overlay, summary). The
  probabilities are written during the prediction; :func:`write_maps` makes the label TIFF, GeoJSON and overlay from
  it, and :func:`slide_summary` the summary.
- :class:`LabelStore`: the label mask at the inference level as a raw uint8 file on disk, written tile by tile
  with ``pwrite`` and read back in blocks with ``pread`` (not a memory map: mapped dirty pages count in the
  process's resident memory, and for a large slide that is hundreds of MB); :func:`write_pyramidal_tiff` reads it
  as it would an array.
- :func:`label_polygons` / :func:`geojson`: class regions of a (reduced) label map as QuPath annotations,
  (x, y) in level-0 pixels, holes kept; the reverse of :func:`scripts.data.annotations.read_geojson`.
- :func:`overlay_png`: a thumbnail with the classes blended over it and a legend.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from skimage.measure import approximate_polygon, find_contours, points_in_poly

from ..constants import IGNORE, NO_TISSUE, PALETTE
from ..data.annotations import Polygon
from .plan import Plan
from .pyramid_tiff import write_pyramidal_tiff
from .reader import read_lowres

# a slide's outputs: key -> suffix after the slide's name; the summary is written last and marks the slide done
OUTPUTS = {"labels": "_labels.tif", "probabilities": "_probabilities.npy", "geojson": ".geojson",
           "overlay": "_overlay.png", "summary": "_summary.json"}
THUMBNAIL = 1024  # longest side of the overlay


class LabelStore:
    """A ``height x width`` uint8 image in a raw file, initialised to ``fill``; indexable like an array
    (``store[y0:y1, x0:x1]``), which is what :func:`scripts.wsi.pyramid_tiff.write_pyramidal_tiff` needs."""

    dtype = np.dtype(np.uint8)

    def __init__(self, path: str | os.PathLike, height: int, width: int, fill: int = IGNORE):
        self.path, self.shape = os.fspath(path), (int(height), int(width))
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        row = np.full(width, fill, np.uint8).tobytes()
        with os.fdopen(os.dup(self._fd), "wb", buffering=1 << 20) as f:
            for _ in range(height):
                f.write(row)

    def write(self, y: int, x: int, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, np.uint8)
        for i, row in enumerate(block):
            os.pwrite(self._fd, row.tobytes(), (y + i) * self.shape[1] + x)

    def __getitem__(self, index) -> np.ndarray:
        rows, cols = index
        y0, y1, _ = rows.indices(self.shape[0])
        x0, x1, _ = cols.indices(self.shape[1])
        out = np.empty((max(0, y1 - y0), max(0, x1 - x0)), np.uint8)
        for i in range(out.shape[0]):
            out[i] = np.frombuffer(os.pread(self._fd, out.shape[1], (y0 + i) * self.shape[1] + x0), np.uint8)
        return out

    def close(self) -> None:
        os.close(self._fd)
        os.remove(self.path)


def label_polygons(labels: np.ndarray, classes: list[str], scale: float, size: tuple[float, float],
                   min_area: float = 4.0, tolerance: float = 0.5) -> list[Polygon]:
    """Polygons of each class of ``labels`` (H x W, values index ``classes``; others are ignored).

    Contours follow pixel edges' midpoints (skimage ``find_contours`` at 0.5 on a zero-padded mask, so every ring is
    closed); outer rings and holes are told apart by winding, and each hole goes to the smallest outer ring around it.
    Rings are simplified by ``tolerance`` label pixels and regions under ``min_area`` label pixels dropped. A label
    pixel (i, j) covers level-0 ``[j * scale, (j + 1) * scale)`` in x: coordinates are returned at level 0, clipped to
    the slide's level-0 ``size`` (width, height), which the last row and column of a reduced map overhang.
    """
    out = []
    for value, name in enumerate(classes):
        mask = np.pad(labels == value, 1)
        if not mask.any():
            continue
        outers, holes = [], []
        for ring in find_contours(mask, 0.5, positive_orientation="high"):
            ring = approximate_polygon(ring, tolerance)[:-1]  # find_contours repeats the first point at the end
            rows, cols = ring[:, 0], ring[:, 1]
            area = 0.5 * float(np.dot(cols, np.roll(rows, -1)) - np.dot(rows, np.roll(cols, -1)))
            if abs(area) < min_area or len(ring) < 3:
                continue
            (outers if area < 0 else holes).append((abs(area), ring))  # "high": outer rings wind negatively here
        outers.sort(key=lambda item: item[0])
        rings_holes: list[list] = [[] for _ in outers]
        for _, hole in holes:
            for k, (_, outer) in enumerate(outers):  # smallest first: the innermost ring around the hole
                if points_in_poly(hole[:1], outer)[0]:
                    rings_holes[k].append(hole)
                    break
        # padded (row, col) -> level-0 (x, y): -1 for the padding, +0.5 from pixel centre to pixel edge
        to_level0 = lambda ring: np.clip((ring[:, ::-1] - 0.5) * scale, 0, size)  # noqa: E731
        out += [Polygon(name, to_level0(outer), [to_level0(h) for h in hs])
                for (_, outer), hs in zip(outers, rings_holes)]
    return out


def _colour(classes: list[str], name: str) -> list[int]:
    return [int(v) for v in PALETTE[classes.index(name) % len(PALETTE)]]


def geojson(polygons: list[Polygon], classes: list[str]) -> dict:
    """A GeoJSON FeatureCollection QuPath imports: one annotation per polygon, ``classification`` with name and
    colour, rings closed as GeoJSON requires (coordinates rounded to 0.01 px)."""
    def ring(points):
        points = np.round(points, 2)
        return np.concatenate([points, points[:1]]).tolist()

    return {"type": "FeatureCollection", "features": [
        {"type": "Feature",
         "geometry": {"type": "Polygon", "coordinates": [ring(p.exterior)] + [ring(h) for h in p.holes]},
         "properties": {"objectType": "annotation",
                        "classification": {"name": p.class_name, "color": _colour(classes, p.class_name)}}}
        for p in polygons]}


def overlay_png(path: str | os.PathLike, thumbnail: np.ndarray, labels: np.ndarray, classes: list[str],
                alpha: float = 0.45) -> None:
    """``thumbnail`` (H x W x 3) with ``labels`` (any size, resized nearest) blended in class colours, a legend
    below."""
    thumbnail = np.asarray(thumbnail, np.float32)
    height, width = thumbnail.shape[:2]
    rows = np.minimum(np.arange(height) * labels.shape[0] // height, labels.shape[0] - 1)
    cols = np.minimum(np.arange(width) * labels.shape[1] // width, labels.shape[1] - 1)
    labels = labels[rows[:, None], cols[None, :]]
    colours = PALETTE[labels % len(PALETTE)].astype(np.float32)
    blended = np.where((labels < len(classes))[..., None], (1 - alpha) * thumbnail + alpha * colours, thumbnail)
    legend = 28
    canvas = Image.new("RGB", (max(width, 60 * len(classes) + 20), height + legend), "white")
    canvas.paste(Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8)), (0, 0))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=14)
    x = 6
    for name in classes:
        draw.rectangle([x, height + 6, x + 16, height + 22], fill=tuple(_colour(classes, name)), outline=(0, 0, 0))
        draw.text((x + 22, height + 6), name, fill=(0, 0, 0), font=font)
        x += 40 + int(draw.textlength(name, font=font))
    # 256 colours (a third of the bytes): 200 for the picture, the class colours and a grey ramp for the legend
    picture = canvas.crop((0, 0, width, height)).quantize(200, method=Image.Quantize.MEDIANCUT,
                                                           dither=Image.Dither.NONE)
    grey = [v for g in np.linspace(0, 255, 56 - len(classes)).astype(int).tolist() for v in (g, g, g)]
    colours = [v for name in classes for v in _colour(classes, name)]
    palette = Image.new("P", (1, 1))
    palette.putpalette(picture.getpalette()[: 3 * 200] + colours + grey)
    canvas.quantize(palette=palette, dither=Image.Dither.NONE).save(path, format="PNG", optimize=True)


def write_json(path: str | os.PathLike, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)


def output_paths(output_dir: str | os.PathLike, name: str) -> dict[str, Path]:
    """The outputs of the slide called ``name`` (its file's stem), keyed as :data:`OUTPUTS`, the summary last.

    Args:
        output_dir: the output folder.
        name: the slide's name.

    Returns:
        ``{"labels": ..., "probabilities": ..., "geojson": ..., "overlay": ..., "summary": ...}`` paths.
    """
    return {key: Path(output_dir) / f"{name}{suffix}" for key, suffix in OUTPUTS.items()}


def reduced_labels(probabilities: np.ndarray) -> np.ndarray:
    """The label map of the reduced probabilities: the most probable class, NO_TISSUE where all are 0 (no tissue).

    Args:
        probabilities: C x h x w, zeros off the tissue (as :func:`scripts.wsi.predict.store_tile` writes them).

    Returns:
        h x w uint8.
    """
    return np.where(probabilities.sum(0) > 0, np.asarray(probabilities).argmax(0), NO_TISSUE).astype(np.uint8)


def write_maps(paths: dict, plan: Plan, labels, reduced: np.ndarray, classes: list[str], prob_downsample: int) -> int:
    """The label TIFF, the GeoJSON and the overlay of one predicted slide (the probabilities are already on disk).

    Args:
        paths: where to write them (keys ``labels``, ``geojson``, ``overlay``; temporary paths for atomic output).
        plan: the slide's plan (its reader, grid and pixel size).
        labels: the grid's labels, an array or a :class:`LabelStore`; written as a pyramidal TIFF at the grid's mpp.
        reduced: the labels of the reduced probability map (:func:`reduced_labels`); the GeoJSON and the overlay
            come from it.
        classes: the class names, in label order.
        prob_downsample: the reduction of ``reduced`` relative to the grid.

    Returns:
        The number of polygons in the GeoJSON.
    """
    grid = plan.grid
    write_pyramidal_tiff(paths["labels"], labels, mpp=grid.mpp, compression="lzw", min_size=256,
                         description=f"pathology_wsss labels: {', '.join(classes)}; {NO_TISSUE} = no tissue")
    height0, width0 = (int(v) for v in plan.reader.get_size(plan.wsi, 0))
    polygons = label_polygons(reduced, classes, prob_downsample * grid.downsample, (width0, height0))
    write_json(paths["geojson"], geojson(polygons, classes))
    thumbnail, _ = read_lowres(plan.reader, plan.wsi, max(1.0, max(height0, width0) / THUMBNAIL))
    overlay_png(paths["overlay"], thumbnail, reduced, classes)
    return len(polygons)


def slide_summary(plan: Plan, classes: list[str], counts: np.ndarray, *, model_mpp: float | None, windows: int,
                  polygons: int, prob_downsample: int, seconds: float, outputs: dict) -> dict:
    """A slide's summary: the grid it was inferred at, the work done, and class areas in pixels and mm².

    Args:
        plan: the slide's plan.
        classes: the class names, in label order.
        counts: pixel counts per label value (256), as :func:`scripts.wsi.predict.predict` returns them.
        model_mpp: the model's pixel size (None: level 0 as it is).
        windows: sliding windows the network ran on.
        polygons: polygons in the GeoJSON.
        prob_downsample: the probability map's reduction relative to the grid.
        seconds: wall time for the slide.
        outputs: the output paths (:func:`output_paths`); their file names are recorded.

    Returns:
        The summary, JSON-serialisable.
    """
    grid = plan.grid
    tissue = int(counts[: len(classes)].sum())
    mm2 = None if grid.mpp is None else (grid.mpp / 1000) ** 2
    areas = {c: int(counts[i]) for i, c in enumerate(classes)}
    message = (f"{len(plan.tiles)} of {plan.total_tiles} tiles inferred, {tissue / 1e6:.2f} tissue MP in "
               f"{seconds:.1f} s" if plan.tiles else "no tissue found: empty outputs written")
    return {
        "slide": plan.path, "message": message, "classes": classes,
        "slide_mpp": plan.slide_mpp, "model_mpp": model_mpp, "level": grid.level,
        "level_downsample": grid.level_downsample, "downsample": grid.downsample,
        "resampled": abs(grid.scale - 1) > 1e-9, "grid_size": [grid.height, grid.width], "mpp": grid.mpp,
        "tiles_total": plan.total_tiles, "tiles_inferred": len(plan.tiles),
        "windows_inferred": windows, "tile_size": plan.tile, "margin": plan.margin,
        "class_pixels": areas, "tissue_pixels": tissue,
        "class_area_mm2": None if mm2 is None else {c: n * mm2 for c, n in areas.items()},
        "tissue_area_mm2": None if mm2 is None else tissue * mm2,
        "polygons": polygons, "probability_downsample": prob_downsample * grid.downsample,
        "seconds": round(seconds, 3), "outputs": {k: Path(p).name for k, p in outputs.items()},
    }
