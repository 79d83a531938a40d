"""apps/monailabel serving the bundle, in-process and through a real ``monailabel start_server``: a tile's label,
slide-region polygons where the viewer asked (and as the bundle's own slide inference has them), training on a
pathologist's corrections, and bad input as HTTP errors. Skipped where MONAI Label is not installed
(requirements-monailabel.txt)."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
import torch
from conftest import ROOT, shared
from PIL import Image

pytest.importorskip(
    "monailabel.interfaces.app", reason="MONAI Label is optional: pip install -r requirements-monailabel.txt"
)

from fastapi import HTTPException  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402
from monailabel_fixtures import (  # noqa: E402
    APP,
    MODEL,
    PURPLE,
    PathologyWSSSApp,
    bundle_copy,
    draw_polygons,
    iou,
    square_rgb,
    square_slide,
)

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def keep_the_bundle_modules():
    """MONAI Label unloads ``scripts.*`` and imports the served copy's on every request; afterwards the other tests
    must find the modules (classes, DataError, FlexibleUNet's backbone entry) they imported themselves."""
    from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE

    def ours(name):
        return name == "scripts" or name.startswith("scripts.")

    modules = {name: module for name, module in sys.modules.items() if ours(name)}
    backbones = dict(FLEXUNET_BACKBONE.register_dict)
    yield
    for name in [name for name in sys.modules if ours(name)]:
        del sys.modules[name]
    sys.modules.update(modules)
    FLEXUNET_BACKBONE.register_dict.clear()
    FLEXUNET_BACKBONE.register_dict.update(backbones)


REGION = {"location": [200, 150], "size": [400, 250], "level": 0}  # x 200..599, y 150..399 of the square slide
WSI = {"tile_size": [1024, 1024], "min_poly_area": 0, "output": "json"}  # what /infer/wsi's form adds


@pytest.fixture(scope="module")
def colour_app(tmp_path_factory):
    """The app on a per-pixel network (gland where red is dark), studies: a non-square tile and the square slide."""
    root = tmp_path_factory.mktemp("colour")
    studies = root / "studies"
    studies.mkdir()
    Image.fromarray(square_rgb()[100:400, 150:600]).save(studies / "tile.png")  # 300 x 450, the purple square inside
    square_slide(studies / "square.tif")
    (studies / "broken.svs").write_bytes(b"not a slide" * 10)
    bundle = bundle_copy(root / "bundle", "colour")
    return PathologyWSSSApp(str(APP), str(studies), {"bundle": str(bundle)}), studies, bundle


def test_infer_tile_gives_the_label_the_viewer_draws(colour_app):
    app, studies, _ = colour_app
    result = app.infer({"model": MODEL, "image": "tile", "device": "cpu"})
    label = np.asarray(Image.open(result["file"]))
    purple = (square_rgb()[100:400, 150:600] == PURPLE).all(-1)
    assert label.shape == (300, 450) and label.dtype == np.uint8  # the tile's own orientation
    np.testing.assert_array_equal(label, np.where(purple, 2, 1))  # class k as k + 1: stroma 1, gland 2, 0 unused
    assert app.info()["models"][MODEL]["labels"] == {"stroma": 1, "gland": 2}


def region_labels(app, image, region, **request):
    """``/infer/wsi`` in-process: the polygons of every tile drawn back into the region (H x W)."""
    result = app.infer_wsi({"model": MODEL, "image": image, "device": "cpu", **WSI, **region, **request})
    (w, h), labels = region["size"], app.info()["models"][MODEL]["labels"]
    out = np.zeros((h, w), np.uint8)
    for tile in result["params"]["annotations"]:
        drawn = draw_polygons(tile["annotation"], labels, region["location"], (h, w))
        out = np.where(drawn > 0, drawn, out)
    return out, result["params"]["annotations"]


def slide_inference_labels(bundle, path, output_dir, region):
    """The bundle's own slide inference (inference.json's ``slide_inference``) of the slide, cut to the region."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle), "device": "$torch.device('cpu')", "amp": False, "num_workers": 0})
    parser.update({"progress_bar": False})
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)["model"]
    parser.get_parsed_content("network").load_state_dict(state)
    summary = parser.get_parsed_content("slide_inference")([str(path)], str(output_dir))[0]
    labels = tifffile.imread(output_dir / os.path.basename(summary["outputs"]["labels"]), level=0)
    (x, y), (w, h) = region["location"], region["size"]
    return labels[y : y + h, x : x + w]


def test_a_40x_region_is_read_at_the_models_pixel_size(colour_app, tmp_path):
    """The square slide at 0.25 um/px (a 40x scan), the model at 0.5: the labels come back at the region's size, the
    square where it is (edges within a level-0 pixel). The resampling itself: tests/test_viewer.py."""
    app, _, _ = colour_app
    path = square_slide(tmp_path / "square_40x.tif", mpp=0.25)
    drawn, _ = region_labels(app, path, REGION)
    purple = (square_rgb()[150:400, 200:600] == PURPLE).all(-1)
    assert drawn.shape == purple.shape and iou(drawn == 2, purple) > 0.97 and iou(drawn == 1, ~purple) > 0.99


def test_slide_region_polygons_lie_where_the_viewer_asked(colour_app, tmp_path):
    app, studies, bundle = colour_app
    drawn, tiles = region_labels(app, "square", REGION)
    points = np.concatenate([np.asarray(c) for t in tiles for e in t["annotation"]["elements"] for c in e["contours"]])
    assert points[:, 0].min() >= 200 and points[:, 0].max() <= 599  # x inside the region
    assert points[:, 1].min() >= 150 and points[:, 1].max() <= 399  # y inside the region
    purple = (square_rgb()[150:400, 200:600] == PURPLE).all(-1)  # the square at rows 192-319, cols 256-383
    np.testing.assert_array_equal(drawn, np.where(purple, 2, 1))
    own = slide_inference_labels(bundle, studies / "square.tif", tmp_path, REGION)
    tissue = own != 255
    for index in (0, 1):
        assert iou(drawn[tissue] == index + 1, own[tissue] == index) == 1.0


def test_slide_region_agrees_with_slide_inference_on_a_real_slide(colour_app, tmp_path):
    """CMU-1-Small-Region, a 1200 x 800 region over two of MONAI Label's tiles: the per-pixel network's fragmented
    labels are the hardest case for polygons; drawn back they match the bundle's own slide inference."""
    app, _, bundle = colour_app
    slide = shared("wsi", "CMU-1-Small-Region.svs")
    region = {"location": [500, 900], "size": [1200, 800], "level": 0}
    drawn, _ = region_labels(app, str(slide), region)
    own = slide_inference_labels(bundle, slide, tmp_path, region)
    tissue = own != 255
    assert tissue.mean() > 0.5
    for index in (0, 1):
        assert iou(drawn[tissue] == index + 1, own[tissue] == index) >= 0.95


def test_bad_input_is_an_http_error_naming_the_problem(colour_app):
    app, studies, _ = colour_app
    with pytest.raises(HTTPException) as missing:
        app.infer({"model": MODEL, "image": "nothing", "device": "cpu"})
    assert missing.value.status_code == 404 and "'nothing': no such image" in missing.value.detail
    with pytest.raises(HTTPException) as broken:
        app.infer_wsi({"model": MODEL, "image": "broken", "device": "cpu", **WSI, **REGION})
    assert broken.value.status_code == 422 and "broken.svs: cannot open the slide" in broken.value.detail
    outside = {**REGION, "location": [700, 150]}
    with pytest.raises(HTTPException) as beyond:
        app.infer_wsi({"model": MODEL, "image": "square", "device": "cpu", **WSI, **outside})
    assert beyond.value.status_code == 422 and "does not lie inside the slide (768 x 512 pixels" in beyond.value.detail


def labelled_studies(root):
    """Two tiles of different sizes with a pathologist's labels in MONAI Label's datastore (labels/final): the
    purple square gland (2), some tissue stroma (1), the rest unpainted (0)."""
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for name, (y, x, h, w) in {"a": (100, 150, 300, 450), "b": (150, 200, 256, 320)}.items():
        rgb = square_rgb()[y : y + h, x : x + w]
        Image.fromarray(rgb).save(studies / f"{name}.png")
        label = np.where((rgb == PURPLE).all(-1), 2, 1).astype(np.uint8)
        label[:, : w // 4] = 0
        Image.fromarray(label).save(studies / "labels" / "final" / f"{name}.png")
    return studies


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_training_on_corrections_replaces_the_served_model(tmp_path):
    bundle = bundle_copy(tmp_path / "bundle", "flexible_unet")
    app = PathologyWSSSApp(str(APP), str(labelled_studies(tmp_path)), {"bundle": str(bundle)})
    before = md5(bundle / "models" / "model.pt")
    app.train({"model": MODEL, "max_epochs": 1, "val_split": 0.5, "device": "cpu"})
    saved = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert md5(bundle / "models" / "model.pt") != before
    assert saved["contract"]["classes"] == ["stroma", "gland", "lymphocytes"]  # the served model's classes kept
    label = np.asarray(Image.open(app.infer({"model": MODEL, "image": "a", "device": "cpu"})["file"]))
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle), "device": "$torch.device('cpu')"})
    network = parser.get_parsed_content("network").eval()
    network.load_state_dict(saved["model"])
    data = parser.get_parsed_content("preprocessing")({"image": str(tmp_path / "studies" / "a.png")})
    with torch.no_grad():
        data["pred"] = parser.get_parsed_content("inferer")(data["image"][None], network)[0]
    np.testing.assert_array_equal(label, parser.get_parsed_content("postprocessing")(data)["pred"].T)  # new weights


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url, method="GET", timeout=600, **kwargs):
    """(status, body bytes, seconds) of an HTTP call; curl-free: the standard library only."""
    import urllib.error
    import urllib.request

    data = kwargs.get("json")
    request = urllib.request.Request(
        url,
        method=method,
        data=None if data is None else json.dumps(data).encode(),
        headers={"Content-Type": "application/json"} if data is not None else {},
    )
    start = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), time.monotonic() - start
    except urllib.error.HTTPError as e:
        return e.code, e.read(), time.monotonic() - start


