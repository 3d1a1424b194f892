"""The attention backends and the one dispatcher that picks among them for attention and for the
drop/restore row ops.

Contract of a backend's attention in the padded layout:

    q        [B, Lq, NH, D]   row b has q_lens[b] valid queries, at positions < q_lens[b]
    k, v     [B, Lk, NH, D]   row b has k_lens[b] valid keys, at positions < k_lens[b]
    q_lens   [B] int          0 <= q_lens[b] <= Lq
    k_lens   [B] int          1 <= k_lens[b] <= Lk wherever q_lens[b] > 0
    returns  [B, Lq, NH, D]   query rows >= q_lens[b] are exactly zero (never NaN)

Queries of a row see exactly the first k_lens[b] keys of that row (no causal mask). The packed
layout (`attention_varlen`) takes q [Tq, NH, D], k/v [Tk, NH, D] and cumulative offsets
cu_seqlens_q/k [B+1]; backends without a packed kernel run it through the padded one (on the CPU,
over buckets of sequences of similar length, each padded only to its own longest).

Which backend runs, highest priority first: the innermost `use_backend(name)` block, the
environment variable $TOKDROP_ATTENTION, the model's request (`BertConfig.attn_backend`), the
device's best (`triton` on CUDA, `sdpa` elsewhere). A model resolves this once per forward pass
(`resolve_backend`) and runs every layer of the pass inside `active_backend(...)`; code outside a
model resolves per call. A backend that cannot take a case (the Triton kernels lack a head dim or
dtype) falls back to `sdpa`: logged once, and named in the resolved record's repr.

Compiled graphs follow `use_backend` (dynamo guards on it); $TOKDROP_ATTENTION is read when a graph
is traced, so set it before compiling.

Backends: `triton` (tokdrop's kernels; CUDA, or CPU under TRITON_INTERPRET=1), `sdpa`
(F.scaled_dot_product_attention with a length mask), `flex` (FlexAttention; no dropout), `varlen`
(torch.nn.attention.varlen, FlashAttention on CUDA; no dropout), `xformers` (when installed),
`eager` (the float64-capable reference). `register_backend` adds more.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from . import subset_attention as sa
from .validate import check_lengths, check_packed

ENV_VAR = "TOKDROP_ATTENTION"
# What stands in for a backend that cannot take a case.
FALLBACK = "sdpa"

log = logging.getLogger("tokdrop.kernels")

AttentionFn = Callable[..., Tensor]


@dataclasses.dataclass(frozen=True)
class Backend:
    """An attention implementation and what it can run.

    attention: fn(q, k, v, q_lens, k_lens, *, scale, dropout_p) in the padded layout, or None when
        the backend is unavailable (`unavailable` says why).
    varlen: fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, scale, dropout_p)
        in the packed layout; None runs the packed layout through `attention`.
    devices: the device types it runs on (None: any); `unavailable` says why not on the others.
    unsupported: fn(dtype, head_dim) -> the reason it cannot take such queries, or None.
    triton_rows: drop/restore run tokdrop's Triton row kernels under this backend.
    fallback_for: set on the record that stands in for another backend: (its name, the reason).
    """

    name: str
    attention: AttentionFn | None
    varlen: AttentionFn | None = None
    devices: tuple[str, ...] | None = None
    unavailable: str = ""
    unsupported: Callable[[torch.dtype, int], str | None] | None = None
    triton_rows: bool = False
    fallback_for: tuple[str, str] | None = None

    def __repr__(self) -> str:
        if self.fallback_for is None:
            return f"Backend({self.name!r})"
        return f"Backend({self.name!r}, standing in for {self.fallback_for[0]!r}: {self.fallback_for[1]})"


_REGISTRY: dict[str, Backend] = {}
_override: str | None = None  # the innermost use_backend block's name
_active: Backend | None = None  # what the running model forward resolved
_stand_ins: dict[tuple[str, str], Backend] = {}


def register_backend(backend: Backend) -> None:
    """Make `backend` dispatchable under its name (replacing one of the same name)."""
    if not isinstance(backend, Backend):
        raise TypeError(f"register_backend takes a Backend record, got {type(backend).__name__}")
    _REGISTRY[backend.name] = backend


def backend_names() -> tuple[str, ...]:
    """Every registered backend, available here or not."""
    return tuple(_REGISTRY)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run attention on backend `name` inside the block, whatever the models and the environment
    ask for (e.g. an exporter tracing plain graph ops)."""
    global _override
    if name not in _REGISTRY:
        raise ValueError(f"{name!r} is not an attention backend; expected one of {backend_names()}")
    outer, _override = _override, name
    try:
        yield
    finally:
        _override = outer


