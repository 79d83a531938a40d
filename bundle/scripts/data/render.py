"""Synthetic H&E tissue with exact pixel masks, rendered from a seed: the demo's and the tests' images.

Tissue is painted as haematoxylin and eosin concentrations and turned into RGB through the Beer-Lambert law
with the standard Macenko reference stain vectors, so colours, stain mixing and dark nuclei behave like a
real H&E scan (and stain normalisation or colour augmentation acts on them as on real slides). Classes:
collagen-rich ``stroma`` with elongated fibroblast nuclei, ``gland`` (an epithelial rim of packed nuclei
around a pale lumen; the mask covers rim and lumen, as in GlaS) and ``lymphocytes`` (dense clusters of
small round dark nuclei). Everything is vectorised: a 4096 x 4096 slide takes seconds.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..atomic import atomic_output
from ..constants import NO_TISSUE as NOT_TISSUE
from ..errors import DataError

logger = logging.getLogger(__name__)

CLASSES = ("stroma", "gland", "lymphocytes")
STROMA, GLAND, LYMPHOCYTES = range(len(CLASSES))
MIN_SIZE = 32
# optical density per unit concentration for R, G, B (Macenko et al. 2009 reference H&E vectors)
H_VECTOR = np.array([0.5626, 0.7201, 0.4062], np.float32)
E_VECTOR = np.array([0.2159, 0.8012, 0.5581], np.float32)
LIGHT = 240.0  # transmitted light where there is no stain: the slide background
MASK_COLOURS = {STROMA: (240, 170, 200), GLAND: (60, 170, 90), LYMPHOCYTES: (50, 80, 200), NOT_TISSUE: (255, 255, 255)}
_ANGLE_STEPS = 256  # samples of a blob's outline
_BSPLINE_VARIANCE = 151 / 315  # mean squared weight of a cubic B-spline: keeps smooth noise at unit variance


def check_size(height: int, width: int) -> None:
    if height < MIN_SIZE or width < MIN_SIZE:
        raise DataError(f"synthetic images must be at least {MIN_SIZE} x {MIN_SIZE} pixels, got {height} x {width}")


def _check_fraction(name: str, value: float | None, high: float = 1.0) -> None:
    if value is not None and not 0 <= value < high:
        raise DataError(f"{name} must be in [0, {high}), got {value}")


def _check_scale(scale: float) -> None:
    if not 0.25 <= scale <= 8:
        raise DataError(f"scale must be in [0.25, 8], got {scale}")


def _expand(grid: np.ndarray, n: int, scale: float, axis: int) -> np.ndarray:
    """Cubic B-spline interpolation of ``grid`` along ``axis`` to ``n`` samples, one knot every ``scale``
    samples: a matrix product when the grid is coarse, four gathers when it is fine."""
    t = np.arange(n, dtype=np.float32) / np.float32(scale)
    i = np.floor(t).astype(np.intp)
    f = t - i
    weights = [w / 6 for w in ((1 - f) ** 3, 3 * f**3 - 6 * f**2 + 4, -3 * f**3 + 3 * f**2 + 3 * f + 1, f**3)]
    if grid.shape[axis] > 128:
        shape = [1, 1]
        shape[axis] = n
        return sum(grid.take(i + k, axis) * w.reshape(shape) for k, w in enumerate(weights))
    matrix = np.zeros((n, grid.shape[axis]), np.float32)
    for k, w in enumerate(weights):
        matrix[np.arange(n), i + k] = w
    return matrix @ grid if axis == 0 else grid @ matrix.T


def _smooth_noise(rng: np.random.Generator, height: int, width: int, scale_y: float, scale_x: float | None = None):
    """Unit-variance noise smooth over ``scale`` pixels (anisotropic if ``scale_x`` differs): a coarse
    random grid under a separable cubic B-spline, so the cost barely depends on the scale."""
    scale_x = scale_x or scale_y
    knots = [int(np.float32(n - 1) / np.float32(scale)) + 4 for n, scale in ((height, scale_y), (width, scale_x))]
    grid = rng.standard_normal(knots, dtype=np.float32)
    return _expand(_expand(grid, width, scale_x, 1), height, scale_y, 0) * np.float32(1 / _BSPLINE_VARIANCE)


def _blob(rng: np.random.Generator, radius: float, roughness: float, elongation: float = 1.0, rotation=None):
    """An irregular closed shape: an ellipse (long axis at ``rotation``, random if None) whose radius is
    modulated by a few low harmonics. Returns the radius as a function of angle (a periodic table, linearly
    interpolated) and a bounding half-size."""
    a, b = radius * elongation**0.5, radius / elongation**0.5
    rotation = rng.uniform(0, np.pi) if rotation is None else rotation
    t = np.linspace(-np.pi, np.pi, _ANGLE_STEPS + 1, dtype=np.float32) - np.float32(rotation)
    r = a * b / np.sqrt((b * np.cos(t)) ** 2 + (a * np.sin(t)) ** 2)
    r *= 1 + sum(rng.normal(0, roughness / k) * np.cos(k * t + rng.uniform(0, 2 * np.pi)) for k in range(2, 6))
    r = r.astype(np.float32)

    def r_of(theta):
        position = (
            (np.asarray(theta, np.float32) + np.float32(np.pi))
            % np.float32(2 * np.pi)
            * np.float32(_ANGLE_STEPS / (2 * np.pi))
        )
        i = np.minimum(position.astype(np.intp), _ANGLE_STEPS - 1)
        return r[i] + (r[i + 1] - r[i]) * (position - i)

    return r_of, int(np.ceil(r.max())) + 1


def _polar(cy: float, cx: float, half: int, height: int, width: int):
    """Window around a centre (clipped to the canvas) with each pixel's angle and distance to the centre."""
    y0, y1 = max(0, int(cy) - half), min(height, int(cy) + half + 1)
    x0, x1 = max(0, int(cx) - half), min(width, int(cx) + half + 1)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
    return (slice(y0, y1), slice(x0, x1)), np.arctan2(dy, dx), np.hypot(dy, dx)


