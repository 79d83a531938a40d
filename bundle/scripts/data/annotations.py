"""Polygon annotations in level-0 pixel (x, y) coordinates: QuPath GeoJSON and ASAP XML (CAMELYON).

:func:`read_annotations` returns a list of :class:`Polygon` records; :func:`rasterize` paints them into a
uint8 label image at a given downsample (255 = unannotated).

Self-intersecting polygons (a ring whose edges cross, e.g. a figure eight drawn with the brush) would be filled
by the even-odd rule, leaving holes where the ring overlaps itself. They are repaired with ``shapely.make_valid``, and a
warning names the file, the annotation and the crossing point.
"""

from __future__ import annotations

import json
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import shapely
from shapely.geometry import Polygon as ShapelyPolygon

from ..constants import IGNORE
from ..errors import DataError

log = logging.getLogger(__name__)

GEOJSON_SUFFIXES = (".geojson", ".json")
XML_SUFFIXES = (".xml",)
ASAP_AREA_TYPES = ("polygon", "spline", "rectangle")  # spline: its control points as a polygon


class Polygon(NamedTuple):
    """One annotated region: class name, exterior ring (N x 2 float, x/y at level 0), holes (rings)."""

    class_name: str
    exterior: np.ndarray
    holes: list


def _crossing(ring: np.ndarray) -> tuple[float, float] | None:
    """A point where two non-adjacent edges of a closed ring cross properly, or None (touching does not count).

    Edges are sorted by their left end so that only pairs overlapping in x are tested: near-linear in practice."""
    keep = np.r_[True, np.any(np.diff(ring, axis=0) != 0, axis=1)]
    pts = ring[keep]
    if len(pts) > 1 and np.array_equal(pts[0], pts[-1]):
        pts = pts[:-1]
    n = len(pts)
    if n < 4:
        return None
    a, b = pts, np.roll(pts, -1, axis=0)  # edge k: a[k] -> b[k]
    xmin, xmax = np.minimum(a[:, 0], b[:, 0]), np.maximum(a[:, 0], b[:, 0])
    ymin, ymax = np.minimum(a[:, 1], b[:, 1]), np.maximum(a[:, 1], b[:, 1])
    order = np.argsort(xmin, kind="stable")
    sorted_min = xmin[order]
    stop = np.searchsorted(sorted_min, xmax[order], side="right")  # edges after i in order whose left end <= its right
    start = np.arange(n) + 1
    counts = np.maximum(stop - start, 0)
    chunk = 1 << 20
    first = 0
    while first < n:
        # pairs for a block of edges whose candidate count stays under `chunk`
        last = first + max(1, int(np.searchsorted(np.cumsum(counts[first:]), chunk)))
        reps = counts[first:last]
        if reps.sum():
            i_sorted = np.repeat(np.arange(first, last), reps)
            offsets = np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps)
            i, j = order[i_sorted], order[start[i_sorted] + offsets]
            near = (ymin[i] <= ymax[j]) & (ymin[j] <= ymax[i])
            gap = np.abs(i - j)
            near &= (gap != 1) & (gap != n - 1)
            i, j = i[near], j[near]

            def side(p, q, r):
                return np.sign((q[:, 0] - p[:, 0]) * (r[:, 1] - p[:, 1]) - (q[:, 1] - p[:, 1]) * (r[:, 0] - p[:, 0]))

            cross = (side(a[i], b[i], a[j]) * side(a[i], b[i], b[j]) < 0) & (
                side(a[j], b[j], a[i]) * side(a[j], b[j], b[i]) < 0
            )
            if cross.any():
                k, m = i[cross][0], j[cross][0]
                d1, d2 = b[k] - a[k], b[m] - a[m]
                t = ((a[m][0] - a[k][0]) * d2[1] - (a[m][1] - a[k][1]) * d2[0]) / (d1[0] * d2[1] - d1[1] * d2[0])
                x, y = a[k] + t * d1
                return float(x), float(y)
        first = last
    return None


def _make_valid(polygon: Polygon, path, where: str) -> list[Polygon]:
    """The polygon itself if no ring crosses itself; else its repair by shapely."""
    bad = next((p for p in (_crossing(r) for r in (polygon.exterior, *polygon.holes)) if p is not None), None)
    if bad is None:
        return [polygon]
    fixed = shapely.make_valid(ShapelyPolygon(polygon.exterior, polygon.holes))
    parts = [g for g in getattr(fixed, "geoms", [fixed]) if g.geom_type in ("Polygon", "MultiPolygon")]
    parts = [q for g in parts for q in getattr(g, "geoms", [g]) if not q.is_empty]
    log.warning(
        "%s: %s: the polygon crosses itself near (%.1f, %.1f); repaired with shapely.make_valid into %d polygon(s)",
        path,
        where,
        bad[0],
        bad[1],
        len(parts),
    )

    def ring(r) -> np.ndarray:
        return np.asarray(r.coords, np.float64)[:, :2]

    return [Polygon(polygon.class_name, ring(q.exterior), [ring(r) for r in q.interiors]) for q in parts]


