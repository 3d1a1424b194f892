"""Variable-length, non-causal attention in the padded-batch layout, and the backend dispatcher.

Shapes (the contract every backend honours):

    q        [B, Lq, NH, D]   row b has q_lens[b] valid queries, at positions < q_lens[b]
    k, v     [B, Lk, NH, D]   row b has k_lens[b] valid keys, at positions < k_lens[b]
    q_lens   [B] int          0 <= q_lens[b] <= Lq
    k_lens   [B] int          1 <= k_lens[b] <= Lk wherever q_lens[b] > 0
    returns  [B, Lq, NH, D]   query rows >= q_lens[b] are exactly zero (never NaN)

Queries of a row see exactly the first k_lens[b] keys of that row (no causal mask).

Backends: `triton` (our kernels; default on CUDA; on CPU only under TRITON_INTERPRET=1; head dims
or dtypes the kernels lack run the `sdpa` path), `sdpa` (default elsewhere), `flex` (FlexAttention
with a length mask; no dropout), `varlen` (torch.nn.attention.varlen on CUDA; no dropout),
`xformers` (when installed), `eager` (the float64-capable reference).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .validate import check_lengths

ENV_VAR = "TOKDROP_ATTENTION"
BACKENDS = ("triton", "sdpa", "flex", "varlen", "xformers", "eager")

AttentionFn = Callable[..., Tensor]
_IMPLS: dict[str, AttentionFn] = {}
_MISSING: dict[str, str] = {}
_DEVICES: dict[str, tuple[str, ...]] = {}


def register_backend(
    name: str,
    fn: AttentionFn | None,
    missing: str = "",
    devices: tuple[str, ...] | None = None,
) -> None:
    """Make `name` dispatchable to `fn`, or record why it is unavailable (`fn=None`).

    `devices` limits `fn` to those device types; `missing` then says why others cannot run it.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS}")
    for table in (_IMPLS, _MISSING, _DEVICES):
        table.pop(name, None)
    if fn is not None:
        _IMPLS[name] = fn
    if devices is not None:
        _DEVICES[name] = devices
    if fn is None or devices is not None:
        _MISSING[name] = missing


def _runs_on(name: str, device_type: str) -> bool:
    return name in _IMPLS and device_type in _DEVICES.get(name, (device_type,))


def _default_backend(device_type: str) -> str:
    return "triton" if device_type == "cuda" and _runs_on("triton", "cuda") else "sdpa"


@torch.compiler.assume_constant_result
def resolve_backend(requested: str | None, device_type: str) -> str:
    """The backend to run: $TOKDROP_ATTENTION wins over `requested`; None means the device's best."""
    name = os.environ.get(ENV_VAR) or requested or _default_backend(device_type)
    if name not in BACKENDS:
        source = f"${ENV_VAR}" if os.environ.get(ENV_VAR) else "attn_backend"
        raise ValueError(f"{source}={name!r} is not an attention backend; expected one of {BACKENDS}")
    if not _runs_on(name, device_type):
        why = _MISSING.get(name) or "it is not implemented in this version of tokdrop"
        where = f" on {device_type} tensors" if name in _IMPLS else ""
        raise ValueError(f"attention backend {name!r} is not available{where}: {why}")
    return name