class _Stamps:
    """Collects ellipses (centre, semi-axes, angle, strength) and paints them all at once, one precomputed
    soft-edged stamp per (size, angle) bin: nuclei and goblet vacuoles without a per-pixel Python loop."""

    ANGLES = 12

    def __init__(self):
        self.parts: list[np.ndarray] = []

    def add(self, y, x, a, b, angle, strength) -> None:
        n = len(np.atleast_1d(y))
        columns = [np.broadcast_to(np.asarray(v, np.float32), (n,)) for v in (y, x, a, b, angle, strength)]
        self.parts.append(np.stack(columns, 1))

    def paint(self, height: int, width: int) -> np.ndarray:
        """The strongest stamp at each pixel (0 outside all of them)."""
        out = np.zeros(height * width, np.float32)
        if not self.parts:
            return out.reshape(height, width)
        y, x, a, b, angle, strength = np.concatenate(self.parts).T
        keys = np.stack([np.rint(a * 2), np.rint(b * 2), np.rint(angle % np.pi / np.pi * self.ANGLES) % self.ANGLES], 1)
        keys, group = np.unique(keys.astype(np.int64), axis=0, return_inverse=True)
        order = np.argsort(group, kind="stable")
        bounds = np.searchsorted(group[order], np.arange(len(keys) + 1))
        yi, xi = np.rint(y).astype(np.int64), np.rint(x).astype(np.int64)
        for g, (ka, kb, kt) in enumerate(keys):
            members = order[bounds[g] : bounds[g + 1]]
            dy, dx, weight = self._template(ka / 2, kb / 2, kt * np.pi / self.ANGLES)
            py, px = yi[members, None] + dy, xi[members, None] + dx
            inside = (py >= 0) & (py < height) & (px >= 0) & (px < width)
            flat = (py * width + px)[inside]
            out[flat] = np.maximum(out[flat], (strength[members, None] * weight)[inside])  # overlaps: last wins
        return out.reshape(height, width)

    @staticmethod
    def _template(a: float, b: float, angle: float):
        r = int(np.ceil(max(a, b) * 1.1)) + 1
        dy, dx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float32)
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        d = np.sqrt((u / max(a, 0.5)) ** 2 + (v / max(b, 0.5)) ** 2)
        weight = np.clip((1.1 - d) * 3, 0, 1)
        keep = weight > 0
        return dy[keep].astype(np.int64), dx[keep].astype(np.int64), weight[keep]


