"""The segmentation network run by a faster CPU runtime: ONNX Runtime or OpenVINO, on the network exported to ONNX once.

PyTorch is the limit of whole-slide inference on a CPU (the slide path runs at 78 % of the network alone). The same
weights exported to ONNX and run by ONNX Runtime or OpenVINO give the same labels faster (measured: the model card).
:func:`exported` returns a module that the sliding-window inferers of ``inference.json`` and ``evaluate.json`` call
like the PyTorch network: a float tensor in, logits out.

The export is written once, atomically, beside its checkpoint (``model.pt`` -> ``model.onnx``) by MONAI's
``convert_to_onnx``, with dynamic batch and spatial axes, and carries the SHA-256 of the checkpoint it was made from
in its metadata: an export of another checkpoint is rebuilt (with a log line), never used.

``precision="bf16"`` lets OpenVINO run the network in bfloat16 on a CPU that computes it natively (AMX or AVX512-BF16,
e.g. Xeon Sapphire Rapids and later): the network 1.6-3.2x its fp32 speed there, its labels fp32's on 99.4-99.6 % of
tissue pixels (measured: the experiments log), hence opt-in. A CPU without it runs fp32, with a warning.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .atomic import atomic_output
from .checkpoints import load_network
from .errors import DataError

log = logging.getLogger(__name__)

# backend -> the package that runs it and the requirements file that installs it
RUNTIMES = {"onnxruntime": ("onnxruntime", "requirements.txt"), "openvino": ("openvino", "requirements-openvino.txt")}
BACKENDS = ("torch", *RUNTIMES)
PRECISIONS = ("fp32", "bf16")
STAMP = "checkpoint_sha256"  # the export's metadata key for the hash of its checkpoint
OPSET = 17


def exported(
    network: nn.Module,
    checkpoint: str | os.PathLike | None,
    backend: str = "torch",
    roi_size=(256, 256),
    in_channels: int = 3,
    precision: str = "fp32",
) -> nn.Module:
    """``network`` as ``backend`` runs it: itself for ``"torch"``, else the ONNX export of ``checkpoint``'s weights
    (the file beside it, rebuilt when it records another checkpoint's hash) in that runtime.

    Args:
        network: the segmentation network (its architecture; the weights are read from ``checkpoint``).
        checkpoint: the checkpoint the export is made from; None exports ``network``'s own (random) weights to a
            temporary file (development only).
        backend: ``"torch"``, ``"onnxruntime"`` or ``"openvino"``.
        roi_size: the spatial size of the example input the export is traced with (the axes stay dynamic).
        in_channels: the network's input channels.
        precision: ``"fp32"``, or ``"bf16"`` (``openvino`` only; see the module docstring).

    Returns:
        A module: B x in_channels x H x W float to B x C x H x W logits, on the input's device.
    """
    if precision not in PRECISIONS:
        raise DataError(f"unknown inference precision {precision!r}; choose one of {list(PRECISIONS)}")
    if precision != "fp32" and backend != "openvino":
        raise DataError(f"precision {precision!r} needs backend 'openvino'; backend {backend!r} runs fp32")
    if backend == "torch":
        return network
    if backend not in RUNTIMES:
        raise DataError(f"unknown inference backend {backend!r}; choose one of {list(BACKENDS)}")
    package, requirements = RUNTIMES[backend]
    try:
        runtime = importlib.import_module(package)
    except ImportError:
        raise DataError(
            f"backend {backend!r} needs the {package} package, which is not installed: pip install -r {requirements}"
        ) from None
    example = torch.rand(1, in_channels, *roi_size)
    run = OnnxRuntimeNetwork if backend == "onnxruntime" else functools.partial(OpenVINONetwork, precision=precision)
    if checkpoint is None:
        log.warning("no checkpoint: exporting the randomly initialised network to a temporary file")
        with tempfile.TemporaryDirectory() as folder:
            path = export_onnx(network, Path(folder) / "model.onnx", "none", example)
            return run(runtime, path)
    return run(runtime, current_export(network, checkpoint, example))


def checkpoint_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_stamp(path: Path) -> str | None:
    """The checkpoint hash an export records; None for a missing or unreadable file."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # a truncated or foreign file: protobuf's DecodeError, OSError, ...
        return None
    return {p.key: p.value for p in model.metadata_props}.get(STAMP)


def current_export(network: nn.Module, checkpoint: str | os.PathLike, example: torch.Tensor) -> Path:
    """The ONNX export beside ``checkpoint``, (re)built from its weights unless it records the checkpoint's hash."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise DataError(f"{checkpoint}: model checkpoint not found; train first (the export is made from it)")
    path, sha = checkpoint.with_suffix(".onnx"), checkpoint_sha256(checkpoint)
    stamp = export_stamp(path) if path.exists() else None
    if stamp == sha:
        return path
    if path.exists():
        log.info("%s: made from another checkpoint than %s (or unreadable); rebuilding it", path, checkpoint)
    else:
        log.info("%s: exporting %s to ONNX (once per checkpoint)", path, checkpoint)
    weights = load_network(copy.deepcopy(network), checkpoint, "segmentation model")
    return export_onnx(weights, path, sha, example)


def export_onnx(network: nn.Module, path: Path, sha: str, example: torch.Tensor) -> Path:
    """``network`` (on the CPU) to ONNX at ``path``, atomically, its checkpoint's hash in the metadata."""
    import onnx
    from monai.networks import convert_to_onnx

    network = copy.deepcopy(network).float().cpu().eval()
    axes = {0: "batch", 2: "height", 3: "width"}
    model = convert_to_onnx(
        network,
        [example],
        input_names=["image"],
        output_names=["logits"],
        opset_version=OPSET,
        dynamic_axes={"image": axes, "logits": axes},
        dynamo=False,  # measured: the dynamo exporter took over 10 min on this network with dynamic axes
    )
    onnx.helper.set_model_props(model, {STAMP: sha})
    with atomic_output(path) as tmp:
        onnx.save(model, str(tmp))
    return path


class OnnxRuntimeNetwork(nn.Module):
    """An ONNX file run by ONNX Runtime on the CPU with torch's thread count, full graph optimisation."""

    def __init__(self, runtime, path: Path):
        super().__init__()
        options = runtime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
        options.graph_optimization_level = runtime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = runtime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run(None, {"image": _numpy(x)})
        return torch.from_numpy(logits).to(x.device)


class OpenVINONetwork(nn.Module):
    """An ONNX file compiled by OpenVINO for the CPU with torch's thread count, in fp32 or (where the CPU computes it
    natively) bf16; fp16 is never used."""

    def __init__(self, runtime, path: Path, precision: str = "fp32"):
        super().__init__()
        core = runtime.Core()
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            log.warning("precision bf16: this CPU has no native bfloat16 (AMX or AVX512-BF16); OpenVINO runs fp32")
            precision = "fp32"
        self.precision = precision
        hint = {"fp32": "f32", "bf16": "bf16"}[precision]  # OpenVINO's names
        config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "INFERENCE_PRECISION_HINT": hint}
        self.request = core.compile_model(str(path), "CPU", config).create_infer_request()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.request.infer({0: _numpy(x)})[0]
        return torch.from_numpy(np.array(logits)).to(x.device)


def _numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().float().cpu().numpy())
