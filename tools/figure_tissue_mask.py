"""Figure: a slide thumbnail with the tissue mask (semi-transparent green + contour) and the kept patch grid.

    python tools/figure_tissue_mask.py [SLIDE] [OUTPUT] [--backend cucim] [--patch_size 224]

Defaults: ../shared/data/wsi/CMU-1-Small-Region.svs -> bundle/docs/tissue_mask_cmu.png. Uses the same code
as the slides adapter (scripts.wsi.reader.tissue_mask, scripts.data.slides.from_slides), so the picture shows what the
datalist contains.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bundle"))
sys.path.insert(0, str(ROOT / "tools"))
os.environ.setdefault("CUFILE_LOGFILE_PATH", os.devnull)

from figures import save_png  # noqa: E402

from scripts.data.slides import from_slides  # noqa: E402
from scripts.wsi.reader import level_downsample, open_slide, read_lowres, tissue_mask  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("slide", nargs="?", default=str(ROOT.parent / "shared/data/wsi/CMU-1-Small-Region.svs"))
    p.add_argument("output", nargs="?", default=str(ROOT / "bundle/docs/tissue_mask_cmu.png"))
    p.add_argument("--backend", default="cucim")
    p.add_argument("--patch_size", type=int, default=224)
    p.add_argument("--thumb_downsample", type=float, default=5)
    a = p.parse_args()

    slide = Path(a.slide).resolve()
    reader, wsi = open_slide(slide, a.backend)
    mask, mask_ds = tissue_mask(reader, wsi)
    rgb, ds = read_lowres(reader, wsi, a.thumb_downsample)
    thumb = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    h, w = thumb.shape[:2]

    # the mask on the thumbnail grid (nearest, by pixel centre)
    rows = np.minimum(((np.arange(h) + 0.5) * ds / mask_ds).astype(int), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * ds / mask_ds).astype(int), mask.shape[1] - 1)
    m = mask[np.ix_(rows, cols)]
    out = thumb.astype(np.float32)
    out[m] = 0.6 * out[m] + 0.4 * np.array([40, 200, 60], np.float32)
    edge = m & ~ndimage.binary_erosion(m, iterations=2)
    out[edge] = (0, 140, 30)
    img = Image.fromarray(out.astype(np.uint8))

    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "slides.csv"
        csv.write_text(f'slide,labels\n"{slide}",tissue\n')
        data = from_slides(str(csv), str(Path(tmp) / "datalist.json"), patch_size=a.patch_size, backend=a.backend)
    draw = ImageDraw.Draw(img)
    for e in data["training"]:
        y, x = e["location"]
        s = e["size"][0] * level_downsample(reader, wsi, e["level"])
        draw.rectangle([x / ds, y / ds, (x + s) / ds - 1, (y + s) / ds - 1], outline=(30, 60, 220), width=1)
    draw.rectangle([0, 0, w - 1, 15], fill=(255, 255, 255))
    draw.text(
        (3, 2),
        f"{slide.name}: tissue mask (green), {len(data['training'])} kept {a.patch_size}px patches (blue)",
        fill=(0, 0, 0),
    )
    save_png(img, a.output, colors=128)
    print(f"{a.output}: {img.size[0]}x{img.size[1]}, {os.path.getsize(a.output) / 1024:.0f} KB")


if __name__ == "__main__":
    main()