class active_backend:
    """Within the block, attention and the row ops run `backend` (one model forward pass)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def __enter__(self) -> None:
        global _active
        self.outer, _active = _active, self.backend

    def __exit__(self, *exc: object) -> None:
        global _active
        _active = self.outer


def _default(device_type: str) -> str:
    triton = _REGISTRY["triton"]
    return "triton" if device_type == "cuda" and triton.attention is not None else FALLBACK


def resolve_backend(
    requested: str | None, device_type: str, dtype: torch.dtype | None = None, head_dim: int | None = None
) -> Backend:
    """The backend that runs for `requested` (None: the device's best) on `device_type`, given the
    queries' dtype and head dim when known. Raises ValueError for an unknown or unavailable name."""
    env = os.environ.get(ENV_VAR) or None
    name = _override or env or requested or _default(device_type)
    backend = _REGISTRY.get(name)
    if backend is None:
        source = "use_backend" if _override else f"${ENV_VAR}" if env else "attn_backend"
        raise ValueError(f"{source}={name!r} is not an attention backend; expected one of {backend_names()}")
    if backend.attention is None:
        raise ValueError(f"attention backend {name!r} is not available: {backend.unavailable}")
    if backend.devices is not None and device_type not in backend.devices:
        raise ValueError(f"attention backend {name!r} is not available on {device_type} tensors: {backend.unavailable}")
    if dtype is not None and head_dim is not None:
        return _capable(backend, dtype, head_dim)
    return backend


def _capable(backend: Backend, dtype: torch.dtype, head_dim: int) -> Backend:
    """`backend`, or the fallback standing in for it when it cannot take such queries."""
    reason = None if backend.unsupported is None else backend.unsupported(dtype, head_dim)
    if reason is None:
        return backend
    if not torch.compiler.is_compiling():
        _log_fallback(backend.name, reason)
    return _stand_in(backend.name, reason)


def _stand_in(name: str, reason: str) -> Backend:
    """One record per (backend, reason), so that compiled graphs see the same object each time."""
    key = (name, reason)
    if key not in _stand_ins:
        _stand_ins[key] = dataclasses.replace(_REGISTRY[FALLBACK], fallback_for=key)
    return _stand_ins[key]


@functools.cache
def _log_fallback(name: str, reason: str) -> None:
    log.warning("attention backend %r falls back to %r: %s", name, FALLBACK, reason)


def current_backend(device_type: str) -> Backend:
    """The backend of the running model forward, else the one resolved for this device."""
    return _active if _active is not None else resolve_backend(None, device_type)


def _for_queries(q: Tensor, backend: str | None) -> Backend:
    if backend is None and _active is not None:
        return _capable(_active, q.dtype, q.shape[-1])
    return resolve_backend(backend, q.device.type, q.dtype, q.shape[-1])


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_lens: Tensor,
    k_lens: Tensor,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
    validate: bool = True,
) -> Tensor:
    """Attention in the padded layout (shapes in the module docstring) on the chosen backend.

    backend: a request (None: the running model's backend, else the device's best); `use_backend`
    and $TOKDROP_ATTENTION win over it. validate: check the lengths' values against the shapes
    first (one device sync, skipped under torch.compile); callers that derive the lengths from the
    shapes can turn it off.
    """
    chosen = _for_queries(q, backend)
    if validate:
        check_lengths(q_lens, k_lens, q.shape[1], k.shape[1])
    return chosen.attention(q, k, v, q_lens, k_lens, scale=scale, dropout_p=dropout_p)


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
    validate: bool = True,
) -> Tensor:
    """Attention in the packed layout: q [Tq, NH, D], k/v [Tk, NH, D], sequences at the offsets
    cu_seqlens_q/k [B+1], each at most max_seqlen_q/k long (static ints). Rows past
    cu_seqlens_q[-1] come out zero. backend and validate as in `attention`."""
    chosen = _for_queries(q, backend)
    if validate:
        check_packed(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if chosen.varlen is not None:
        return chosen.varlen(*args, scale=scale, dropout_p=dropout_p)
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        return sa.packed_in_buckets(
            chosen.attention, q, k, v, cu_seqlens_q, cu_seqlens_k, scale=scale, dropout_p=dropout_p
        )
    return sa.packed_via_padded(chosen.attention, *args, scale=scale, dropout_p=dropout_p)


# --------------------------------------------------------------------------------------------------
# The backends
# --------------------------------------------------------------------------------------------------


def _sdpa(
    q: Tensor, k: Tensor, v: Tensor, q_lens: Tensor, k_lens: Tensor, *, scale: float | None = None, dropout_p=0.0
) -> Tensor:
    q_valid, k_visible = sa.length_masks(q_lens, k_lens, q.shape[1], k.shape[1])
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=k_visible[:, None, None, :],
        dropout_p=dropout_p,
        scale=scale,
    ).transpose(1, 2)
    return out.masked_fill(~q_valid[:, :, None, None], 0.0)