def _place_glands(rng, mask, depth, nuclei, goblets, fraction, scale):
    """Non-overlapping irregular glands until they cover about ``fraction`` of the canvas. ``depth`` gets
    each gland pixel's distance inside the epithelial rim (< 0 in the rim, >= 0 in the lumen)."""
    height, width = mask.shape
    target, covered = fraction * np.count_nonzero(mask == STROMA), 0
    for _ in range(int(40 + 4 * target / (np.pi * (30 * scale) ** 2))):
        if covered >= target:
            break
        radius = rng.uniform(22, 50) * scale
        r_of, half = _blob(rng, radius, roughness=0.08, elongation=rng.uniform(1.0, 2.2))
        cy, cx = rng.uniform(-0.2 * radius, height + 0.2 * radius), rng.uniform(-0.2 * radius, width + 0.2 * radius)
        if mask[min(max(int(cy), 0), height - 1), min(max(int(cx), 0), width - 1)] != STROMA:
            continue
        window, theta, r = _polar(cy, cx, half + int(5 * scale) + 1, height, width)
        edge = r_of(theta)
        inside = r < edge
        if not inside.any() or (mask[window][r < edge + 5 * scale] != STROMA).any():
            continue  # off the canvas, or touching another gland or cluster: glands sit apart in stroma
        rim = max(rng.uniform(0.4, 0.6) * radius, 15 * scale)
        mask[window][inside] = GLAND
        depth[window][inside] = (edge - r)[inside] - rim
        covered += inside.sum()
        # columnar epithelium: crowded nuclei on the basement membrane, long axis pointing at the lumen
        count = int(2 * np.pi * radius / (3.0 * scale))
        phi = np.linspace(0, 2 * np.pi, count, endpoint=False) + rng.uniform(0, 2 * np.pi)
        dist = r_of(phi) - (rng.uniform(0.05, 0.25, count) * rim + 4 * scale)
        nuclei.add(
            cy + dist * np.sin(phi),
            cx + dist * np.cos(phi),
            rng.uniform(4.5, 6.5, count) * scale,
            rng.uniform(1.8, 2.4, count) * scale,
            phi + rng.normal(0, 0.15, count),
            rng.uniform(1.6, 2.2, count),
        )
        # goblet cells: clear mucin vacuoles between the nuclei and the lumen
        count = rng.integers(0, int(radius / (3 * scale)))
        phi = rng.uniform(0, 2 * np.pi, count)
        dist = r_of(phi) - rng.uniform(0.6, 0.8, count) * rim
        size = rng.uniform(4.0, 5.5, count) * scale
        goblets.add(cy + dist * np.sin(phi), cx + dist * np.cos(phi), size, size * 0.75, phi, 1.0)


def _place_clusters(rng, mask, nuclei, fraction, scale):
    """Lymphoid aggregates in the stroma: irregular blobs packed with small round nuclei."""
    height, width = mask.shape
    target, covered = fraction * np.count_nonzero(mask == STROMA), 0
    for _ in range(int(30 + 4 * target / (np.pi * (30 * scale) ** 2))):
        if covered >= target:
            break
        radius = rng.uniform(18, 50) * scale
        r_of, half = _blob(rng, radius, roughness=0.15, elongation=rng.uniform(1.0, 1.8))
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        if mask[int(cy), int(cx)] != STROMA:
            continue
        window, theta, r = _polar(cy, cx, half, height, width)
        blob = r < r_of(theta)
        inside = blob & (mask[window] == STROMA)
        if not inside.any() or inside.sum() < 0.5 * blob.sum():
            continue  # mostly over glands: aggregates lie in the stroma
        mask[window][inside] = LYMPHOCYTES
        covered += inside.sum()
        # jittered hexagonal packing, kept where the cluster is
        spacing = 6.4 * scale
        gy, gx = np.mgrid[window[0].start : window[0].stop : spacing * 0.87, window[1].start : window[1].stop : spacing]
        gx = gx + (np.arange(gy.shape[0])[:, None] % 2) * spacing / 2
        ny = (gy + rng.normal(0, 1.0 * scale, gy.shape)).ravel()
        nx = (gx + rng.normal(0, 1.0 * scale, gx.shape)).ravel()
        iy, ix = np.clip(np.rint(ny).astype(int), 0, height - 1), np.clip(np.rint(nx).astype(int), 0, width - 1)
        keep = mask[iy, ix] == LYMPHOCYTES
        n = int(keep.sum())
        size = rng.uniform(2.3, 3.2, n) * scale
        nuclei.add(
            ny[keep],
            nx[keep],
            size,
            size * rng.uniform(0.8, 1.0, n),
            rng.uniform(0, np.pi, n),
            rng.uniform(1.9, 2.4, n),
        )


