"""The errors of an export, and the import of optional packages that names what to install."""

from __future__ import annotations

import importlib
from types import ModuleType

# The packages of the `tokdrop[export]` extra.
EXPORT_EXTRA = ("onnx", "onnxscript", "onnxruntime-gpu")


class ExportError(ValueError):
    """Bad input to an export (missing/corrupt model, unsupported head, bad ranges, unwritable path)."""


class MissingDependencyError(ExportError, ImportError):
    """An optional package (onnx, onnxruntime, onnxscript, torch_tensorrt, tensorrt) is not installed."""


def require(module: str, package: str, purpose: str) -> ModuleType:
    """Import `module` or raise MissingDependencyError naming the pip package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = " or `pip install 'tokdrop[export]'`" if package in EXPORT_EXTRA else ""
        raise MissingDependencyError(
            f"{purpose} needs the Python package {package!r} (import name {module!r}), which is not "
            f"installed: {err}. Install it with `pip install {package}`{extra}"
        ) from err
