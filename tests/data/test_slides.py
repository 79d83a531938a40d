import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import shared

from scripts.data.slides import from_slides
from scripts.errors import DataError
from scripts.wsi.reader import open_slide, read_lowres, slide_mpp, tissue_mask

PINK = (205, 120, 175)


def listed(*args, **kwargs) -> dict:
    """Run the adapter and read back the datalist it wrote."""
    return json.loads(Path(from_slides(*args, **kwargs)).read_text())


def noisy(img, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(img.astype(np.int16) + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)


def write_slide(path, img, mpp=0.5, tile=(256, 256), pyramid=False):
    """A tiled JPEG TIFF as a scanner would write it (optionally with a 2x level), resolution in centimetre."""
    res = (1e4 / mpp, 1e4 / mpp)
    kw = dict(compression="jpeg", photometric="rgb", resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path) as tif:
        if tile:
            tif.write(img, tile=tile, resolution=res, **kw)
        else:
            tif.write(img, rowsperstrip=64, resolution=res, **kw)
        if pyramid:
            tif.write(img[::2, ::2], tile=tile, subfiletype=1, resolution=(res[0] / 2, res[1] / 2), **kw)
    return path


def blob_image(size=1024):
    img = np.full((size, size, 3), 245, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    img[(yy - 512) ** 2 + (xx - 480) ** 2 < 300**2] = PINK
    return noisy(img)


def band_image():
    """Tissue in columns 0-767 of a 1024 x 1024 slide, white in columns 768-1023."""
    img = np.full((1024, 1024, 3), 245, np.uint8)
    img[:, :768] = PINK
    return noisy(img, 1)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    return {
        "blob": write_slide(d / "blob.tif", blob_image()),
        "band": write_slide(d / "band.tif", band_image()),
        "pyramid": write_slide(d / "pyramid.tif", blob_image(), pyramid=True),
        "white": write_slide(d / "white.tif", noisy(np.full((512, 512, 3), 246, np.uint8))),
        "strips": write_slide(d / "strips.tif", blob_image(512), tile=None),
    }


def write_csv(path, rows, header="slide,labels,split"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def assert_nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".") and "tmp" in p.name]


# ------------------------------------------------------------------------------------------- slide access


@pytest.mark.parametrize("backend", ["cucim", "openslide"])
def test_tissue_mask_excludes_white(slides, backend):
    reader, wsi = open_slide(slides["blob"], backend)
    mask, ds = tissue_mask(reader, wsi)
    assert ds == 32 and mask.shape == (32, 32)
    assert mask[16, 15] and not mask[:3, :3].any() and not mask[-3:, -3:].any()
    assert abs(mask.mean() - np.pi * 300**2 / 1024**2) < 0.03
    assert slide_mpp(slides["blob"], reader, wsi) == pytest.approx(0.5)


def test_pyramid_level_gives_nearly_the_same_mask(slides):
    reader, wsi = open_slide(slides["pyramid"])
    assert reader.get_level_count(wsi) == 2
    rgb, ds = read_lowres(reader, wsi, 32)  # level 1 (downsample 2) shrunk 16x
    assert ds == 32 and rgb.shape == (32, 32, 3)
    reader0, wsi0 = open_slide(slides["blob"])
    # level 1 is compressed separately: only a few pixels on the blob's border may differ
    assert (tissue_mask(reader, wsi)[0] != tissue_mask(reader0, wsi0)[0]).sum() <= 8


def test_open_slide_errors(slides, tmp_path):
    with pytest.raises(DataError, match="not found"):
        open_slide(tmp_path / "missing.svs")
    with pytest.raises(DataError, match="unknown slide backend"):
        open_slide(slides["blob"], "pillow")
    with pytest.raises(DataError, match="not a tiled/pyramidal slide.*vips tiffsave") as e:
        open_slide(slides["strips"])
    assert str(slides["strips"]) in str(e.value)


# --------------------------------------------------------------------------------------------- the adapter


def test_slide_level_labels(slides, tmp_path, caplog):
    rows = [f'{slides["blob"]},"tumor, stroma",training', f"{slides['band']},stroma,val"]
    csv = write_csv(tmp_path / "slides.csv", rows)
    out = tmp_path / "datalist.json"
    with caplog.at_level(logging.INFO, logger="scripts.data.slides"):
        data = listed(str(csv), str(out), patch_size=256)
    assert json.loads(out.read_text()) == data
    assert data["classes"] == ["stroma", "tumor"]
    blob = data["training"]
    assert blob and all(e["label"] == [1, 1] and e["size"] == [256, 256] and e["level"] == 0 for e in blob)
    # 4 x 4 grid: the four centre patches are tissue, the four corners (outside the circle) are not
    locations = {tuple(e["location"]) for e in blob}
    assert {(256, 256), (256, 512), (512, 256), (512, 512)} <= locations
    assert not {(0, 0), (0, 768), (768, 0), (768, 768)} & locations
    band = data["validation"]
    assert {e["location"][1] for e in band} == {0, 256, 512} and len(band) == 12
    assert all(e["label"] == [1, 0] for e in band)
    assert all(e["image"] == "band.tif" or e["image"].endswith("band.tif") for e in band)
    assert "blob.tif: " in caplog.text and "patches of 16" in caplog.text


def test_level_one_locations_are_level0(slides, tmp_path):
    csv = write_csv(tmp_path / "slides.csv", [f"{slides['pyramid']},tumor,"])
    data = listed(str(csv), str(tmp_path / "d.json"), patch_size=128, level=1, min_tissue=0.9)
    locs = {tuple(e["location"]) for e in data["training"]}
    assert (256, 256) in locs and all(y % 256 == 0 and x % 256 == 0 for y, x in locs)
    assert all(e["level"] == 1 and e["size"] == [128, 128] for e in data["training"])


def geojson(path, features):
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def poly(x0, y0, x1, y1, cls):
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"classification": {"name": cls}},
    }


