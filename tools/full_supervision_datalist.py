"""The fully-supervised reference: a ``datalist_pseudo.json`` whose pseudo-masks are the training images' ground-truth
masks, so ``train.json`` trains on pixel labels with exactly the schedule of the weak pipeline and the gap to full
supervision can be stated (issue 19). A reference row for the model card, never a default and never used to choose
anything.

    python tools/full_supervision_datalist.py --datalist GLAS_DATALIST --output OUT/datalist_pseudo.json
    python -m monai.bundle run --bundle_root bundle \\
        --config_file "['bundle/configs/common.json','bundle/configs/train.json']" --pseudo_dir OUT ...

Every training entry's ``pseudo`` and single ``pseudo_layers`` mask is its image's ``mask`` (train with
``layer_weights [1.0]``); an entry without a mask is an error naming it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bundle"))

from monai.data import load_decathlon_datalist  # noqa: E402

from scripts.errors import DataError  # noqa: E402
from scripts.sam.outputs import pseudo_items, write_mask_datalist  # noqa: E402


def write_reference(datalist: str, output: str) -> Path:
    entries = load_decathlon_datalist(datalist, False, "training")
    missing = sorted({e["image"] for e in entries if not e.get("mask")})
    if missing:
        raise DataError(f"{datalist}: training images without a 'mask' cannot be the reference: {missing}")
    masks = {e["image"]: e["mask"] for e in entries}
    by_name = {item["name"]: Path(masks[item["image"]]) for item in pseudo_items(datalist)}
    return write_mask_datalist(datalist, output, lambda name: (by_name[name], [by_name[name]]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datalist", required=True, help="a datalist whose training entries have ground-truth masks")
    ap.add_argument("--output", required=True, help="the datalist_pseudo.json to write")
    args = ap.parse_args()
    print(write_reference(args.datalist, args.output))


if __name__ == "__main__":
    main()
