"""Bounds checking for Triton kernels run by the interpreter (TRITON_INTERPRET=1).

On a GPU an out-of-bounds load is an illegal-address fault at best and a silently wrong value at
worst; the interpreter dereferences raw addresses and may just read neighbouring memory. While
`checked_memory()` is active, every load and store a kernel issues with its mask on must fall inside
the storage of one of that launch's tensor arguments, or the launch fails with AssertionError.
It wraps three internals of triton.runtime.interpreter (present in triton 3.6 to 3.9).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from triton.runtime import interpreter


class _Launches:
    """Byte ranges [start, end) of the storages of the tensor arguments of the running launch."""

    ranges: list[tuple[int, int]] = []


def _storage_range(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _check(kind: str, pointers, mask, itemsize: int) -> None:
    addresses = pointers.data.astype(np.uint64)[np.broadcast_to(mask.data, pointers.data.shape)]
    inside = np.zeros(addresses.shape, dtype=bool)
    for start, end in _Launches.ranges:
        inside |= (addresses >= start) & (addresses + itemsize <= end)
    if not inside.all():
        raise AssertionError(
            f"out-of-bounds {kind}: {int((~inside).sum())} of {addresses.size} addresses lie "
            "outside every tensor argument of the launch"
        )


@contextlib.contextmanager
def checked_memory():
    builder = type(interpreter.interpreter_builder)
    launch, load, store = interpreter.GridExecutor.__call__, builder.create_masked_load, builder.create_masked_store

    def checked_launch(self, *args, **kwargs):
        outer = _Launches.ranges
        _Launches.ranges = [_storage_range(a) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        try:
            return launch(self, *args, **kwargs)
        finally:
            _Launches.ranges = outer

    def checked_load(self, pointers, mask, other, *rest):
        _check("load", pointers, mask, interpreter._get_np_dtype(pointers.get_element_ty()).itemsize)
        return load(self, pointers, mask, other, *rest)

    def checked_store(self, pointers, value, mask, *rest):
        _check("store", pointers, mask, value.data.dtype.itemsize)
        return store(self, pointers, value, mask, *rest)

    interpreter.GridExecutor.__call__ = checked_launch
    builder.create_masked_load, builder.create_masked_store = checked_load, checked_store
    try:
        yield
    finally:
        interpreter.GridExecutor.__call__ = launch
        builder.create_masked_load, builder.create_masked_store = load, store
