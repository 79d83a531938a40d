"""Bad inputs to the datalist, the adapters, masks, images and annotations (issue 16: adapters, findings 4 and 5).

Each case asserts a :class:`DataError` whose one-line message names the file (or setting) and the problem, and
that no datalist (nor a temporary file) is left behind. The last tests run the command line in a subprocess.
"""

import errno
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import scripts.data.datalist as datalist
from scripts.data import adapters, annotations, slides
from scripts.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["bg", "fg"]


# ------------------------------------------------------------------------------------------------ helpers


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def rgb(h=64, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def two_class_mask(fg=1):
    mask = np.zeros((64, 64), np.uint8)
    mask[:24] = fg
    return mask


def mask_folder(root: Path, masks: dict, splits: dict | None = None, csv: str | None = None) -> Path:
    """``images/``, ``masks/`` and ``labels.csv`` for :func:`adapters.from_mask_folder` (``masks``: name -> array)."""
    for i, (name, mask) in enumerate(masks.items()):
        save(root / "images" / f"{name}.png", rgb(*mask.shape, seed=i))
        save(root / "masks" / f"{name}.png", mask)
    splits = splits or {name: ("training" if i == 0 else "validation") for i, name in enumerate(masks)}
    (root / "labels.csv").write_text(csv or "name,split\n" + "".join(f"{n},{s}\n" for n, s in splits.items()))
    return root


def assert_no_output(out: Path) -> None:
    assert not out.exists(), f"{out} was written"
    if out.parent.exists():
        assert not [p.name for p in out.parent.iterdir() if "tmp" in p.name], "temporary files left behind"


def raises(run, out: Path, culprit: str, message: str) -> str:
    """Run; expect a one-line DataError naming ``culprit`` and matching ``message``; nothing written to ``out``."""
    with pytest.raises(DataError, match=message) as err:
        run()
    text = str(err.value)
    assert culprit in text and "\n" not in text, text
    assert_no_output(out)
    return text


def png_bomb(path: Path, width: int, height: int) -> Path:
    """A 1-bit PNG whose header claims width x height pixels: a few dozen bytes, no pixel data."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)
    return path


# --------------------------------------------------------------------------------------- datalist validation


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def entry(image, label=(1, 0), **kw):
    return {"image": image, "label": list(label), **kw}


GOOD = {"classes": CLASSES, "training": [entry("a.png"), entry("b.png", (0, 1))], "validation": [entry("c.png")]}


@pytest.mark.parametrize(
    "case, data, require, message",
    [
        ("no classes", {k: v for k, v in GOOD.items() if k != "classes"}, ("training",), "no 'classes' list"),
        ("empty classes", {**GOOD, "classes": []}, ("training",), "no classes given"),
        ("duplicate classes", {**GOOD, "classes": ["bg", "bg"]}, ("training",), "unique and non-empty"),
        ("one string", {**GOOD, "classes": "tumor"}, ("training",), "must be a list of strings"),
        ("non-string classes", {**GOOD, "classes": [0, 1]}, ("training",), "must be a list of strings"),
        (
            "label length",
            {**GOOD, "training": [entry("a.png", (1, 0, 1))]},
            ("training",),
            r"training\[0\] \(a.png\): label \[1, 0, 1\] is not a multi-hot vector of 0/1 over the 2 classes",
        ),
        (
            "tag value 2",
            {**GOOD, "training": [entry("a.png", (2, 0))]},
            ("training",),
            r"training\[0\] \(a.png\): label \[2, 0\] is not a multi-hot",
        ),
        ("label as string", {**GOOD, "training": [entry("a.png", ("1", "0"))]}, ("training",), "not a multi-hot"),
        (
            "bad location",
            {**GOOD, "training": [entry("a.png", location=[-4, 0], size=[8, 8])]},
            ("training",),
            "'location' must be two integers >= 0",
        ),
        ("entry without image", {**GOOD, "training": [{"label": [1, 0]}]}, ("training",), "'image' path"),
        ("empty training", {**GOOD, "training": []}, ("training",), "the training split is empty"),
        (
            "missing validation",
            {k: v for k, v in GOOD.items() if k != "validation"},
            ("training", "validation"),
            "the validation split is missing; this stage needs training and validation",
        ),
        (
            "duplicate patch",
            {**GOOD, "training": [entry("a.png", location=[0, 56], size=[112, 112])] * 2},
            ("training",),
            r"training entries 0 and 1 are the same sample \(a.png at location \[0, 56\]",
        ),
        (
            "leak",
            {**GOOD, "validation": [entry("./b.png")]},
            ("training",),
            r"image ./b.png is in both training \(entry 1\) and validation \(entry 0\); .* leaks",
        ),
        ("ignore index", {**GOOD, "mask_ignore_index": 300}, ("training",), "mask_ignore_index must be an integer"),
    ],
)
def test_validate_datalist_refuses(tmp_path, case, data, require, message):
    path = write_json(tmp_path / "d.json", data)
    with pytest.raises(DataError, match=message) as err:
        datalist.validate_datalist(path, require=require)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_validate_datalist_accepts_and_reads_classes(tmp_path):
    path = write_json(tmp_path / "d.json", {**GOOD, "mask_ignore_index": 4})
    assert datalist.validate_datalist(path, require=("training", "validation"))["classes"] == CLASSES
    # patches of one image at different locations are distinct samples
    patches = [entry("a.png", location=[0, x], size=[8, 8]) for x in (0, 8)]
    datalist.validate_datalist(write_json(tmp_path / "p.json", {**GOOD, "training": patches}))


def test_read_classes_refuses_a_single_string(tmp_path):
    """HEAD iterated the string: 'tumor' became the five classes t, u, m, o, r."""
    path = write_json(tmp_path / "d.json", {**GOOD, "classes": "tumor"})
    with pytest.raises(DataError, match=f"{path}: 'classes' must be a list of strings, got 'tumor'"):
        datalist.read_classes(path)


def test_write_datalist_refuses_duplicates_and_leaks(tmp_path):
    out = tmp_path / "d.json"
    raises(
        lambda: datalist.write_datalist(out, CLASSES, {"training": [entry("a.png"), entry("a.png")]}),
        out,
        str(out),
        "training entries 0 and 1 are the same sample",
    )
    raises(
        lambda: datalist.write_datalist(out, CLASSES, {"training": [entry("a.png")], "test": [entry("a.png")]}),
        out,
        str(out),
        "is in both training .* and test",
    )


def test_write_datalist_disk_full_names_the_datalist(tmp_path, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full)
    out = tmp_path / "d.json"
    raises(
        lambda: datalist.write_datalist(out, CLASSES, {"training": [entry("a.png")]}),
        out,
        f"{out}: cannot write the datalist",
        r"\(No space left on device\)$",
    )


# ------------------------------------------------------------------------------------------- mask values


def mask_datalist(tmp_path: Path, masks: dict, labels: dict | None = None, **extra) -> Path:
    for name, mask in masks.items():
        save(tmp_path / f"{name}.png", mask)
    labels = labels or {}
    entries = [entry(f"img_{n}.png", labels.get(n, (1, 1)), mask=f"{n}.png") for n in masks]
    data = {"classes": CLASSES, "training": [entry("train.png")], "validation": entries, **extra}
    return write_json(tmp_path / "d.json", data)


@pytest.mark.parametrize(
    "case, mask, message",
    [
        (
            "value 7",
            np.where(two_class_mask() > 0, 7, 0).astype(np.uint8),
            r"m.png: mask values \[7\] are outside the classes 0..1 \['bg', 'fg'\] or \[255\] \(ignored\)",
        ),
        ("x 100", (two_class_mask() * 100).astype(np.uint8), r"mask values \[100\] .* look scaled by 100"),
        ("0/255", two_class_mask(255), r"m.png: holds 255 but no pixel of \['fg'\], .* looks saved as 0/255"),
    ],
)
def test_check_mask_values_refuses(tmp_path, case, mask, message):
    path = mask_datalist(tmp_path, {"m": mask})
    with pytest.raises(DataError, match=message) as err:
        datalist.check_mask_values(path, "validation")
    assert "\n" not in str(err.value)


def test_check_mask_values_reads_each_mask_once_and_accepts_ignore_values(tmp_path, monkeypatch):
    mask = two_class_mask()
    mask[-4:] = 255  # unlabelled: ignored by the metrics
    mask[-8:-4] = 4  # the declared mask_ignore_index
    path = mask_datalist(tmp_path, {"m": mask, "n": two_class_mask()}, mask_ignore_index=4)
    data = json.loads(path.read_text())
    data["validation"] += [dict(e, location=[0, 0], size=[8, 8]) for e in data["validation"]]  # same masks again
    write_json(path, data)
    reads = []
    real = datalist.read_mask
    monkeypatch.setattr(datalist, "read_mask", lambda p: reads.append(Path(p).name) or real(p))
    assert datalist.check_mask_values(path, "validation") == 2
    assert sorted(reads) == ["m.png", "n.png"]
    # without the declaration, 4 is a bad value
    del data["mask_ignore_index"]
    write_json(path, data)
    with pytest.raises(DataError, match=r"m.png: mask values \[4\] are outside the classes"):
        datalist.check_mask_values(path, "validation")


# ----------------------------------------------------------------------------- adapters: masks into tags


@pytest.mark.parametrize(
    "case, mask, message",
    [
        (
            "0/255",
            two_class_mask(255),
            r"b.png: mask values \[255\] are outside the classes 0..1 \['bg', 'fg'\]; it looks saved as 0/255",
        ),
        (
            "value 7",
            np.where(np.arange(64)[:, None] < 8, 7, two_class_mask()).astype(np.uint8),
            r"b.png: mask values \[7\] are outside the classes 0..1 \['bg', 'fg'\]$",
        ),
        ("x 100", (two_class_mask() * 100).astype(np.uint8), r"mask values \[100\] .* look scaled by 100"),
    ],
)
def test_from_mask_folder_refuses_masks_outside_the_classes(tmp_path, case, mask, message):
    """HEAD tagged these patches from the valid pixels only (GlaS 'gland 0.0 %') and exited 0."""
    root = mask_folder(tmp_path / "data", {"a": two_class_mask(), "b": mask})
    out = tmp_path / "out" / "datalist.json"
    raises(lambda: adapters.from_mask_folder(root, out, CLASSES), out, str(root / "masks" / "b.png"), message)


def test_glas_refuses_a_mask_saved_as_0_255(tmp_path):
    root = mask_folder(
        tmp_path / "glas",
        {"train_1": two_class_mask(), "testA_1": two_class_mask(255)},
        {"train_1": "train", "testA_1": "dev"},
    )
    out = tmp_path / "out" / "datalist.json"
    raises(lambda: adapters.glas(root, out), out, "testA_1.png", r"\['non-gland', 'gland'\]; it looks saved as 0/255")


def test_from_mask_folder_ignore_index_255_is_declared(tmp_path):
    mask = two_class_mask()
    mask[-8:] = 255
    root = mask_folder(tmp_path / "data", {"a": mask, "b": two_class_mask()})
    out = adapters.from_mask_folder(root, tmp_path / "d.json", CLASSES, 32, 32, ignore_index=255)
    data = json.loads(Path(out).read_text())
    assert data["mask_ignore_index"] == 255 and datalist.check_mask_values(out, "training") == 1


def test_histoseg_refuses_a_mask_value_outside_the_classes(tmp_path):
    save(tmp_path / "training" / "p-[1 0 0 1].png", rgb())
    save(tmp_path / "val" / "img" / "x.png", rgb())
    save(tmp_path / "val" / "mask" / "x.png", np.full((64, 64), 9, np.uint8))
    out = tmp_path / "out" / "d.json"
    raises(
        lambda: adapters.luad_histoseg(tmp_path, out),
        out,
        "x.png",
        r"mask values \[9\] are outside the classes 0..3 .* or \[4\] \(ignored\)",
    )


def test_from_csv_mask_saved_as_0_255(tmp_path):
    save(tmp_path / "a.png", rgb())
    save(tmp_path / "a_mask.png", two_class_mask(255))
    (tmp_path / "tiles.csv").write_text('path,labels,mask\na.png,"bg,fg",a_mask.png\n')
    out = tmp_path / "out" / "d.json"
    raises(
        lambda: adapters.from_csv(tmp_path / "tiles.csv", out),
        out,
        "a_mask.png",
        r"holds 255 but no pixel of \['fg'\], which .*tiles.csv, line 2 is tagged with; it looks saved as 0/255",
    )


# ------------------------------------------------------------------------------------ adapters: CSV files


def test_bom_csv_is_read(tmp_path):
    """HEAD: 'missing ['name']' (the BOM stuck to the first column name)."""
    root = mask_folder(tmp_path / "data", {"a": two_class_mask(), "b": two_class_mask()})
    (root / "labels.csv").write_bytes("name,split\na,training\nb,validation\n".encode("utf-8-sig"))
    data = json.loads(Path(adapters.from_mask_folder(root, tmp_path / "d.json", CLASSES, 32, 32)).read_text())
    assert len(data["training"]) == 4 and len(data["validation"]) == 4
    save(tmp_path / "t.png", rgb())
    (tmp_path / "tiles.csv").write_bytes('path,labels\nt.png,"bg,fg"\n'.encode("utf-8-sig"))
    assert json.loads(Path(adapters.from_csv(tmp_path / "tiles.csv", tmp_path / "c.json")).read_text())["classes"]


def test_non_utf8_csv_names_the_line(tmp_path):
    root = mask_folder(tmp_path / "data", {"a": two_class_mask(), "b": two_class_mask()})
    (root / "labels.csv").write_bytes("name,split\na,training\nb,validation\n# Gewebe: Drüse\n".encode("latin-1"))
    out = tmp_path / "out" / "d.json"
    raises(
        lambda: adapters.from_mask_folder(root, out, CLASSES),
        out,
        f"{root / 'labels.csv'}, line 4",
        r"not UTF-8 text \(byte 0xfc\); save the CSV as UTF-8",
    )


def test_duplicate_rows_in_labels_csv(tmp_path):
    """HEAD: the image's patches were listed twice."""
    root = mask_folder(
        tmp_path / "data",
        {"a": two_class_mask(), "b": two_class_mask()},
        csv="name,split\na,training\nb,validation\na,training\n",
    )
    out = tmp_path / "out" / "d.json"
    raises(
        lambda: adapters.from_mask_folder(root, out, CLASSES),
        out,
        f"{root / 'labels.csv'}, line 4",
        "name 'a' is already listed on line 2; remove the duplicate row",
    )


def test_duplicate_rows_in_from_csv(tmp_path):
    save(tmp_path / "a.png", rgb())
    (tmp_path / "tiles.csv").write_text("path,labels\na.png,bg\na.png,fg\n")
    out = tmp_path / "out" / "d.json"
    raises(
        lambda: adapters.from_csv(tmp_path / "tiles.csv", out),
        out,
        "tiles.csv, line 3",
        "path 'a.png' is already listed on line 2",
    )


def test_same_image_in_two_splits_leaks(tmp_path):
    """labels.csv naming one image once per split is caught by the datalist check (HEAD: exit 0, leaked)."""
    save(tmp_path / "a.png", rgb())
    save(tmp_path / "b.png", rgb(seed=1))
    (tmp_path / "tiles.csv").write_text("path,labels,split\na.png,bg,training\nb.png,fg,training\n./a.png,bg,test\n")
    out = tmp_path / "out" / "d.json"
    raises(
        lambda: adapters.from_csv(tmp_path / "tiles.csv", out),
        out,
        str(out),
        r"image ../a.png is in both training \(entry 0\) and test \(entry 0\); an image in two splits leaks",
    )


# -------------------------------------------------------------------------------------- adapters: classes


@pytest.mark.parametrize("classes", ["tumor", " tumor "])
def test_classes_as_one_string_is_refused(tmp_path, classes):
    """HEAD: from_mask_folder iterated the string: five classes t, u, m, o, r."""
    root = mask_folder(tmp_path / "data", {"a": two_class_mask(), "b": two_class_mask()})
    out = tmp_path / "out" / "d.json"
    raises(
        lambda: adapters.from_mask_folder(root, out, classes),
        out,
        "classes",
        r"classes: got the single name .*tumor.*, not a list; give the names as a list",
    )


@pytest.mark.parametrize(
    "classes", ["[non-gland,gland]", '["non-gland", "gland"]', "non-gland,gland", ("non-gland", "gland")]
)
def test_classes_as_a_list_string(tmp_path, classes):
    """HEAD: '[non-gland,gland]' (what fire passes for --classes '[non-gland,gland]') became 16 one-letter classes."""
    root = mask_folder(tmp_path / "data", {"a": two_class_mask(), "b": two_class_mask()})
    out = adapters.from_mask_folder(root, tmp_path / "d.json", classes, 32, 32)
    assert json.loads(Path(out).read_text())["classes"] == ["non-gland", "gland"]


def test_from_csv_label_typo(tmp_path):
    """HEAD: with classes inferred, 'tumour' on one row became a third class."""
    for name in "abc":
        save(tmp_path / f"{name}.png", rgb())
    (tmp_path / "tiles.csv").write_text('path,labels\na.png,tumor\nb.png,"tumor,stroma"\nc.png,tumour\n')
    out = tmp_path / "out" / "d.json"
    raises(
        lambda: adapters.from_csv(tmp_path / "tiles.csv", out),
        out,
        "tiles.csv, line 4",
        r"label 'tumour' \(1 row\(s\)\) looks like a typo of 'tumor' \(2 row\(s\)\); fix it, or pass classes",
    )
    # with classes given, the unknown name is an error unless the user adds it
    raises(
        lambda: adapters.from_csv(tmp_path / "tiles.csv", out, classes="tumor,stroma"),
        out,
        "tiles.csv, line 4",
        r"unknown class\(es\) \['tumour'\]",
    )
    data = adapters.from_csv(tmp_path / "tiles.csv", out, classes="[tumor,stroma,tumour]")
    assert json.loads(Path(data).read_text())["classes"] == ["tumor", "stroma", "tumour"]


def test_from_csv_classes_one_string(tmp_path):
    save(tmp_path / "a.png", rgb())
    (tmp_path / "tiles.csv").write_text("path,labels\na.png,tumor\n")
    out = tmp_path / "out" / "d.json"
    raises(
        lambda: adapters.from_csv(tmp_path / "tiles.csv", out, classes="tumor"), out, "classes", "single name 'tumor'"
    )
    one_class = adapters.from_csv(tmp_path / "tiles.csv", out, classes="tumor,")
    assert json.loads(Path(one_class).read_text())["classes"] == ["tumor"]


# --------------------------------------------------------------------------------------- decompression bomb


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # pytest resets the filter images.py sets
@pytest.mark.parametrize("pixels", ["100000x100000", "just over"])
def test_decompression_bomb_is_refused_with_the_limit(tmp_path, pixels):
    """HEAD: PIL's DecompressionBombError as a traceback; between the limit and twice it, a warning and the load."""
    from scripts.images import MAX_IMAGE_PIXELS

    side = 100_000 if pixels == "100000x100000" else int(MAX_IMAGE_PIXELS**0.5) + 1
    png_bomb(tmp_path / "bomb.png", side, side)
    (tmp_path / "tiles.csv").write_text("path,labels\nbomb.png,tumor\n")
    out = tmp_path / "out" / "d.json"
    assert MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS == 16384 * 16384
    raises(
        lambda: adapters.from_csv(tmp_path / "tiles.csv", out),
        out,
        str(tmp_path / "bomb.png"),
        f"image too large \\({side * side:,} pixels, over the limit of {MAX_IMAGE_PIXELS:,} pixels, "
        "scripts.images.MAX_IMAGE_PIXELS",
    )


# -------------------------------------------------------------------------------------------- annotations


def bowtie_geojson(path: Path) -> Path:
    ring = [[100, 100], [300, 300], [300, 100], [100, 300], [100, 100]]  # edges 0 and 2 cross at (200, 200)
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"classification": {"name": "tumor"}},
    }
    return write_json(path, {"type": "FeatureCollection", "features": [feature]})


