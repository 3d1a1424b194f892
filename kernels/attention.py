"""Variable-length, non-causal attention in the padded-batch layout, and the backend dispatcher.

Shapes (the contract every backend honours):

    q        [B, Lq, NH, D]   row b has q_lens[b] valid queries, at positions < q_lens[b]
    k, v     [B, Lk, NH, D]   row b has k_lens[b] valid keys, at positions < k_lens[b]
    q_lens   [B] int          0 <= q_lens[b] <= Lq
    k_lens   [B] int          1 <= k_lens[b] <= Lk wherever q_lens[b] > 0
    returns  [B, Lq, NH, D]   query rows >= q_lens[b] are exactly zero (never NaN)

Queries of a row see exactly the first k_lens[b] keys of that row (no causal mask).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

ENV_VAR = "TOKDROP_ATTENTION"
BACKENDS = ("triton", "sdpa", "flex", "varlen", "xformers", "eager")

AttentionFn = Callable[..., Tensor]
_IMPLS: dict[str, AttentionFn] = {}
_MISSING: dict[str, str] = {}


def register_backend(name: str, fn: AttentionFn | None, missing: str = "") -> None:
    """Make `name` dispatchable to `fn`, or record why it is unavailable (`fn=None`)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS}")
    if fn is None:
        _MISSING[name] = missing
    else:
        _IMPLS[name] = fn
        _MISSING.pop(name, None)


def _default_backend(device_type: str) -> str:
    return "sdpa"


@torch.compiler.assume_constant_result
def resolve_backend(requested: str | None, device_type: str) -> str:
    """The backend to run: $TOKDROP_ATTENTION wins over `requested`; None means the device's best."""
    name = os.environ.get(ENV_VAR) or requested or _default_backend(device_type)
    if name not in BACKENDS:
        source = f"${ENV_VAR}" if os.environ.get(ENV_VAR) else "attn_backend"
        raise ValueError(f"{source}={name!r} is not an attention backend; expected one of {BACKENDS}")
    if name not in _IMPLS:
        why = _MISSING.get(name, "it is not implemented in this version of tokdrop")
        raise ValueError(f"attention backend {name!r} is not available: {why}")
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
    q: Tensor, k: Tensor, v: Tensor, q_lens: Tensor, k_lens: Tensor,
    *, scale: float | None = None, dropout_p: float = 0.0,
) -> Tensor:
    """Plain PyTorch attention (any dtype, float64 included); softmax in at least float32."""
    lq, lk, d = q.shape[1], k.shape[1], q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    q_valid, k_visible = _length_masks(q_lens, k_lens, lq, lk)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = scores.masked_fill(~k_visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    probs = F.dropout(probs, p=dropout_p).to(v.dtype)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out.masked_fill(~q_valid[:, :, None, None], 0.0)


def _sdpa(
    q: Tensor, k: Tensor, v: Tensor, q_lens: Tensor, k_lens: Tensor,
    *, scale: float | None = None, dropout_p: float = 0.0,
) -> Tensor:
    q_valid, k_visible = _length_masks(q_lens, k_lens, q.shape[1], k.shape[1])
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=k_visible[:, None, None, :], dropout_p=dropout_p, scale=scale,
    ).transpose(1, 2)
    return out.masked_fill(~q_valid[:, :, None, None], 0.0)


register_backend("sdpa", _sdpa)
register_backend("eager", attention_reference)


def attention(
    q: Tensor, k: Tensor, v: Tensor, q_lens: Tensor, k_lens: Tensor,
    *, scale: float | None = None, dropout_p: float = 0.0, backend: str | None = None,
) -> Tensor:
    """Dispatch to the chosen backend (see the module docstring for the shapes)."""
    name = resolve_backend(backend, q.device.type)
    return _IMPLS[name](q, k, v, q_lens, k_lens, scale=scale, dropout_p=dropout_p)
