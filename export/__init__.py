"""Export of tokdrop models as full-sequence encoders (installed as ``tokdrop.export``).

    from tokdrop.export import to_onnx, to_aoti, to_tensorrt
    report = to_onnx("checkpoint_dir", "model.onnx", head="classifier", optimize=True)
    print(report.summary())

Each exporter validates its output against the PyTorch model (max abs difference per output,
ValidationError past the tolerance) and writes its files atomically. The signature of the exported
graphs is described in `tokdrop.export.signature`, the steps every format shares in
`tokdrop.export.pipeline`. The optional packages (onnx, onnxscript, onnxruntime-gpu,
torch_tensorrt, tensorrt) are imported only when a format needs them, and torch only when a name
of this package is first used.
"""

from tokdrop.lazy import lazy_attributes

_SOURCES = {
    "DTYPES": "heads",
    "HEADS": "signature",
    "INPUT_NAMES": "signature",
    "TOLERANCES": "tolerances",
    "ExportError": "errors",
    "ExportOptions": "pipeline",
    "ExportReport": "report",
    "MissingDependencyError": "errors",
    "Tolerance": "tolerances",
    "ValidationError": "validation",
    "fuse_for_ort": "onnx_export",
    "load_model": "preparation",
    "make_inputs": "shapes",
    "make_session": "onnx_export",
    "package_metadata": "aoti_export",
    "prepare": "preparation",
    "run_export": "pipeline",
    "select_providers": "onnx_export",
    "to_aoti": "aoti_export",
    "to_onnx": "onnx_export",
    "to_tensorrt": "tensorrt_export",
    "to_tensorrt_from_onnx": "tensorrt_export",
}
__getattr__, __dir__ = lazy_attributes(__name__, _SOURCES)
__all__ = sorted(_SOURCES)