def test_self_intersecting_polygon_repaired_with_shapely(tmp_path, caplog):
    polygons = annotations.read_annotations(bowtie_geojson(tmp_path / "a.geojson"))
    assert len(polygons) == 2 and all(p.class_name == "tumor" for p in polygons)
    assert "repaired with shapely.make_valid into 2 polygon(s)" in caplog.text


def test_touching_and_valid_rings_are_not_crossings():
    square = np.array([[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]], float)
    assert annotations._crossing(square) is None
    # a ring touching itself at a vertex (two squares sharing a corner), duplicated points: no proper crossing
    touching = np.array([[0, 0], [10, 0], [10, 10], [10, 10], [20, 10], [20, 20], [10, 20], [10, 10], [0, 10]], float)
    assert annotations._crossing(touching) is None


# ------------------------------------------------------------------------------------------------- slides


@pytest.fixture(scope="module")
def band_slide(tmp_path_factory) -> Path:
    """512 x 512 tiled JPEG TIFF, tissue in columns 0-383."""
    img = np.full((512, 512, 3), 245, np.uint8)
    img[:, :384] = (205, 120, 175)
    img = np.clip(img + np.random.default_rng(0).integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("slide") / "band.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            img,
            tile=(256, 256),
            compression="jpeg",
            photometric="rgb",
            resolution=(2e4, 2e4),
            resolutionunit="CENTIMETER",
        )
    return path


