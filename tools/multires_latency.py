"""Interactive WSI-SAM on a slide: validity of the polygons and latency per box (issue 18's slide acceptance).

Runs :class:`scripts.sam.interactive.InteractiveSegmentation` as ``interactive.json`` does, checks that every box
got one valid polygon inside it, then times the region holding the most boxes: the first box of a region (read and
encode both views, decode one box) and each further box (the extra decoding time per box of one batched call).
Median of ``--repeats`` runs. Usage, from the project root::

    python tools/multires_latency.py SLIDE BOXES.geojson [--checkpoint multires_sam.pt] [--output_dir DIR]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import shapely
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))

from scripts.sam.interactive import InteractiveSegmentation, read_prompts  # noqa: E402
from scripts.sam.model import load_sam  # noqa: E402
from scripts.sam.multires import load_multires  # noqa: E402
from scripts.sam.views import ImageSource  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slide")
    parser.add_argument("boxes", help="QuPath GeoJSON of rectangles")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--sam_backend", default="litemedsam")
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--region", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output_dir", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_multires(load_sam(args.sam_backend, device=device), args.sam_backend, args.checkpoint, mpp=args.mpp)
    segmenter = InteractiveSegmentation(model, region=args.region)
    out = Path(args.output_dir or tempfile.mkdtemp())

    start = time.perf_counter()
    target = segmenter(args.slide, out, prompts_file=args.boxes)
    total = time.perf_counter() - start
    prompts = read_prompts(args.boxes)
    features = json.loads(target.read_text())["features"]
    inside = [
        shapely.from_geojson(json.dumps(f["geometry"])).within(shapely.box(*p.box).buffer(1e-6))
        for f, p in zip(features, prompts)
    ]
    valid = [shapely.from_geojson(json.dumps(f["geometry"])).is_valid for f in features]

    source = ImageSource(args.slide)
    ds = source.downsample(model.mpp)
    window, members = max(segmenter.windows(prompts, source, ds), key=lambda wm: len(wm[1]))
    edges = np.stack([prompts[i].box for i in members])
    boxes = window.to_view(np.stack([edges[:, 1], edges[:, 0], edges[:, 3] - 1, edges[:, 2] - 1], 1))
    first, further = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        region = model.region(source.read(window), window, source.read(window.context()))
        model.predict(region, boxes[:1])
        t1 = time.perf_counter()
        model.predict(region, boxes)
        t2 = time.perf_counter()
        model.predict(region, boxes[:1])
        t3 = time.perf_counter()
        first.append(t1 - t0)
        further.append(((t2 - t1) - (t3 - t2)) / max(len(boxes) - 1, 1))
    print(
        json.dumps(
            {
                "slide": args.slide,
                "device": str(device),
                "threads": torch.get_num_threads(),
                "checkpoint": args.checkpoint,
                "prompts": len(prompts),
                "polygons": len(features),
                "polygons_inside_their_box": int(sum(inside)),
                "polygons_valid": int(sum(valid)),
                "regions": len(segmenter.timings),
                "whole_run_s": round(total, 2),
                "per_region": [
                    {k: round(v, 3) if isinstance(v, float) else v for k, v in t.items()} for t in segmenter.timings
                ],
                "timed_region_boxes": len(members),
                "first_box_s": round(statistics.median(first), 3),
                "further_box_s": round(statistics.median(further), 3),
                "output": str(target),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