def _no_dropout(name: str, dropout_p: float) -> None:
    if dropout_p > 0.0:
        raise ValueError(
            f"the {name} attention backend has no attention dropout (dropout_p={dropout_p}); "
            "use triton, sdpa or eager for training with dropout"
        )


def _pack_order(lens: Tensor, length: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pack the rows of a padded [B, L, ...] tensor, flattened to [B*L, ...], with static sizes.

    Returns the gather order (valid rows first, in order, then the padding rows), the cumulative
    offsets [B+1] int32 of the sequences in the packed order, and which packed rows are valid.
    """
    valid = (torch.arange(length, device=lens.device) < lens[:, None]).flatten()
    order = torch.argsort((~valid).to(torch.uint8), stable=True)
    cu_seqlens = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
    return order, cu_seqlens, valid[order]


def via_packed(packed_fn: Callable[..., Tensor]) -> AttentionFn:
    """Padded-layout attention run(q, k, v, q_lens, k_lens, *, scale) from a packed-layout
    packed_fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k) (no dropout, default scale) that takes
    [T, NH, D] tensors whose rows past cu_seqlens[-1] it neither reads nor writes."""

    def run(q: Tensor, k: Tensor, v: Tensor, q_lens: Tensor, k_lens: Tensor, *, scale: float | None = None) -> Tensor:
        batch, lq, lk = q.shape[0], q.shape[1], k.shape[1]
        q_order, cu_q, q_used = _pack_order(q_lens, lq)
        k_order, cu_k, k_used = _pack_order(k_lens, lk)

        def pack(x: Tensor, order: Tensor, used: Tensor) -> Tensor:
            # Zeroed tail rows also stop whatever packed_fn leaves in their gradient.
            return torch.where(used[:, None, None], x.flatten(0, 1)[order], 0.0)

        if scale is not None:  # folded into q: keeps to varlen_attn's oldest signature
            q = q * (scale * q.shape[-1] ** 0.5)
        out = packed_fn(
            pack(q, q_order, q_used), pack(k, k_order, k_used), pack(v, k_order, k_used), cu_q, cu_k, lq, lk
        )
        # Padding query rows land on the zeroed tail; packed_fn never wrote it.
        out = torch.where(q_used[:, None, None], out, 0.0)
        return out[torch.argsort(q_order)].unflatten(0, (batch, lq))

    return run


def _triton_backend() -> Backend:
    if sa.triton is None:
        return Backend("triton", None, unavailable="triton is not installed (pip install 'tokdrop[gpu]')")

    def padded(q, k, v, q_lens, k_lens, *, scale=None, dropout_p=0.0):
        return sa.triton_attention(q, k, v, q_lens, k_lens, scale=scale, dropout_p=dropout_p, validate=False)[0]

    def packed(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, dropout_p=0.0):
        out = sa.triton_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, dropout_p=dropout_p)[0]
        # The kernels leave rows past the last sequence unwritten.
        return out.masked_fill((torch.arange(q.shape[0], device=q.device) >= cu_q[-1])[:, None, None], 0.0)

    return Backend(
        "triton",
        padded,
        varlen=packed,
        devices=("cuda", "cpu") if sa.INTERPRETED else ("cuda",),
        unavailable="it needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported",
        unsupported=sa.unsupported,
        triton_rows=True,
    )


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled FlexAttention materialises the scores; compile it once for GPUs.
    return torch.compile(flex_attention, dynamic=False)


def _flex_backend() -> Backend:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as err:
        return Backend("flex", None, unavailable=f"torch {torch.__version__} has no FlexAttention ({err})")

    def run(q, k, v, q_lens, k_lens, *, scale=None, dropout_p=0.0):
        _no_dropout("flex", dropout_p)

        def length_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return (q_idx < q_lens[b]) & (kv_idx < k_lens[b])

        block_mask = create_block_mask(length_mask, q.shape[0], None, q.shape[1], k.shape[1], device=q.device)
        flex = _compiled_flex() if q.is_cuda else flex_attention
        out = flex(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale=scale
        ).transpose(1, 2)
        # Fully masked rows come out as zeros already; masked_fill makes that a contract.
        q_valid, _ = sa.length_masks(q_lens, k_lens, q.shape[1], k.shape[1])
        return out.masked_fill(~q_valid[:, :, None, None], 0.0)

    return Backend("flex", run)


def _varlen_backend() -> Backend:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as err:
        return Backend(
            "varlen", None, unavailable=f"torch {torch.__version__} has no torch.nn.attention.varlen ({err})"
        )
    padded = via_packed(varlen_attn)

    def run(q, k, v, q_lens, k_lens, *, scale=None, dropout_p=0.0):
        _no_dropout("varlen", dropout_p)
        return padded(q, k, v, q_lens, k_lens, scale=scale)

    def packed(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, dropout_p=0.0):
        _no_dropout("varlen", dropout_p)
        if scale is not None:  # folded into q, as in via_packed
            q = q * (scale * q.shape[-1] ** 0.5)
        out = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k)
        return out.masked_fill((torch.arange(q.shape[0], device=q.device) >= cu_q[-1])[:, None, None], 0.0)

    return Backend(
        "varlen",
        run,
        varlen=packed,
        devices=("cuda",),
        unavailable="varlen_attn runs FlashAttention kernels, which need CUDA tensors",
    )


def _xformers_backend() -> Backend:
    try:
        from xformers.ops import memory_efficient_attention
    except ImportError:
        return Backend("xformers", None, unavailable="xformers is not installed")

    def run(q, k, v, q_lens, k_lens, *, scale=None, dropout_p=0.0):
        batch, lq, lk = q.shape[0], q.shape[1], k.shape[1]
        q_valid, k_visible = sa.length_masks(q_lens, k_lens, lq, lk)
        # A tensor bias keeps the layout static (the block-diagonal masks want Python lists); its
        # rows must be 8-aligned in memory, hence the wider allocation.
        bias = q.new_zeros((batch, 1, lq, -(-lk // 8) * 8))[..., :lk]
        bias.masked_fill_(~k_visible[:, None, None, :], float("-inf"))
        out = memory_efficient_attention(
            q, k, v, attn_bias=bias.expand(-1, q.shape[2], -1, -1), p=dropout_p, scale=scale
        )
        return out.masked_fill(~q_valid[:, :, None, None], 0.0)

    return Backend("xformers", run, devices=("cuda",), unavailable="xformers kernels need CUDA tensors")


for _backend in (
    _triton_backend(),
    Backend("sdpa", _sdpa),
    _flex_backend(),
    _varlen_backend(),
    _xformers_backend(),
    Backend("eager", sa.attention_reference),
):
    register_backend(_backend)
