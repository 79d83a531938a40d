"""What whole-slide inference leaves behind, written so that memory does not grow with the slide.

- :class:`LabelStore`: the label mask at the inference level as a raw uint8 file on disk, written tile by tile
  with ``pwrite`` and read back in blocks with ``pread`` (not a memory map: mapped dirty pages count in the
  process's resident memory, and for a large slide that is hundreds of MB); :func:`write_pyramidal_tiff` reads it
  as it would an array.
- :func:`label_polygons` / :func:`write_geojson`: class regions of a (reduced) label map as QuPath annotations,
  (x, y) in level-0 pixels, holes kept; the reverse of :func:`scripts.annotations.read_geojson`.
- :func:`overlay_png`: a thumbnail with the classes blended over it and a legend.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from skimage.measure import approximate_polygon, find_contours, points_in_poly

from .annotations import IGNORE, Polygon
from .seg_metrics import PALETTE


class LabelStore:
    """A ``height x width`` uint8 image in a raw file, initialised to ``fill``; indexable like an array
    (``store[y0:y1, x0:x1]``), which is what :func:`scripts.pyramid_tiff.write_pyramidal_tiff` needs."""

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
        out += [Polygon(name, to_level0(outer), [to_level0(h) for h in hs]) for (_, outer), hs in zip(outers, rings_holes)]
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
    """``thumbnail`` (H x W x 3) with ``labels`` (any size, resized nearest) blended in class colours, a legend below."""
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
    picture = canvas.crop((0, 0, width, height)).quantize(200, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    grey = [v for g in np.linspace(0, 255, 56 - len(classes)).astype(int).tolist() for v in (g, g, g)]
    colours = [v for name in classes for v in _colour(classes, name)]
    palette = Image.new("P", (1, 1))
    palette.putpalette(picture.getpalette()[: 3 * 200] + colours + grey)
    canvas.quantize(palette=palette, dither=Image.Dither.NONE).save(path, format="PNG", optimize=True)


def write_json(path: str | os.PathLike, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
