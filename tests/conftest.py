import os

import torch

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
