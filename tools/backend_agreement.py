"""Label agreement of two whole-slide inference runs (e.g. ``--backend torch`` and ``--backend onnxruntime``) over the
same inputs: per input and in all, the fraction of the reference's tissue pixels (label not 255) both runs label alike.

    python tools/backend_agreement.py out_torch out_onnxruntime
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import tifffile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reference", type=Path, help="the output folder of the reference run (PyTorch)")
    parser.add_argument("other", type=Path, help="the output folder of the run compared with it")
    args = parser.parse_args()
    same = tissue = 0
    for summary_path in sorted(args.reference.glob("*_summary.json")):
        labels = json.loads(summary_path.read_text())["outputs"]["labels"]
        reference = tifffile.imread(args.reference / labels, level=0)
        other = tifffile.imread(args.other / labels, level=0)
        mask = reference != 255
        agree, pixels = int((reference[mask] == other[mask]).sum()), int(mask.sum())
        same, tissue = same + agree, tissue + pixels
        print(f"{summary_path.name[: -len('_summary.json')]}: {100 * agree / max(pixels, 1):.3f} % of {pixels} pixels")
    print(f"all: {100 * same / max(tissue, 1):.3f} % of {tissue} tissue pixels agree")


if __name__ == "__main__":
    main()