def _collagen(rng, height, width, scale):
    """Eosin density of wavy collagen bundles, plus the fibres' mean direction ``theta`` and the smooth
    ``warp`` that bends them (together they give the local fibre direction).

    Texture is anisotropic noise in a (across, along) fibre frame whose across axis is warped by smooth
    noise; it is computed once as a small table over that frame and looked up per pixel."""
    theta = rng.uniform(0, np.pi)
    yy = np.arange(height, dtype=np.float32)[:, None]
    xx = np.arange(width, dtype=np.float32)[None, :]
    warp = 30 * scale * _smooth_noise(rng, height, width, 70 * scale)
    warp += 100 * scale * _smooth_noise(rng, height, width, 300 * scale)
    across = warp + (xx * np.float32(np.cos(theta)) + yy * np.float32(np.sin(theta)))
    along = (yy * np.float32(np.cos(theta)) - xx * np.float32(np.sin(theta))) * np.float32(1 / 4)
    a0, l0 = int(np.floor(across.min())), int(np.floor(along.min()))
    rows, cols = int(np.ceil(across.max())) - a0 + 2, int(np.ceil(along.max())) - l0 + 2
    table = 0.6 + 0.3 * _smooth_noise(rng, rows, cols, 7 * scale, 15 * scale)
    table += 0.35 * _smooth_noise(rng, rows, cols, 2.0 * scale, 5 * scale)
    table = np.clip(table, 0, 1) ** 1.3
    index = (across - np.float32(a0 - 0.5)).astype(np.intp) * cols
    index += (along - np.float32(l0 - 0.5)).astype(np.intp)
    bundles = table.ravel().take(index)
    return bundles, theta, warp


def _blur(image: np.ndarray) -> np.ndarray:
    """A [1, 2, 1] binomial blur along both axes (edges repeated): the optics' softness. Written as
    in-place slice additions, several times faster than scipy's filters on large images."""
    for axis in (0, 1):
        src, out = np.moveaxis(image, axis, 0), np.empty_like(image)
        dst = np.moveaxis(out, axis, 0)
        np.add(src[:-2], src[2:], out=dst[1:-1])
        dst[1:-1] += src[1:-1]
        dst[1:-1] += src[1:-1]
        dst[0], dst[-1] = 3 * src[0] + src[1], 3 * src[-1] + src[-2]
        image = out
    image *= np.float32(1 / 16)
    return image