def polygon_file(path: Path, rings) -> Path:
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"classification": {"name": "tumor"}},
        }
        for ring in rings
    ]
    return write_json(path, {"type": "FeatureCollection", "features": features})


def box(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


@pytest.mark.parametrize(
    "case, rings, message",
    [
        (
            "outside",
            [box(0, 0, 256, 256), box(5000, 5000, 5600, 5600)],
            r"1 of 2 polygon\(s\) lie outside the slide band.tif \(512 x 512 px at level 0\); the annotations span "
            r"x 0..5600, y 0..5600",
        ),
        ("lon/lat", [box(-74.01, 40.70, -73.95, 40.75)], r"lie outside the slide .* another CRS such as lon/lat"),
        ("lon/lat, positive", [box(4.88, 52.36, 4.91, 52.38)], "every polygon is smaller than one pixel of the slide"),
    ],
)
def test_polygons_outside_the_slide(tmp_path, band_slide, case, rings, message):
    """HEAD: the slide's patches were dropped with only a warning (exit 0; here the only slide: 'no entries')."""
    ann = polygon_file(tmp_path / "a.geojson", rings)
    (tmp_path / "s.csv").write_text(f"slide,annotation,split\n{band_slide},a.geojson,training\n")
    out = tmp_path / "out" / "d.json"
    raises(
        lambda: slides.from_slides(str(tmp_path / "s.csv"), str(out), patch_size=128, background_class="normal"),
        out,
        str(ann),
        message,
    )


def test_validation_split_emptied_by_its_slides(tmp_path, band_slide):
    """HEAD: a warning, and a datalist with an empty validation split (exit 0)."""
    polygon_file(tmp_path / "a.geojson", [box(420, 0, 512, 512)])  # on the glass only: no annotated tissue
    (tmp_path / "s.csv").write_text(
        f"slide,labels,annotation,split\n{band_slide},tumor,,training\n"
        f"{band_slide.parent / 'copy.tif'},,a.geojson,validation\n"
    )
    (band_slide.parent / "copy.tif").write_bytes(band_slide.read_bytes())
    out = tmp_path / "out" / "d.json"
    raises(
        lambda: slides.from_slides(str(tmp_path / "s.csv"), str(out), patch_size=128),
        out,
        "s.csv",
        r"the validation split's 1 slide\(s\) gave no patch \(first: .*s.csv row 3, copy.tif\)",
    )


def test_same_slide_listed_twice(tmp_path, band_slide):
    (tmp_path / "s.csv").write_text(f"slide,labels,split\n{band_slide},tumor,training\n{band_slide},tumor,val\n")
    out = tmp_path / "out" / "d.json"
    raises(
        lambda: slides.from_slides(str(tmp_path / "s.csv"), str(out)),
        out,
        "s.csv row 3",
        "slide .*band.tif is already listed .*s.csv row 2",
    )


def test_slides_classes_one_string(tmp_path, band_slide):
    (tmp_path / "s.csv").write_text(f"slide,labels\n{band_slide},tumor\n")
    out = tmp_path / "out" / "d.json"
    raises(
        lambda: slides.from_slides(str(tmp_path / "s.csv"), str(out), classes="tumor"),
        out,
        "classes",
        "single name 'tumor'",
    )


# ------------------------------------------------------------------------------------------- command line


def cli(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "bundle")}
    return subprocess.run(
        [sys.executable, "-m", "scripts.data", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_error_line(result, culprit: str, message: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert culprit in lines[0] and message in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_decompression_bomb(tmp_path):
    png_bomb(tmp_path / "bomb.png", 100_000, 100_000)
    (tmp_path / "tiles.csv").write_text("path,labels\nbomb.png,tumor\n")
    out = tmp_path / "out" / "d.json"
    result = cli("from_csv", "--csv_path", tmp_path / "tiles.csv", "--output", out)
    assert_one_error_line(result, str(tmp_path / "bomb.png"), "over the limit of 268,435,456 pixels")
    assert_no_output(out)


def test_cli_classes_list_with_dashes_and_a_0_255_mask(tmp_path):
    root = mask_folder(tmp_path / "data", {"a": two_class_mask(), "b": two_class_mask(255)})
    out = tmp_path / "out" / "d.json"
    result = cli("from_mask_folder", "--data_dir", root, "--output", out, "--classes", "[non-gland,gland]")
    assert_one_error_line(result, str(root / "masks" / "b.png"), "['non-gland', 'gland']; it looks saved as 0/255")
    assert_no_output(out)


def test_cli_non_utf8_labels(tmp_path):
    root = mask_folder(tmp_path / "data", {"a": two_class_mask(), "b": two_class_mask()})
    (root / "labels.csv").write_bytes(b"name,split\na,training\nb,valid\xe9tion\n")
    out = tmp_path / "out" / "d.json"
    result = cli("from_mask_folder", "--data_dir", root, "--output", out, "--classes", "bg,fg")
    assert_one_error_line(result, f"{root / 'labels.csv'}, line 3", "not UTF-8 text (byte 0xe9)")
    assert_no_output(out)