def test_polygon_tags(slides, tmp_path):
    # tumour over columns 0-383 of the tissue band (columns 0-767): column 256-511 patches are half tumour
    geojson(tmp_path / "band.geojson", [poly(0, 0, 384, 1024, "tumor")])
    csv = write_csv(tmp_path / "s.csv", [f"{slides['band']},band.geojson"], header="slide,annotation")
    data = listed(str(csv), str(tmp_path / "d.json"), patch_size=256, background_class="normal")
    assert data["classes"] == ["normal", "tumor"]
    by_col = {}
    for e in data["training"]:
        by_col.setdefault(e["location"][1], set()).add(tuple(e["label"]))
    assert by_col == {0: {(0, 1)}, 256: {(1, 1)}, 512: {(1, 0)}}
    # without a background class, tissue outside every polygon is unknown: those patches are dropped
    data = listed(str(csv), str(tmp_path / "d2.json"), patch_size=256, min_fraction=0.3)
    assert data["classes"] == ["tumor"]
    assert {e["location"][1] for e in data["training"]} == {0, 256}


def test_asap_groups_and_exclusion(slides, tmp_path):
    (tmp_path / "band.xml").write_text(
        "<ASAP_Annotations><Annotations>"
        '<Annotation Name="a" Type="Polygon" PartOfGroup="_0"><Coordinates>'
        '<Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="768" Y="0"/>'
        '<Coordinate Order="2" X="768" Y="1024"/><Coordinate Order="3" X="0" Y="1024"/></Coordinates></Annotation>'
        '<Annotation Name="b" Type="Polygon" PartOfGroup="_2"><Coordinates>'
        '<Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="256" Y="0"/>'
        '<Coordinate Order="2" X="256" Y="1024"/><Coordinate Order="3" X="0" Y="1024"/></Coordinates></Annotation>'
        "</Annotations></ASAP_Annotations>"
    )
    csv = write_csv(tmp_path / "s.csv", [f"{slides['band']},band.xml,test"], header="slide,annotation,split")
    data = listed(
        str(csv),
        str(tmp_path / "d.json"),
        patch_size=256,
        background_class="normal",
        group_map='{"_0": "tumor", "_1": "tumor", "_2": "ignore"}',
    )
    assert data["classes"] == ["normal", "tumor"]
    assert {e["location"][1] for e in data["test"]} == {256, 512}  # column 0 excluded, not "normal"
    assert all(e["label"] == [0, 1] for e in data["test"])


def test_cmu_cucim_and_openslide_list_identical_patches(tmp_path):
    slide = shared("wsi", "CMU-1-Small-Region.svs")
    csv = write_csv(tmp_path / "s.csv", [f"{slide},tissue,"])
    a = listed(str(csv), str(tmp_path / "cucim.json"), backend="cucim")
    b = listed(str(csv), str(tmp_path / "openslide.json"), backend="openslide")
    assert len(a["training"]) > 20
    assert a == b


def test_mpp_not_recorded_is_none():
    path = shared("wsi", "tcga-cr-7395-01a-01-ts1.svs")
    for backend in ("cucim", "openslide"):
        reader, wsi = open_slide(path, backend)
        assert slide_mpp(path, reader, wsi) is None
    cmu = shared("wsi", "CMU-1-Small-Region.svs")
    assert slide_mpp(cmu, *open_slide(cmu)) == pytest.approx(0.499)


# -------------------------------------------------------------------------------------------- bad inputs


def test_missing_slide_list(tmp_path):
    out = tmp_path / "d.json"
    with pytest.raises(DataError, match="slide list not found"):
        from_slides(str(tmp_path / "none.csv"), str(out))
    assert_nothing_written(out)


def test_slide_listed_but_missing(slides, tmp_path):
    csv = write_csv(tmp_path / "s.csv", [f"{slides['blob']},tumor,", "gone.svs,tumor,"])
    out = tmp_path / "d.json"
    with pytest.raises(DataError, match=r"s\.csv row 3: slide file not found: .*gone\.svs"):
        from_slides(str(csv), str(out))
    assert_nothing_written(out)


