"""TensorRT export. The CPU machines have no TensorRT: there the import must stay clean and asking
for TensorRT must name the missing package; the real exports run only where torch-tensorrt (or
tensorrt) and a CUDA GPU exist, and skip with that reason elsewhere."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tokdrop
from tokdrop.export import MissingDependencyError, to_tensorrt, to_tensorrt_from_onnx

HAS_TORCH_TRT = importlib.util.find_spec("torch_tensorrt") is not None
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript"))
GPU = torch.cuda.is_available()
NEEDS_TORCH_TRT = "needs torch-tensorrt and an NVIDIA GPU (the CPU CI machines have neither)"
NEEDS_TRT = "needs TensorRT's Python package (tensorrt), onnx and an NVIDIA GPU (not on the CPU CI machines)"

TINY = tokdrop.BertConfig(
    vocab_size=211,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = tokdrop.BertForSequenceClassification(dataclasses.replace(TINY, num_labels=3))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    directory = tmp_path_factory.mktemp("trt") / "cls"
    model.save_pretrained(directory)
    return directory


def test_export_package_imports_without_tensorrt(tmp_path):
    code = (
        "import sys; import tokdrop.export as e; "
        "assert 'torch_tensorrt' not in sys.modules and 'tensorrt' not in sys.modules; "
        "assert callable(e.to_tensorrt)"
    )
    # Outside the checkout, whose tokdrop/ folder would shadow the installed package.
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(HAS_TORCH_TRT, reason="torch-tensorrt is installed here")
def test_missing_torch_tensorrt_is_named(checkpoint, tmp_path):
    with pytest.raises(MissingDependencyError, match="torch-tensorrt") as err:
        to_tensorrt(checkpoint, tmp_path / "model.ep")
    assert isinstance(err.value, ImportError)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_missing_tensorrt_is_named(checkpoint, tmp_path):
    with pytest.raises(MissingDependencyError, match="'tensorrt'"):
        to_tensorrt_from_onnx(checkpoint, tmp_path / "model.engine")
    with pytest.raises(MissingDependencyError, match="'tensorrt'"):
        to_tensorrt(checkpoint, tmp_path / "model.engine", route="onnx")


def test_tensorrt_rejects_bad_output_names(checkpoint, tmp_path):
    from tokdrop.export import ExportError

    with pytest.raises(ExportError, match=r"\.ep or \.pt2"):
        to_tensorrt(checkpoint, tmp_path / "model.onnx")
    with pytest.raises(ExportError, match="route"):
        to_tensorrt(checkpoint, tmp_path / "model.ep", route="tf")
    for name, value in (("opt_batch", 0), ("opt_seq_len", -8), ("workspace_bytes", 1.5)):
        with pytest.raises(ExportError, match=f"{name} must be None or an int >= 1"):
            to_tensorrt(checkpoint, tmp_path / "model.ep", **{name: value})
    with pytest.raises(ExportError, match="dtype 'bf16'"):
        to_tensorrt(checkpoint, tmp_path / "model.engine", route="onnx", dtype="bf16")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not (HAS_TORCH_TRT and GPU), reason=NEEDS_TORCH_TRT)
@pytest.mark.parametrize(("suffix", "dtype"), [(".ep", "fp32"), (".pt2", "fp32"), (".ep", "fp16")])
def test_torch_tensorrt_export_reloads_and_validates(checkpoint, tmp_path, suffix, dtype):
    path = tmp_path / f"model{suffix}"
    report = to_tensorrt(checkpoint, path, max_batch=4, max_seq_len=64, opt_batch=2, opt_seq_len=32, dtype=dtype)
    assert path.is_file() and report.ok
    assert report.tolerance.atol == (1e-5 if dtype == "fp32" else 2e-2)


@pytest.mark.skipif(not (HAS_TRT and HAS_ONNX and GPU), reason=NEEDS_TRT)
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_tensorrt_onnx_route(checkpoint, tmp_path, dtype):
    path = tmp_path / "model.engine"
    report = to_tensorrt_from_onnx(checkpoint, path, max_batch=4, max_seq_len=64, dtype=dtype)
    assert path.is_file() and report.ok
