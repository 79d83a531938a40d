"""The network alone, per window, for each backend and number of windows per call: what inference.json's CPU
``sw_batch_size`` (a budget of 2 x 256² pixels per call) was set from, to re-check on another CPU.

    OMP_NUM_THREADS=2 python benchmarks/windows_per_call.py [--roi 128 256] [--per-call 1 2 4 8] \
        [--checkpoint bundle/models/model.pt] [--backends torch openvino openvino:bf16]

Random input; 40 calls' worth of windows per cell after two warm-up calls. Prints milliseconds per window.
"""

from __future__ import annotations

import argparse
import os
import time

import slide_inference  # puts the bundle on sys.path
import torch

from scripts.export import exported


def ms_per_window(net, roi: int, per_call: int, calls: int = 40) -> float:
    x = torch.rand(per_call, 3, roi, roi)
    with torch.inference_mode():
        net(x), net(x)  # warm-up: a runtime's first calls allocate
        start = time.time()
        for _ in range(calls):
            net(x)
    return 1000 * (time.time() - start) / (calls * per_call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--roi", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--per-call", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--checkpoint", default=None, help="a trained model.pt (default: random weights)")
    parser.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"])
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(f"{'backend':14s} {'roi':>4s} " + " ".join(f"{n:>8d}/call" for n in args.per_call) + "  (ms per window)")
    for backend in args.backends:
        name, _, precision = backend.partition(":")
        for roi in args.roi:
            net = exported(
                slide_inference.network(torch.device("cpu"), args.checkpoint),
                args.checkpoint,
                name,
                (roi, roi),
                precision=precision or "fp32",
            )
            net = net.to(memory_format=torch.channels_last) if name == "torch" else net  # as the slide path runs it
            times = [ms_per_window(net, roi, n) for n in args.per_call]
            print(f"{backend:14s} {roi:4d} " + " ".join(f"{t:13.2f}" for t in times), flush=True)


if __name__ == "__main__":
    main()