def _render(rng, mask, gland_fraction, lymphocyte_fraction, scale):
    """Lay glands and lymphoid aggregates into the stroma of ``mask`` (in place) and paint the H&E image.
    Pixels of ``mask`` that are not STROMA on entry stay as they are and get no structures."""
    height, width = mask.shape
    depth = np.zeros((height, width), np.float32)
    nuclei, goblets = _Stamps(), _Stamps()
    _place_glands(rng, mask, depth, nuclei, goblets, gland_fraction, scale)
    _place_clusters(rng, mask, nuclei, lymphocyte_fraction, scale)

    bundles, theta, warp = _collagen(rng, height, width, scale)
    loose = _smooth_noise(rng, height, width, 40 * scale)
    eosin = (0.18 + bundles) * np.clip(0.9 + 0.2 * loose, 0.5, 1.1)
    haem = np.full((height, width), 0.07, np.float32)

    # fibroblasts: sparse elongated nuclei along the fibres; a few round inflammatory cells between them
    count = int(height * width / (1000 * scale**2))
    sy, sx = rng.uniform(0, height - 1, count), rng.uniform(0, width - 1, count)
    iy, ix = sy.astype(int), sx.astype(int)
    keep = mask[iy, ix] == STROMA
    iy, ix, n = iy[keep], ix[keep], int(keep.sum())
    gy = warp[np.minimum(iy + 1, height - 1), ix] - warp[np.maximum(iy - 1, 0), ix] + 2 * np.sin(theta)
    gx = warp[iy, np.minimum(ix + 1, width - 1)] - warp[iy, np.maximum(ix - 1, 0)] + 2 * np.cos(theta)
    fibroblast = rng.random(n) < 0.8
    length = np.where(fibroblast, rng.uniform(5, 8, n), rng.uniform(2.4, 3.0, n)) * scale
    breadth = np.where(fibroblast, rng.uniform(1.4, 2.0, n) * scale, length * rng.uniform(0.85, 1, n))
    nuclei.add(sy[keep], sx[keep], length, breadth, np.arctan2(gy, gx) + np.pi / 2, rng.uniform(1.5, 2.2, n))

    gland = mask == GLAND
    rim, lumen = gland & (depth < 0), gland & (depth >= 0)
    eosin[rim], haem[rim] = 0.5 + 0.1 * loose[rim], 0.28
    secretion = np.clip(loose[lumen], 0, None)
    eosin[lumen], haem[lumen] = 0.03 + 0.12 * secretion, 0.02 + 0.03 * secretion
    lymph = mask == LYMPHOCYTES
    eosin[lymph], haem[lymph] = 0.35, 0.25

    vacuole = goblets.paint(height, width)
    eosin *= 1 - 0.85 * vacuole
    haem += (0.1 - haem) * vacuole  # pale grey-blue mucin
    nuclear = nuclei.paint(height, width)
    texture = rng.random((height, width), dtype=np.float32)  # chromatin granularity
    texture *= 0.25
    texture += 0.75
    nuclear *= texture
    np.minimum(nuclear, 1, out=texture)
    eosin *= 1 - 0.6 * texture
    np.maximum(haem, nuclear, out=haem)

    # Beer-Lambert with slightly varied stain vectors and amounts; in-place, as large canvases are memory-bound
    stain = -rng.normal(1, 0.04, (2, 3)).astype(np.float32) * (H_VECTOR, E_VECTOR)
    stain *= rng.uniform(0.85, 1.15, (2, 1)).astype(np.float32)
    haem, eosin = _blur(haem), _blur(eosin)
    grain = rng.random((height, width), dtype=np.float32)  # sensor noise, +-3 grey levels
    grain *= 6
    grain -= 3
    rgb = np.empty((height, width, 3), np.uint8)
    for c in range(3):
        np.multiply(haem, stain[0, c], out=nuclear)
        np.multiply(eosin, stain[1, c], out=texture)
        nuclear += texture
        np.exp(nuclear, out=nuclear)
        nuclear *= np.float32(LIGHT)
        nuclear += grain
        rgb[..., c] = np.clip(nuclear, 0, 255, out=nuclear)
    return rgb