def _ring(coords, path, where: str) -> np.ndarray:
    try:
        arr = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: {where}: coordinates are not numbers ({e})") from None
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise DataError(f"{path}: {where}: a ring must be a list of [x, y] points, got shape {arr.shape}")
    arr = arr[:, :2]
    if not np.isfinite(arr).all():
        raise DataError(f"{path}: {where}: coordinates contain NaN or infinity")
    if len(arr) < 3:
        raise DataError(f"{path}: {where}: a polygon needs at least 3 points, got {len(arr)}")
    return arr


# ------------------------------------------------------------------------------------------------ GeoJSON


def _feature_class(feature: dict) -> str | None:
    props = feature.get("properties") or {}
    cls = props.get("classification")
    if isinstance(cls, dict):
        name = cls.get("name")
        if not name and isinstance(cls.get("names"), list) and cls["names"]:
            name = ": ".join(str(n) for n in cls["names"])  # QuPath derived classes
        if name:
            return str(name)
    elif isinstance(cls, str) and cls:
        return cls
    name = props.get("name")
    return str(name) if name else None


def _geometry_polygons(geometry, path, where: str) -> list[list]:
    """Polygons (lists of rings) of a geometry; non-area geometries give none."""
    if not isinstance(geometry, dict) or "type" not in geometry:
        raise DataError(f"{path}: {where}: missing or invalid 'geometry'")
    kind = geometry["type"]
    coords = geometry.get("coordinates")
    if kind == "Polygon":
        return [coords]
    if kind == "MultiPolygon":
        if not isinstance(coords, list):
            raise DataError(f"{path}: {where}: MultiPolygon coordinates must be a list")
        return list(coords)
    if kind == "GeometryCollection":
        return [p for g in geometry.get("geometries") or [] for p in _geometry_polygons(g, path, where)]
    if kind in ("Point", "MultiPoint", "LineString", "MultiLineString"):
        log.warning("%s: %s: skipping a %s (no area to label)", path, where, kind)
        return []
    raise DataError(f"{path}: {where}: unknown geometry type {kind!r}")