@pytest.mark.slow
def test_real_server(tmp_path):
    """``monailabel start_server`` as the README starts it, on a free localhost port: /info, /infer on a tile,
    /infer/wsi on a slide region, /train to DONE (model.pt replaced), bad input; stopped by its process handle."""
    bundle = bundle_copy(tmp_path / "bundle", "flexible_unet")
    studies = labelled_studies(tmp_path)
    square_slide(studies / "square.tif")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP), "--studies", str(studies)]
        + ["--conf", "bundle", str(bundle), "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                status, body, _ = call(f"{url}/info/", timeout=5)
                break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()[-3000:]
                time.sleep(0.5)
        assert status == 200 and json.loads(body)["models"][MODEL]["labels"] == {
            "stroma": 1,
            "gland": 2,
            "lymphocytes": 3,
        }

        status, body, _ = call(f"{url}/infer/{MODEL}?image=a&output=image", "POST")
        tile = np.asarray(Image.open(__import__("io").BytesIO(body)))
        assert status == 200 and tile.shape == (300, 450) and tile.dtype == np.uint8 and tile.min() >= 1

        region = {**REGION, "tile_size": [1024, 1024], "min_poly_area": 0}
        status, body, _ = call(f"{url}/infer/wsi/{MODEL}?image=square&output=json", "POST", json=region)
        elements = [e for t in json.loads(body)["annotations"] for e in t["annotation"]["elements"]]
        points = np.concatenate([np.asarray(c) for e in elements for c in e["contours"]])
        assert status == 200 and points[:, 0].min() >= 200 and points[:, 0].max() <= 599
        assert points[:, 1].min() >= 150 and points[:, 1].max() <= 399

        before = md5(bundle / "models" / "model.pt")
        status, _, _ = call(f"{url}/train/{MODEL}", "POST", json={"max_epochs": 1, "val_split": 0.5})
        assert status == 200
        for _ in range(600):
            _, body, _ = call(f"{url}/train/")
            if json.loads(body).get("status") in ("DONE", "ERROR"):
                break
            time.sleep(1)
        assert json.loads(body)["status"] == "DONE", body
        assert md5(bundle / "models" / "model.pt") != before

        status, body, _ = call(f"{url}/infer/{MODEL}?image=missing&output=image", "POST")
        assert status == 404 and b"no such image" in body
        outside = {**region, "location": [700, 150]}
        status, body, _ = call(f"{url}/infer/wsi/{MODEL}?image=square&output=json", "POST", json=outside)
        assert status == 422 and b"does not lie inside the slide" in body
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
