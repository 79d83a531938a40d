"""Training throughput of the stage-1 CAM classifier (patches/s), on whatever device the config picks.

    python benchmarks/cam_throughput.py [--datalist D] [--input_size 224] [--batch_size 16] [--iterations 20]

Two runs in one process: the bundle's SupervisedTrainer from ``common.json`` + ``train_cam.json`` reading real
patches (loader, augmentation, forward, backward, AdamW; no validation), and, as the baseline, the same network,
loss and optimiser on a random batch already in memory. Their ratio is the share of the model's speed the
data pipeline lets through. ``--input_size`` sets the config's ``cam_input_size``. Without ``--datalist`` it uses
GlaS from ../shared/data if present (via the GlaS adapter) or else the synthetic demo, both written to a
temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bundle"))
os.environ.setdefault("CUFILE_LOGFILE_PATH", os.devnull)

from ignite.engine import Events  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

CONFIGS = ROOT / "bundle" / "configs"
GLAS = ROOT.parent / "shared" / "data" / "glas"


def default_datalist(tmp: str) -> str:
    if GLAS.is_dir():
        from scripts.data.adapters import glas

        return glas(str(GLAS), os.path.join(tmp, "glas.json"))
    from scripts.data.demo import prepare_demo

    return prepare_demo(tmp, n_train=16, n_validation=1, n_test=0, slide_size=64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datalist")
    ap.add_argument("--input_size", type=int, default=224, help="the CAM network's input size (cam_input_size)")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--num_workers", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))

    with tempfile.TemporaryDirectory() as tmp:
        parser = ConfigParser(ConfigParser.load_config_files([CONFIGS / "common.json", CONFIGS / "train_cam.json"]))
        parser.update(
            {
                "bundle_root": str(ROOT / "bundle"),
                "datalist": args.datalist or default_datalist(tmp),
                "cam_input_size": args.input_size,
                "batch_size": args.batch_size,
                "num_workers": args.num_workers,
                "train#handlers": [],
                "train#trainer#epoch_length": args.warmup + args.iterations,
                "train#trainer#max_epochs": 1,
            }
        )
        trainer = parser.get_parsed_content("train#trainer")
        device, amp = parser.get_parsed_content("device"), parser.get_parsed_content("amp")
        stamps = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: stamps.append(time.perf_counter()))
        trainer.run()
        pipeline = args.iterations * args.batch_size / (stamps[-1] - stamps[args.warmup - 1])

        network, loss, optimizer = (parser.get_parsed_content(k) for k in ("network", "loss", "optimizer"))
        classes = len(parser.get_parsed_content("classes"))
        x = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
        y = torch.randint(0, 2, (args.batch_size, classes), device=device).float()
        network.train()
        for i in range(args.warmup + args.iterations):
            if i == args.warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=amp):
                value = loss(network(x), y)
            value.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        model_only = args.iterations * args.batch_size / (time.perf_counter() - start)

    result = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "amp": amp,
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "iterations": args.iterations,
        "pipeline_patches_per_s": round(pipeline, 2),
        "model_only_patches_per_s": round(model_only, 2),
        "pipeline_over_model_only": round(pipeline / model_only, 3),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
