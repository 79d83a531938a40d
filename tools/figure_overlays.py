"""Stack a few of the evaluation's overlay PNGs (image | prediction | ground truth) into one figure for the docs.

python tools/figure_overlays.py EVAL_DIR OUTPUT.png [--count 3] [--width 900]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("eval_dir")
    ap.add_argument("output")
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--width", type=int, default=900)
    args = ap.parse_args()
    paths = sorted((Path(args.eval_dir) / "overlays").glob("*.png"))[: args.count]
    if not paths:
        raise SystemExit(f"error: no overlays in {Path(args.eval_dir) / 'overlays'}")
    rows = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        height = round(image.height * args.width / image.width)
        rows.append(np.asarray(image.resize((args.width, height), Image.BILINEAR)))
        rows.append(np.full((6, args.width, 3), 255, np.uint8))
    Image.fromarray(np.concatenate(rows[:-1])).save(args.output)
    print(f"wrote {args.output} from {len(paths)} overlays")


if __name__ == "__main__":
    main()
