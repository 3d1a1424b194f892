"""Tile configurations of the Triton kernels and the one way they are launched.

Each kernel is a `Tiled`: its GPU autotune space per space key (the head dim for attention, the
row-block width for the row kernels) and the fixed tiles of the CPU interpreter, whose blocks of 16
make the small test shapes cross block boundaries. On a GPU the first launch of each tuning key
times the space's configurations (`triton.autotune`, a short benchmark) and keeps the fastest.

The spaces hold only configurations that compile for sm_90a (H100/H200) without register spills
and within one SM's shared memory: perf/static_sm90.py compiles every one of them without a GPU
and writes perf/results/static_sm90.json, and tests/test_static_sm90.py fails when a shipped
configuration spills or the report misses one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

try:
    import triton
except ImportError:  # the kernels are never launched without Triton
    triton = None

# Milliseconds of warm-up and of timed repetitions per configuration while autotuning: the spaces
# are small and GPU time is scarce, so far less than triton's defaults (25 and 100).
TUNE_WARMUP_MS, TUNE_REP_MS = 5, 25


def tile(num_warps: int, num_stages: int, **blocks: int) -> dict[str, int]:
    """One configuration: block sizes (constexprs) plus num_warps and num_stages."""
    return {**blocks, "num_warps": num_warps, "num_stages": num_stages}


def _bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, quantiles=quantiles)


def bucket(n: int) -> int:
    """A length rounded up to a power of two, at least 16: an autotune key that buckets the max
    lengths (at least 16 so the key argument keeps one specialisation: divisible by 16)."""
    return max(16, 1 << max(0, int(n) - 1).bit_length())


@dataclass(frozen=True)
class Launch:
    """One launch as a launcher builds it (recorded by `record` instead of running)."""

    tiled: Tiled
    space_key: object
    args: tuple
    kwargs: dict


@dataclass
class Tiled:
    """A Triton kernel with its GPU autotune spaces and the interpreter's tiles.

    key: the kernel arguments that select a tuning (triton.autotune adds the tensors' dtypes).
    """

    kernel: Callable
    spaces: dict[object, list[dict[str, int]]]
    cpu: dict[str, int] | Callable[[object], dict[str, int]]  # the interpreter's tiles (per space key)
    key: list[str] = field(default_factory=list)
    _tuners: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return getattr(self.kernel, "fn", self.kernel).__name__

    def space(self, space_key) -> list[dict[str, int]]:
        return self.spaces[space_key]

    def _tuner(self, space_key):
        tuner = self._tuners.get(space_key)
        if tuner is None:
            configs = [
                triton.Config(
                    {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")},
                    num_warps=cfg["num_warps"],
                    num_stages=cfg["num_stages"],
                )
                for cfg in self.space(space_key)
            ]
            tuner = self._tuners[space_key] = triton.autotune(configs=configs, key=self.key, do_bench=_bench)(
                self.kernel
            )
        return tuner

    def __call__(self, space_key, grid: Callable[[dict], tuple], device, *args, **kwargs) -> None:
        """Launch over grid(meta) (meta: the keyword arguments with the chosen tile), the tuned
        space on a GPU, the interpreter's tiles elsewhere."""
        if _recording is not None:
            _recording.append(Launch(self, space_key, args, kwargs))
        elif device.type == "cuda":
            self._tuner(space_key)[grid](*args, **kwargs)
        else:
            meta = {**kwargs, **(self.cpu(space_key) if callable(self.cpu) else self.cpu)}
            self.kernel[grid(meta)](*args, **meta)


_recording: list[Launch] | None = None


@contextlib.contextmanager
def record() -> Iterator[list[Launch]]:
    """Collect the launches the launchers make instead of running them (perf/static_sm90.py
    compiles exactly those arguments for sm_90a)."""
    global _recording
    previous, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = previous
