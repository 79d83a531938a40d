"""The exported network: the same logits as PyTorch in ONNX Runtime and OpenVINO, the export written once beside its
checkpoint and rebuilt (never used) when the checkpoint changes, nothing left by a failed export, and clear errors for
an unknown backend or a missing runtime."""

import importlib
import logging

import numpy as np
import pytest
import torch
from torch import nn

from scripts import export
from scripts.errors import DataError
from scripts.export import checkpoint_sha256, export_stamp, exported

torch.set_num_threads(1)


class TinyNet(nn.Module):
    """Two classes from RGB, through a strided convolution and back, so that the spatial axes are exercised."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)

    def forward(self, x):
        return self.up(torch.relu(self.down(x)))


def checkpoint(path, seed: int):
    torch.manual_seed(seed)
    torch.save({"model": TinyNet().state_dict(), "contract": {"classes": ["a", "b"]}}, path)
    return path


def torch_logits(path, x):
    net = TinyNet().eval()
    net.load_state_dict(torch.load(path, weights_only=True)["model"])
    with torch.no_grad():
        return net(x)


RUNTIMES = [
    "onnxruntime",
    pytest.param(
        "openvino",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("openvino") is None, reason="openvino not installed (requirements-openvino.txt)"
        ),
    ),
]


@pytest.mark.parametrize("backend", RUNTIMES)
def test_same_logits_as_pytorch_at_any_batch_and_size(tmp_path, backend):
    ckpt = checkpoint(tmp_path / "model.pt", 0)
    net = exported(TinyNet(), ckpt, backend, roi_size=(32, 32))  # the random weights of TinyNet() are not used
    assert (tmp_path / "model.onnx").is_file() and export_stamp(tmp_path / "model.onnx") == checkpoint_sha256(ckpt)
    for shape in ((2, 3, 32, 32), (5, 3, 64, 48)):
        x = torch.rand(shape)
        assert torch.allclose(net(x), torch_logits(ckpt, x), atol=1e-5)


@RUNTIMES[1].marks[0]
def test_openvino_bf16_where_the_cpu_has_it_and_fp32_with_a_warning_where_not(tmp_path, monkeypatch, caplog):
    import openvino

    ckpt = checkpoint(tmp_path / "model.pt", 0)
    x = torch.rand(2, 3, 32, 32)
    reference = torch_logits(ckpt, x)
    native = "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    net = exported(TinyNet(), ckpt, "openvino", roi_size=(32, 32), precision="bf16")
    assert net.precision == ("bf16" if native else "fp32")
    error = (net(x) - reference).abs().max()
    assert error < 0.05 * reference.abs().max()  # bfloat16 keeps 8 bits of mantissa: close, not equal
    if native:
        assert error > 1e-6  # bf16 really ran: fp32 would match to rounding

    class CoreWithoutBF16(openvino.Core):  # a CPU without native bfloat16
        def get_property(self, device, name):
            return ["FP32"] if name == "OPTIMIZATION_CAPABILITIES" else super().get_property(device, name)

    monkeypatch.setattr(openvino, "Core", CoreWithoutBF16)
    with caplog.at_level(logging.WARNING, logger="scripts.export"):
        net = exported(TinyNet(), ckpt, "openvino", roi_size=(32, 32), precision="bf16")
    assert net.precision == "fp32" and "no native bfloat16" in caplog.text
    assert torch.allclose(net(x), reference, atol=1e-5)


def test_torch_backend_is_the_network_itself(tmp_path):
    net = TinyNet()
    assert exported(net, tmp_path / "model.pt", "torch") is net
    assert not list(tmp_path.iterdir())


def test_export_is_reused_and_a_stale_one_rebuilt_with_a_log_line(tmp_path, caplog):
    ckpt = checkpoint(tmp_path / "model.pt", 0)
    exported(TinyNet(), ckpt, "onnxruntime", roi_size=(32, 32))
    onnx_file = tmp_path / "model.onnx"
    first = onnx_file.stat().st_mtime_ns
    caplog.clear()  # the first export's line, kept where an earlier test left logging at INFO
    with caplog.at_level(logging.INFO, logger="scripts.export"):
        exported(TinyNet(), ckpt, "onnxruntime", roi_size=(32, 32))
    assert onnx_file.stat().st_mtime_ns == first and not caplog.records  # the same checkpoint: used as it is

    checkpoint(ckpt, 1)  # another training wrote a new model.pt
    with caplog.at_level(logging.INFO, logger="scripts.export"):
        net = exported(TinyNet(), ckpt, "onnxruntime", roi_size=(32, 32))
    assert "made from another checkpoint" in caplog.text and str(onnx_file) in caplog.text
    assert export_stamp(onnx_file) == checkpoint_sha256(ckpt)
    x = torch.rand(1, 3, 32, 32)
    assert torch.allclose(net(x), torch_logits(ckpt, x), atol=1e-5)  # the new weights, not the stale export's

    onnx_file.write_bytes(b"not onnx")  # a damaged export is rebuilt too
    exported(TinyNet(), ckpt, "onnxruntime", roi_size=(32, 32))
    assert export_stamp(onnx_file) == checkpoint_sha256(ckpt)


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    ckpt = checkpoint(tmp_path / "model.pt", 0)

    def full_disk(model, path):
        open(path, "wb").write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("onnx.save", full_disk)
    with pytest.raises(OSError, match="No space"):
        exported(TinyNet(), ckpt, "onnxruntime", roi_size=(32, 32))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_no_checkpoint_exports_the_random_network_to_a_temporary_file(tmp_path):
    net = TinyNet().eval()
    run = exported(net, None, "onnxruntime", roi_size=(32, 32))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(run(x), net(x), atol=1e-5)


def test_bad_settings_are_one_line_errors(tmp_path, monkeypatch):
    ckpt = checkpoint(tmp_path / "model.pt", 0)
    with pytest.raises(DataError, match="unknown inference backend 'tensorrt'.*'onnxruntime'"):
        exported(TinyNet(), ckpt, "tensorrt")
    with pytest.raises(DataError, match="missing.pt: model checkpoint not found"):
        exported(TinyNet(), tmp_path / "missing.pt", "onnxruntime")
    with pytest.raises(DataError, match="model.pt: not a segmentation model checkpoint"):
        exported(nn.Conv2d(3, 2, 1), ckpt, "onnxruntime")
    with pytest.raises(DataError, match="unknown inference precision 'fp16'"):
        exported(TinyNet(), ckpt, "openvino", precision="fp16")
    for backend in ("torch", "onnxruntime"):
        with pytest.raises(DataError, match=f"precision 'bf16' needs backend 'openvino'; backend '{backend}'"):
            exported(TinyNet(), ckpt, backend, precision="bf16")

    real_import = importlib.import_module
    monkeypatch.setattr(
        export.importlib,
        "import_module",
        lambda name: (_ for _ in ()).throw(ImportError(name)) if name == "openvino" else real_import(name),
    )
    with pytest.raises(DataError, match=r"needs the openvino package.*pip install -r requirements-openvino.txt"):
        exported(TinyNet(), ckpt, "openvino")


def test_labels_agree_on_a_real_sized_network(tmp_path):
    """The bundle's FlexibleUNet (random weights), 128-px windows: ONNX Runtime's labels are PyTorch's."""
    from monai.networks.nets import FlexibleUNet

    import scripts.seg.net  # noqa: F401  (registers efficientnet-lite0)

    torch.manual_seed(0)
    net = FlexibleUNet(3, 3, "efficientnet-lite0", pretrained=False).eval()
    torch.save({"model": net.state_dict()}, tmp_path / "model.pt")
    run = exported(FlexibleUNet(3, 3, "efficientnet-lite0", pretrained=False), tmp_path / "model.pt", "onnxruntime")
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        ours, theirs = run(x), net(x)
    assert (ours.argmax(1) == theirs.argmax(1)).float().mean() > 0.999
    assert np.abs((ours - theirs).numpy()).max() < 1e-3