def _length_masks(q_lens: Tensor, k_lens: Tensor, lq: int, lk: int) -> tuple[Tensor, Tensor]:
    """Boolean [B, Lq] valid-query and [B, Lk] visible-key masks.

    A row without keys sees all of them instead: its queries are zeroed anyway, and a fully masked
    softmax row would put NaN into the backward pass.
    """
    q_valid = torch.arange(lq, device=q_lens.device) < q_lens[:, None]
    k_visible = torch.arange(lk, device=k_lens.device) < k_lens[:, None]
    k_visible = k_visible | (k_lens == 0)[:, None]
    return q_valid, k_visible


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_lens: Tensor,
    k_lens: Tensor,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_mask: Tensor | None = None,
) -> Tensor:
    """Plain PyTorch attention (any dtype, float64 included); softmax in at least float32.

    dropout_mask: bool [B, NH, Lq, Lk] keep-mask to use instead of drawing one (kept probabilities
    are scaled by 1 / (1 - dropout_p)), e.g. a kernel's mask to check its dropout against.
    """
    lq, lk, d = q.shape[1], k.shape[1], q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    q_valid, k_visible = _length_masks(q_lens, k_lens, lq, lk)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = scores.masked_fill(~k_visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    if dropout_mask is None:
        probs = F.dropout(probs, p=dropout_p)
    else:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    probs = probs.to(v.dtype)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out.masked_fill(~q_valid[:, :, None, None], 0.0)


def _sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_lens: Tensor,
    k_lens: Tensor,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    q_valid, k_visible = _length_masks(q_lens, k_lens, q.shape[1], k.shape[1])
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


def via_packed(packed_fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
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


def _register_triton() -> None:
    try:
        from . import triton_attention as ta
    except ImportError as err:
        register_backend("triton", None, f"triton is not installed ({err})")
        return

    def run(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        q_lens: Tensor,
        k_lens: Tensor,
        *,
        scale: float | None = None,
        dropout_p: float = 0.0,
    ) -> Tensor:
        if not ta.supports(q):
            return _sdpa(q, k, v, q_lens, k_lens, scale=scale, dropout_p=dropout_p)
        return ta.triton_attention(q, k, v, q_lens, k_lens, scale=scale, dropout_p=dropout_p, validate=False)[0]

    devices = ("cuda", "cpu") if ta.INTERPRETED else ("cuda",)
    register_backend(
        "triton",
        run,
        devices=devices,
        missing="it needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported",
    )


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled FlexAttention materialises the scores; compile it once for GPUs.
    return torch.compile(flex_attention, dynamic=False)


def _register_flex() -> None:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as err:
        register_backend("flex", None, f"torch {torch.__version__} has no FlexAttention ({err})")
        return

    def run(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        q_lens: Tensor,
        k_lens: Tensor,
        *,
        scale: float | None = None,
        dropout_p: float = 0.0,
    ) -> Tensor:
        _no_dropout("flex", dropout_p)

        def length_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return (q_idx < q_lens[b]) & (kv_idx < k_lens[b])

        block_mask = create_block_mask(length_mask, q.shape[0], None, q.shape[1], k.shape[1], device=q.device)
        flex = _compiled_flex() if q.is_cuda else flex_attention
        out = flex(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale=scale
        ).transpose(1, 2)
        # Fully masked rows come out as zeros already; masked_fill makes that a contract.
        q_valid, _ = _length_masks(q_lens, k_lens, q.shape[1], k.shape[1])
        return out.masked_fill(~q_valid[:, :, None, None], 0.0)

    register_backend("flex", run)


def _register_varlen() -> None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as err:
        register_backend("varlen", None, f"torch {torch.__version__} has no torch.nn.attention.varlen ({err})")
        return
    packed = via_packed(varlen_attn)

    def run(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        q_lens: Tensor,
        k_lens: Tensor,
        *,
        scale: float | None = None,
        dropout_p: float = 0.0,
    ) -> Tensor:
        _no_dropout("varlen", dropout_p)
        return packed(q, k, v, q_lens, k_lens, scale=scale)

    register_backend(
        "varlen", run, devices=("cuda",), missing="varlen_attn runs FlashAttention kernels, which need CUDA tensors"
    )


def _register_xformers() -> None:
    try:
        from xformers.ops import memory_efficient_attention
    except ImportError:
        register_backend("xformers", None, "xformers is not installed")
        return

    def run(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        q_lens: Tensor,
        k_lens: Tensor,
        *,
        scale: float | None = None,
        dropout_p: float = 0.0,
    ) -> Tensor:
        batch, lq, lk = q.shape[0], q.shape[1], k.shape[1]
        q_valid, k_visible = _length_masks(q_lens, k_lens, lq, lk)
        # A tensor bias keeps the layout static (the block-diagonal masks want Python lists); its
        # rows must be 8-aligned in memory, hence the wider allocation.
        bias = q.new_zeros((batch, 1, lq, -(-lk // 8) * 8))[..., :lk]
        bias.masked_fill_(~k_visible[:, None, None, :], float("-inf"))
        out = memory_efficient_attention(
            q, k, v, attn_bias=bias.expand(-1, q.shape[2], -1, -1), p=dropout_p, scale=scale
        )
        return out.masked_fill(~q_valid[:, :, None, None], 0.0)

    register_backend("xformers", run, devices=("cuda",), missing="xformers kernels need CUDA tensors")


register_backend("sdpa", _sdpa)
register_backend("eager", attention_reference)
_register_triton()
_register_flex()
_register_varlen()
_register_xformers()


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
    """Dispatch to the chosen backend (see the module docstring for the shapes).

    validate: check the lengths' values against the shapes first (one device sync, skipped under
    torch.compile); callers that derive the lengths from the shapes can turn it off.
    """
    name = resolve_backend(backend, q.device.type)
    if validate:
        check_lengths(q_lens, k_lens, q.shape[1], k.shape[1])
    return _IMPLS[name](q, k, v, q_lens, k_lens, scale=scale, dropout_p=dropout_p)
