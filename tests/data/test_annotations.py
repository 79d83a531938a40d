import json

import numpy as np
import pytest

from scripts.data.annotations import IGNORE, Polygon, rasterize, read_annotations
from scripts.errors import DataError


def square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def feature(geometry, cls=None, name=None):
    props = {"objectType": "annotation"}
    if cls:
        props["classification"] = {"name": cls, "color": [200, 0, 0]}
    if name:
        props["name"] = name
    return {"type": "Feature", "geometry": geometry, "properties": props}


def test_geojson_polygon_multipolygon_hole(tmp_path):
    fc = {
        "type": "FeatureCollection",
        "features": [
            feature({"type": "Polygon", "coordinates": [square(0, 0, 100, 100), square(40, 40, 60, 60)]}, "Tumor"),
            feature(
                {"type": "MultiPolygon", "coordinates": [[square(200, 0, 300, 50)], [square(200, 100, 250, 150)]]},
                "Stroma",
            ),
            feature({"type": "Polygon", "coordinates": [square(0, 200, 10, 210)]}, name="Necrosis"),  # name fallback
            feature({"type": "Point", "coordinates": [5, 5]}),  # no area: skipped, even without a class
        ],
    }
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps(fc))
    polys = read_annotations(path)
    assert [p.class_name for p in polys] == ["Tumor", "Stroma", "Stroma", "Necrosis"]
    assert len(polys[0].holes) == 1 and polys[0].exterior.shape == (5, 2)
    np.testing.assert_array_equal(polys[1].exterior[1], [300, 0])  # (x, y)
    # a bare list of features and a single feature are accepted too
    path.write_text(json.dumps(fc["features"][:2]))
    assert len(read_annotations(path)) == 3
    path.write_text(json.dumps(fc["features"][0]))
    assert len(read_annotations(path)) == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"type": "FeatureCollection", "features": [', "not valid GeoJSON"),
        ('{"type": "Topology"}', "FeatureCollection"),
        (json.dumps([feature({"type": "Polygon", "coordinates": [square(0, 0, 1, 1)]})]), "has no class"),
        (json.dumps([feature({"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}, "A")]), "at least 3 points"),
        (json.dumps([feature({"type": "Polygon", "coordinates": [[["a", 0], [1, 1], [2, 2]]]}, "A")]), "not numbers"),
    ],
)
def test_geojson_errors_name_the_file(tmp_path, text, message):
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as e:
        read_annotations(path)
    assert str(path) in str(e.value)


ASAP = """<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
    <Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="2" X="100" Y="100" />
        <Coordinate Order="0" X="0" Y="0" />
        <Coordinate Order="1" X="100,5" Y="0" />
        <Coordinate Order="3" X="0" Y="100" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 1" Type="Polygon" PartOfGroup="_2" Color="#64FE2E">
      <Coordinates>
        <Coordinate Order="0" X="10" Y="10" /><Coordinate Order="1" X="20" Y="10" />
        <Coordinate Order="2" X="20" Y="20" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Dot 1" Type="Dot" PartOfGroup="None">
      <Coordinates><Coordinate Order="0" X="1" Y="1" /></Coordinates>
    </Annotation>
  </Annotations>
  <AnnotationGroups><Group Name="_0" PartOfGroup="None" Color="#FF0000"><Attributes /></Group></AnnotationGroups>
</ASAP_Annotations>
"""


def test_asap_xml(tmp_path):
    path = tmp_path / "tumor_001.xml"
    path.write_text(ASAP)
    polys = read_annotations(path)
    assert [p.class_name for p in polys] == ["_0", "_2"]
    np.testing.assert_allclose(polys[0].exterior, [[0, 0], [100.5, 0], [100, 100], [0, 100]])  # sorted by Order


@pytest.mark.parametrize(
    "text, message",
    [
        ("<ASAP_Annotations><Annotations><Annotation", "not valid XML"),
        ("<Other/>", "ASAP_Annotations"),
        (ASAP.replace('PartOfGroup="_2"', 'PartOfGroup="None"'), "belongs to no group"),
        (ASAP.replace('X="10"', 'X="ten"'), "not a number"),
    ],
)
def test_asap_errors_name_the_file(tmp_path, text, message):
    path = tmp_path / "bad.xml"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as e:
        read_annotations(path)
    assert str(path) in str(e.value)


def test_missing_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_annotations(tmp_path / "none.geojson")
    with pytest.raises(DataError, match="unknown annotation format"):
        read_annotations(tmp_path / "a.csv")


def test_rasterize_square_exact():
    poly = Polygon("a", np.array(square(64, 32, 128, 96), float), [])
    full = rasterize([poly], {"a": 1}, (200, 200), 1.0)
    assert (full == 1).sum() == 64 * 64
    assert full[32:96, 64:128].min() == 1 and full[31, 64] == IGNORE and full[32, 128] == IGNORE
    coarse = rasterize([poly], {"a": 1}, (6, 6), 32.0)  # pixel (r, c) covers level-0 [32r, 32r+32)
    expected = np.full((6, 6), IGNORE, np.uint8)
    expected[1:3, 2:4] = 1
    np.testing.assert_array_equal(coarse, expected)


def test_rasterize_hole_order_and_exclusion():
    outer = Polygon("a", np.array(square(0, 0, 10, 10), float), [np.array(square(2, 2, 8, 8), float)])
    label = rasterize([outer], {"a": 0}, (12, 12))
    assert label[5, 5] == IGNORE and label[1, 1] == 0 and (label == 0).sum() == 100 - 36
    # later polygons override earlier ones; a hole keeps what lies below it
    under = Polygon("b", np.array(square(0, 0, 12, 12), float), [])
    label = rasterize([under, outer], {"a": 0, "b": 1}, (12, 12))
    assert label[5, 5] == 1 and label[1, 1] == 0 and label[11, 11] == 1
    excl = Polygon("_2", np.array(square(0, 0, 4, 4), float), [])
    label = rasterize([under, excl], {"b": 1, "_2": IGNORE}, (12, 12))
    assert (label == IGNORE).sum() == 16
    with pytest.raises(DataError, match="'c'"):
        rasterize([Polygon("c", outer.exterior, [])], {"a": 0}, (12, 12))
