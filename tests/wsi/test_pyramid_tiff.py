import numpy as np
import pytest
import tifffile
from scipy import ndimage

from scripts.errors import DataError
from scripts.wsi import pyramid_tiff
from scripts.wsi.pyramid_tiff import level_shapes, write_pyramidal_tiff


@pytest.fixture(scope="module")
def smooth_rgb():
    """A smooth image (JPEG keeps it within a few grey levels) with odd sizes to exercise partial tiles."""
    noise = np.random.default_rng(0).random((300, 350, 3), dtype=np.float32)
    return np.clip((ndimage.gaussian_filter(noise, (4, 4, 0)) - 0.5) * 1500 + 128, 0, 255).astype(np.uint8)


def area_mean(image, factor):
    """Mean of each factor x factor block; a partial block at the border averages the pixels it has."""
    h, w = -(-image.shape[0] // factor) * factor, -(-image.shape[1] // factor) * factor
    padded = np.full((h, w, 3), np.nan)
    padded[: image.shape[0], : image.shape[1]] = image
    return np.nanmean(padded.reshape(h // factor, factor, w // factor, factor, 3), (1, 3))


def test_level_shapes_halve_until_below_min_size():
    assert level_shapes(1000, 700, 300) == [(1000, 700), (500, 350), (250, 175)]
    assert level_shapes(200, 100, 512) == [(200, 100)]


@pytest.mark.parametrize("backend", ["cucim", "openslide"])
def test_rgb_pyramid_opens_in_wsireader(tmp_path, smooth_rgb, backend):
    pytest.importorskip(backend)
    from monai.data import WSIReader

    path = write_pyramidal_tiff(tmp_path / "slide.tif", smooth_rgb, mpp=0.5, tile=64, min_size=100)
    reader = WSIReader(backend=backend)
    wsi = reader.read(path)
    shapes = [(300, 350), (150, 175), (75, 88)]
    assert reader.get_level_count(wsi) == len(shapes)
    for level, shape in enumerate(shapes):
        assert tuple(reader.get_size(wsi, level)) == shape
        assert reader.get_downsample_ratio(wsi, level) == pytest.approx(2**level, rel=0.01)
        assert reader.get_mpp(wsi, level) == pytest.approx((0.5 * 2**level,) * 2, rel=0.01)
    for level in (0, 1):
        data, _ = reader.get_data(wsi, level=level)
        assert np.abs(data.transpose(1, 2, 0) - area_mean(smooth_rgb, 2**level)).mean() < 6  # JPEG


def test_rgb_levels_are_area_means(tmp_path, smooth_rgb):
    path = write_pyramidal_tiff(tmp_path / "slide.tif", smooth_rgb, tile=64, compression="zlib", min_size=100)
    with tifffile.TiffFile(path) as tif:
        np.testing.assert_array_equal(tif.pages[0].asarray(), smooth_rgb)
        for level in (1, 2):
            assert np.abs(tif.pages[level].asarray() - area_mean(smooth_rgb, 2**level)).max() <= 0.5


def test_resolution_tags_and_page_layout(tmp_path, smooth_rgb):
    path = write_pyramidal_tiff(tmp_path / "slide.tif", smooth_rgb, mpp=0.25, tile=64, min_size=100, description="demo")
    with tifffile.TiffFile(path) as tif:
        pages = tif.pages
        assert len(pages) == 3 and pages[0].description == "demo"
        for level, page in enumerate(pages):
            assert page.is_tiled and page.tilewidth == 64 and page.compression == tifffile.COMPRESSION.JPEG
            assert page.subfiletype == (1 if level else 0) and not page.subifds
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            num, den = page.tags["XResolution"].value
            assert num / den == pytest.approx(1e4 / (0.25 * 2**level), rel=1e-3)


def test_label_pyramid_is_exact_and_subsampled(tmp_path):
    labels = np.random.default_rng(1).choice(np.array([0, 1, 2, 255], np.uint8), (200, 230))
    path = write_pyramidal_tiff(tmp_path / "mask.tif", labels, mpp=0.5, tile=64, compression="zlib", min_size=150)
    with tifffile.TiffFile(path) as tif:
        assert [p.shape for p in tif.pages] == [(200, 230), (100, 115)]
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        np.testing.assert_array_equal(tif.pages[0].asarray(), labels)
        np.testing.assert_array_equal(tif.pages[1].asarray(), labels[::2, ::2])


class Recording:
    """An image-like object that records the blocks read and can fail after a number of reads."""

    def __init__(self, array, fail_after=None):
        self.array, self.fail_after, self.blocks = array, fail_after, []
        self.shape, self.dtype = array.shape, array.dtype

    def __getitem__(self, key):
        if self.fail_after is not None and len(self.blocks) >= self.fail_after:
            raise OSError("disk went away")
        block = self.array[key]
        self.blocks.append(block.shape)
        return block


def test_reads_bounded_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(pyramid_tiff, "READ_BLOCK", 128)
    image = Recording(np.zeros((600, 500), np.uint8))
    write_pyramidal_tiff(tmp_path / "mask.tif", image, tile=64, compression="lzw", min_size=64)
    assert len(level_shapes(600, 500, 64)) == 5
    assert max(h * w for h, w in image.blocks) <= 128 * 128


def test_memmap_input(tmp_path, smooth_rgb):
    mm = np.memmap(tmp_path / "raw.u8", np.uint8, "w+", shape=smooth_rgb.shape)
    mm[:] = smooth_rgb
    path = write_pyramidal_tiff(tmp_path / "slide.tif", mm, tile=64, min_size=1000)
    assert np.abs(tifffile.imread(path).astype(int) - smooth_rgb).mean() < 3


def test_failure_mid_write_leaves_no_file(tmp_path, smooth_rgb):
    with pytest.raises(OSError, match="disk went away"):
        write_pyramidal_tiff(tmp_path / "slide.tif", Recording(smooth_rgb, fail_after=10), tile=64, min_size=100)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "image, kwargs, message",
    [
        (np.zeros((64, 64), np.uint8), {"compression": "jpeg"}, "JPEG would alter"),
        (np.zeros((64, 64, 3), np.uint8), {"tile": 24}, "multiple of 16"),
        (np.zeros((64, 64, 4), np.uint8), {}, "H x W x 3"),
        (np.zeros((64, 64, 3), np.float32), {}, "uint8"),
        (np.zeros((64, 64, 3), np.uint8), {"mpp": 0}, "mpp"),
        (np.zeros((64, 64, 3), np.uint8), {"compression": "webp"}, "compression"),
    ],
)
def test_bad_arguments(tmp_path, image, kwargs, message):
    with pytest.raises(DataError, match=message):
        write_pyramidal_tiff(tmp_path / "x.tif", image, **kwargs)
    assert not (tmp_path / "x.tif").exists()
