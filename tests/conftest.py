import os
import sys
from pathlib import Path

import torch

# The tests import the installed tokdrop (site-packages, a wheel, or the editable finder), never the
# checkout's tokdrop/ folder, which `python -m pytest` puts on sys.path with the current directory:
# that folder lacks tokdrop.kernels and tokdrop.export, which the install maps from kernels/ and export/.
# Conftest runs before any test module is imported.
REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != REPO]

# Triton kernels run on CPU tensors through the interpreter; it must be chosen before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_collection_modifyitems(items):
    """Run the Triton-interpreter kernel tests first, in a process nothing else has touched yet: in
    full runs the interpreter segfaulted at random points after the export and compile tests had
    loaded compiled libraries (AOTInductor, ONNX Runtime, inductor kernels); alone it never did."""
    items.sort(key=lambda item: not item.path.name.startswith("test_kernels_"))