def make_tile(
    rng: np.random.Generator,
    height: int,
    width: int,
    gland_fraction: float | None = None,
    lymphocyte_fraction: float | None = None,
    scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One tissue tile: (H x W x 3 uint8 RGB, H x W uint8 mask of indices into CLASSES).

    A fraction left as None is drawn per tile, zero for about a third of tiles, so that tiles differ in the
    classes they hold and patch-level tags carry information. ``scale`` is the magnification relative to
    the default (2 draws every structure twice as large).
    """
    check_size(height, width)
    _check_scale(scale)
    _check_fraction("gland_fraction", gland_fraction, 0.7)
    _check_fraction("lymphocyte_fraction", lymphocyte_fraction, 0.7)
    if gland_fraction is None:
        gland_fraction = rng.uniform(0.15, 0.5) if rng.random() > 0.35 else 0.0
    if lymphocyte_fraction is None:
        lymphocyte_fraction = rng.uniform(0.08, 0.3) if rng.random() > 0.4 else 0.0
    mask = np.zeros((height, width), np.uint8)
    return _render(rng, mask, gland_fraction, lymphocyte_fraction, scale), mask


def make_slide_array(
    rng: np.random.Generator,
    height: int,
    width: int,
    tissue_fraction: float = 0.5,
    scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A slide-like canvas: a few irregular tissue pieces on bright glass. Returns (RGB, mask) with mask
    255 where there is no tissue; ``tissue_fraction`` of the pixels are tissue. ``scale`` as for
    :func:`make_tile`."""
    check_size(height, width)
    _check_scale(scale)
    if not 0 < tissue_fraction < 1:
        raise DataError(f"tissue_fraction must be in (0, 1), got {tissue_fraction}")
    # a few irregular tissue pieces, outlined on a coarse grid (knot j near pixel (j - 1) * step), roughened
    # by noise and interpolated up
    step = int(np.clip(min(height, width) / 32, 4, 48))
    coarse = (int(np.float32(height - 1) / np.float32(step)) + 4, int(np.float32(width - 1) / np.float32(step)) + 4)
    field = np.full(coarse, -np.inf, np.float32)
    pieces = 2 if tissue_fraction > 0.3 else 3  # side by side, upright irregular ellipses sharing the tissue
    half_width = 0.4 * width / pieces
    half_height = min(tissue_fraction * height * width / pieces / (np.pi * half_width), 0.45 * height)
    for k in range(pieces):
        cy, cx = height * rng.uniform(0.45, 0.55), width * (k + 0.5 + rng.uniform(-0.05, 0.05)) / pieces
        r_of, _ = _blob(
            rng,
            np.sqrt(half_width * half_height) / step,
            0.12,
            half_height / half_width,
            rotation=np.pi / 2 + rng.normal(0, 0.1),
        )
        _, theta, r = _polar(cy / step + 1, cx / step + 1, max(coarse), *coarse)
        np.maximum(field, 1 - r / r_of(theta), out=field)
    field += 0.04 * rng.standard_normal(coarse).astype(np.float32)
    # keep a rim of glass around the slide: knots near the border are pushed down
    ky, kx = (np.arange(coarse[0]) - 1) * step, (np.arange(coarse[1]) - 1) * step
    border = np.minimum.outer(np.minimum(ky, height - 1 - ky), np.minimum(kx, width - 1 - kx))
    field -= 3 * np.clip(1 - border / (0.05 * min(height, width)), 0, None).astype(np.float32)
    shape = _expand(_expand(field, width, step, 1), height, step, 0)
    glass = shape < np.quantile(shape[:: max(1, height // 256), :: max(1, width // 256)], 1 - tissue_fraction)
    mask = np.where(glass, np.uint8(NOT_TISSUE), np.uint8(STROMA))
    rgb = _render(rng, mask, rng.uniform(0.15, 0.3), rng.uniform(0.06, 0.15), scale)
    rgb[glass] = np.clip(LIGHT + 1.5 * rng.standard_normal((int(glass.sum()), 1), np.float32), 0, 255)
    return rgb, mask


def colour_mask(mask: np.ndarray) -> np.ndarray:
    """RGB picture of a class mask in MASK_COLOURS (unknown values black), for figures and overlays."""
    lut = np.zeros((256, 3), np.uint8)
    for value, colour in MASK_COLOURS.items():
        lut[value] = colour
    return lut[mask]


def demo_figure(path: str | os.PathLike, tile_size: int = 256, seed: int = 0) -> str:
    """The README figure: four tiles (chosen mixes, so every class shows) above their masks, with a legend."""
    mixes = [(0.35, 0.0), (0.2, 0.15), (0.0, 0.25), (0.3, 0.1)]
    rng = np.random.default_rng(seed)
    pairs = [make_tile(rng, tile_size, tile_size, g, lymph) for g, lymph in mixes]
    gap, legend = 6, 40
    rows = [
        np.concatenate([np.pad(a, ((0, 0), (0, gap), (0, 0)), constant_values=255) for a in row], 1)[:, :-gap]
        for row in ([rgb for rgb, _ in pairs], [colour_mask(mask) for _, mask in pairs])
    ]
    canvas = np.full((2 * tile_size + gap + legend, rows[0].shape[1], 3), 255, np.uint8)
    canvas[:tile_size], canvas[tile_size + gap : 2 * tile_size + gap] = rows
    figure = Image.fromarray(canvas)
    draw = ImageDraw.Draw(figure)
    font = ImageFont.load_default(size=18)
    x, y = 10, 2 * tile_size + gap + 10
    for index, name in enumerate(CLASSES):
        draw.rectangle([x, y, x + 20, y + 20], fill=MASK_COLOURS[index], outline=(0, 0, 0))
        draw.text((x + 28, y), name, fill=(0, 0, 0), font=font)
        x += 40 + int(draw.textlength(name, font=font))
    with atomic_output(path) as tmp:  # 256 colours: half the bytes, no visible change
        palette = figure.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        palette.save(tmp, format="PNG", optimize=True)
    return str(path)