def test_corrupt_and_truncated_slides(slides, tmp_path):
    out = tmp_path / "d.json"
    (tmp_path / "garbage.svs").write_bytes(bytes(range(256)) * 40)
    data = slides["blob"].read_bytes()
    (tmp_path / "truncated.tif").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "header.tif").write_bytes(data[:100])
    for name, message in [
        ("garbage.svs", "cannot open the slide"),
        ("truncated.tif", "truncated slide file"),
        ("header.tif", "corrupt or truncated"),
    ]:
        csv = write_csv(tmp_path / "s.csv", [f"{slides['blob']},tumor,", f"{name},tumor,"])
        with pytest.raises(DataError, match=message) as e:
            from_slides(str(csv), str(out))
        assert name in str(e.value)
        assert_nothing_written(out)


def test_non_pyramidal_tiff(tmp_path):
    kidney = shared("wsi", "kidney-48-5.tif")
    csv = write_csv(tmp_path / "s.csv", [f"{kidney},tumor,"])
    out = tmp_path / "d.json"
    with pytest.raises(DataError, match="kidney-48-5.tif: not a tiled/pyramidal slide"):
        from_slides(str(csv), str(out))
    assert_nothing_written(out)


def test_slide_without_tissue(slides, tmp_path):
    csv = write_csv(tmp_path / "s.csv", [f"{slides['blob']},tumor,", f"{slides['white']},tumor,"])
    out = tmp_path / "d.json"
    with pytest.raises(DataError, match="white.tif: no tissue found"):
        from_slides(str(csv), str(out), backend="openslide")
    assert_nothing_written(out)


def test_unknown_class_and_bad_rows(slides, tmp_path):
    out = tmp_path / "d.json"
    csv = write_csv(tmp_path / "s.csv", [f"{slides['blob']},tumor,", f'{slides["band"]},"tumor,stroma",'])
    with pytest.raises(DataError, match=r"s\.csv row 3: unknown class\(es\) \['stroma'\]"):
        from_slides(str(csv), str(out), classes="tumor,normal")
    with pytest.raises(DataError, match="background_class 'x'"):
        from_slides(str(csv), str(out), classes=["tumor", "stroma"], background_class="x")
    csv = write_csv(tmp_path / "s.csv", [f"{slides['blob']},tumor,holdout"])
    with pytest.raises(DataError, match="row 2: unknown split 'holdout'"):
        from_slides(str(csv), str(out))
    csv = write_csv(tmp_path / "s.csv", [f"{slides['blob']},,"])
    with pytest.raises(DataError, match="row 2: no 'labels' and no 'annotation'"):
        from_slides(str(csv), str(out))
    csv = write_csv(tmp_path / "s.csv", [f"{slides['blob']},tumor"], header="slide,class")
    with pytest.raises(DataError, match="needs a 'slide' column"):
        from_slides(str(csv), str(out))
    assert_nothing_written(out)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("a.geojson", '{"type": "FeatureCollection", "features": [{"type": "Feat', "not valid GeoJSON"),
        ("a.xml", "<ASAP_Annotations><Annotations>", "not valid XML"),
        ("a.geojson", json.dumps([poly(0, 0, 10, 10, "tumor") | {"properties": {}}]), "has no class"),
    ],
)
def test_malformed_annotations(slides, tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    csv = write_csv(tmp_path / "s.csv", [f"{slides['band']},{name}"], header="slide,annotation")
    out = tmp_path / "d.json"
    with pytest.raises(DataError, match=message) as e:
        from_slides(str(csv), str(out))
    assert name in str(e.value)
    assert_nothing_written(out)


def test_unknown_annotation_class(slides, tmp_path):
    geojson(tmp_path / "a.geojson", [poly(0, 0, 300, 300, "Tumour")])
    csv = write_csv(tmp_path / "s.csv", [f"{slides['band']},a.geojson"], header="slide,annotation")
    out = tmp_path / "d.json"
    with pytest.raises(DataError, match=r"row 2 \(annotation .*a\.geojson\): unknown class\(es\) \['Tumour'\]"):
        from_slides(str(csv), str(out), classes=["tumor", "normal"])
    assert_nothing_written(out)


def test_monai_reads_the_listed_patches(slides, tmp_path):
    """The entries load with MONAI (paths resolved, (y, x) order, top-left locations)."""
    from monai.data import PatchWSIDataset, load_decathlon_datalist

    csv = write_csv(tmp_path / "s.csv", [f"{slides['band']},tumor,"])
    from_slides(str(csv), str(tmp_path / "d.json"), patch_size=256)
    entries = load_decathlon_datalist(str(tmp_path / "d.json"), data_list_key="training")
    entries = [e for e in entries if e["location"] == [768, 512]]
    assert len(entries) == 1
    ds = PatchWSIDataset(entries, reader="cucim", center_location=False)
    patch = np.asarray(ds[0]["image"])
    assert patch.shape == (3, 256, 256)
    assert np.abs(patch.mean((1, 2)) - PINK).max() < 10  # column 512 is tissue; (x=768) would be white
