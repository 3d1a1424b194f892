"""Export of tokdrop models as full-sequence encoders (installed as ``tokdrop.export``).

    from tokdrop.export import to_onnx, to_aoti, to_tensorrt
    report = to_onnx("checkpoint_dir", "model.onnx", head="classifier", optimize=True)
    print(report.summary())

Each exporter validates its output against the PyTorch model (max abs difference per output,
ValidationError past the tolerance) and writes its files atomically. Heads, dtypes, shapes and
tolerances are described in `tokdrop.export.common`. The optional packages (onnx, onnxscript,
onnxruntime-gpu, torch_tensorrt, tensorrt) are imported only when a format needs them.
"""

from tokdrop.export.aoti_export import package_metadata, to_aoti
from tokdrop.export.common import (
    DTYPES,
    HEADS,
    INPUT_NAMES,
    TOLERANCES,
    ExportError,
    ExportReport,
    MissingDependencyError,
    Tolerance,
    ValidationError,
    load_model,
    make_inputs,
    prepare,
)
from tokdrop.export.onnx_export import fuse_for_ort, make_session, select_providers, to_onnx
from tokdrop.export.tensorrt_export import to_tensorrt, to_tensorrt_from_onnx

__all__ = [
    "DTYPES",
    "HEADS",
    "INPUT_NAMES",
    "TOLERANCES",
    "ExportError",
    "ExportReport",
    "MissingDependencyError",
    "Tolerance",
    "ValidationError",
    "fuse_for_ort",
    "load_model",
    "make_inputs",
    "make_session",
    "package_metadata",
    "prepare",
    "select_providers",
    "to_aoti",
    "to_onnx",
    "to_tensorrt",
    "to_tensorrt_from_onnx",
]