def geojson_features(path: str | os.PathLike, what: str) -> list:
    """The features of a GeoJSON file (a FeatureCollection, a list of Features, or one Feature), as QuPath writes
    them; a missing or malformed file is a DataError naming it as ``what``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid GeoJSON ({e})") from e
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):
        features = data
    else:
        raise DataError(f"{path}: expected a GeoJSON FeatureCollection, a Feature or a list of Features")
    if not isinstance(features, list):
        raise DataError(f"{path}: 'features' must be a list")
    return features


def read_geojson(path: str | os.PathLike) -> list[Polygon]:
    """QuPath's GeoJSON export: a FeatureCollection, a list of Features, or one Feature.

    The class is ``properties.classification.name``, else ``properties.name``; a feature with neither is
    an error. Polygon and MultiPolygon (with holes) are read; points and lines are skipped with a warning.
    """
    features = geojson_features(path, "annotation file")
    out = []
    for i, feature in enumerate(features):
        where = f"feature {i}"
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise DataError(f"{path}: {where} is not a GeoJSON Feature")
        polys = _geometry_polygons(feature.get("geometry"), path, where)
        if not polys:
            continue
        name = _feature_class(feature)
        if not name:
            raise DataError(
                f"{path}: {where} has no class (properties.classification.name or properties.name); "
                "classify every annotation in QuPath before exporting"
            )
        for rings in polys:
            if not isinstance(rings, list) or not rings:
                raise DataError(f"{path}: {where}: a polygon must be a non-empty list of rings")
            exterior = _ring(rings[0], path, where)
            holes = [_ring(r, path, f"{where} hole {k}") for k, r in enumerate(rings[1:])]
            out.extend(_make_valid(Polygon(name, exterior, holes), path, where))
    return out


# ---------------------------------------------------------------------------------------------- ASAP XML


def _number(text: str | None, path, where: str) -> float:
    try:
        return float(str(text).replace(",", "."))  # some CAMELYON files use a decimal comma
    except ValueError:
        raise DataError(f"{path}: {where}: coordinate {text!r} is not a number") from None


def read_asap_xml(path: str | os.PathLike) -> list[Polygon]:
    """ASAP XML as CAMELYON ships it; the class is the annotation's ``PartOfGroup``.

    Polygon, Spline (its control points) and Rectangle annotations are read; Dot/PointSet are skipped with
    a warning. An annotation whose group is missing or ``None`` is an error.
    """
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except (ET.ParseError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid XML ({e})") from e
    if root.tag != "ASAP_Annotations":
        raise DataError(f"{path}: expected an ASAP_Annotations document, got <{root.tag}>")
    out = []
    for i, ann in enumerate(root.iter("Annotation")):
        where = f"annotation {i} ({ann.get('Name', '?')})"
        kind = (ann.get("Type") or "Polygon").lower()
        if kind not in ASAP_AREA_TYPES:
            log.warning("%s: %s: skipping a %s annotation (no area to label)", path, where, ann.get("Type"))
            continue
        group = ann.get("PartOfGroup")
        if not group or group == "None":
            raise DataError(f"{path}: {where} belongs to no group (PartOfGroup); assign a class in ASAP")
        points = []
        for c in ann.iter("Coordinate"):
            order = c.get("Order")
            points.append(
                (
                    int(_number(order, path, where)) if order is not None else len(points),
                    _number(c.get("X"), path, where),
                    _number(c.get("Y"), path, where),
                )
            )
        points.sort(key=lambda p: p[0])
        xy = [(x, y) for _, x, y in points]
        if kind == "rectangle" and len(xy) == 2:
            (x0, y0), (x1, y1) = xy
            xy = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        ring = _ring(xy, path, where) if xy else _ring([], path, where)
        out.extend(_make_valid(Polygon(group, ring, []), path, where))
    return out


def read_annotations(path: str | os.PathLike) -> list[Polygon]:
    """Polygons of a ``.geojson``/``.json`` (QuPath) or ``.xml`` (ASAP) file, in level-0 pixels."""
    suffix = Path(path).suffix.lower()
    if suffix in GEOJSON_SUFFIXES:
        return read_geojson(path)
    if suffix in XML_SUFFIXES:
        return read_asap_xml(path)
    raise DataError(f"{path}: unknown annotation format {suffix!r}; use .geojson/.json (QuPath) or .xml (ASAP)")


# ------------------------------------------------------------------------------------------ rasterizing


def _fill(ring: np.ndarray, shape: tuple[int, int], downsample: float) -> tuple[np.ndarray, np.ndarray]:
    from skimage.draw import polygon

    # pixel (r, c) covers level-0 [r*d, (r+1)*d); skimage fills pixels whose centre (integer coordinate) is inside
    return polygon(ring[:, 1] / downsample - 0.5, ring[:, 0] / downsample - 0.5, shape)


def rasterize(
    polygons: Sequence[Polygon],
    class_index: Mapping[str, int],
    shape: tuple[int, int],
    downsample: float = 1.0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 label image of ``shape`` (rows, cols) at ``downsample`` (level-0 pixels per pixel).

    Pixel (r, c) takes the class of the last polygon containing its centre; 255 where none does.
    ``class_index`` maps class names to label values; mapping a name to 255 makes it an exclusion region
    (e.g. CAMELYON's ``_2`` group) that clears what earlier polygons painted. A polygon's holes are not
    painted by it (they keep whatever lies below, 255 if nothing). A name missing from ``class_index``
    is a :class:`DataError`.
    """
    if downsample <= 0:
        raise DataError(f"downsample must be positive, got {downsample}")
    shape = (int(shape[0]), int(shape[1]))
    label = np.full(shape, IGNORE, np.uint8) if out is None else out
    for poly in polygons:
        if poly.class_name not in class_index:
            raise DataError(f"annotation class {poly.class_name!r} is not one of {sorted(class_index)}")
        value = int(class_index[poly.class_name])
        if not 0 <= value <= 255:
            raise DataError(f"class {poly.class_name!r}: label value {value} does not fit uint8")
        rr, cc = _fill(poly.exterior, shape, downsample)
        if not len(rr):
            continue  # smaller than a pixel at this resolution, or outside the image
        if not poly.holes:
            label[rr, cc] = value
            continue
        r0, c0 = rr.min(), cc.min()
        region = np.zeros((rr.max() - r0 + 1, cc.max() - c0 + 1), bool)  # the polygon's bounding box
        region[rr - r0, cc - c0] = True
        for hole in poly.holes:
            hr, hc = _fill(hole, shape, downsample)
            inside = (hr >= r0) & (hr < r0 + region.shape[0]) & (hc >= c0) & (hc < c0 + region.shape[1])
            region[hr[inside] - r0, hc[inside] - c0] = False
        view = label[r0 : r0 + region.shape[0], c0 : c0 + region.shape[1]]
        view[region] = value
    return label
