"""Attention over query subsets: variable lengths, no causal mask, forward and backward.

The float64-capable PyTorch reference, the Triton flash-attention kernels, their registration as
torch ops and the public functions, in one file. One kernel family serves three layouts:

    padded    q [B, Lq, NH, D], k/v [B, Lk, NH, D], q_lens/k_lens [B]
              -> out [B, Lq, NH, D] (rows >= q_lens[b] exactly 0), lse [B, NH, Lq] (0 on padding)
    gathered  q [B, S, NH, D] read at rows q_index[b, j], j < q_lens[b] (distinct), k/v as padded
              -> out [B, K, NH, D] and lse [B, NH, K] by slot j; dq is [B, S, NH, D], 0 off the index
    packed    q [Tq, NH, D], k/v [Tk, NH, D], cu_seqlens_q/k [B+1] int, cu_seqlens[-1] <= T
              -> out [Tq, NH, D], lse [NH, Tq] (rows past cu_seqlens_q[-1] are left unwritten)

Sequence b's queries see exactly its first k_lens[b] keys; a sequence with queries needs a key.
The public functions check these numbers (validate=True); unchecked padded lengths are clamped to
the tensors' rows in the kernels, so they never reach past them.
lse is the natural-log log-sum-exp of the scaled scores, in float32. Accumulation is float32 for
float32/float16/bfloat16 inputs; float32 matmuls run in IEEE precision (no TF32).

The gathered layout (a query gather fused into the kernels) is kept on trial: the models gather
first, since the residual, LayerNorm and FFN need the gathered rows anyway, and the fused variant
stays only if a GPU measurement (perf/bench_attention.py, `query_gather`) shows it faster.

Attention dropout draws Philox numbers keyed by (seed, b * NH + h, query slot, key position), so the
backward pass regenerates the forward mask; `dropout_keep_mask` materialises it for tests.
Query blocks without valid queries skip the key loop (q_lens 0 costs no compute), and key blocks
without valid keys skip the query loop; both still write their zeros.

The kernels are registered as the custom ops ``tokdrop::attention_fwd`` / ``tokdrop::attention_bwd``
(fake + autograd), opaque to torch.compile, so fullgraph compilation sees no graph break and the
same registration runs on CPU under TRITON_INTERPRET=1. Without Triton installed the reference
still works; the kernels are then never launched.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .tuning import Tiled, bucket, tile
from .validate import check_index, check_lengths, check_packed

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

HEAD_DIMS = (32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------


def length_masks(q_lens: Tensor, k_lens: Tensor, lq: int, lk: int) -> tuple[Tensor, Tensor]:
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
    """Plain PyTorch attention in the padded layout (any dtype, float64 included); softmax in at least
    float32.

    dropout_mask: bool [B, NH, Lq, Lk] keep-mask to use instead of drawing one (kept probabilities
    are scaled by 1 / (1 - dropout_p)), e.g. a kernel's mask to check its dropout against.
    """
    lq, lk, d = q.shape[1], k.shape[1], q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    q_valid, k_visible = length_masks(q_lens, k_lens, lq, lk)
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


def padded_positions(cu_seqlens: Tensor, rows: int, max_seqlen: int) -> tuple[Tensor, Tensor]:
    """For packed rows [T] of the sequences cu_seqlens [B+1]: each row's flat index into a padded
    [B, max_seqlen] layout (rows past cu_seqlens[-1] go to a spare slot B * max_seqlen), and the
    per-sequence lengths [B]."""
    lens = cu_seqlens.diff()
    batch = lens.shape[0]
    row = torch.arange(rows, device=cu_seqlens.device)
    seq = torch.bucketize(row, cu_seqlens[1:], right=True).clamp(max=batch - 1)
    offset = row - cu_seqlens[seq]
    inside = row < cu_seqlens[-1]
    return torch.where(inside, seq * max_seqlen + offset, batch * max_seqlen), lens


def packed_via_padded(padded_fn, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs):
    """Packed-layout attention (q [Tq, NH, D], k/v [Tk, NH, D]) from a padded-layout
    padded_fn(q, k, v, q_lens, k_lens, **kwargs): scatter into [B, max_seqlen, NH, D], run, gather
    back. Rows past cu_seqlens_q[-1] come out zero."""
    batch = cu_seqlens_q.shape[0] - 1

    def pad(x, where, max_seqlen):
        slots = x.new_zeros((batch * max_seqlen + 1, *x.shape[1:])).index_copy(0, where, x)
        return slots[:-1].unflatten(0, (batch, max_seqlen))

    q_where, q_lens = padded_positions(cu_seqlens_q, q.shape[0], max_seqlen_q)
    same = cu_seqlens_k is cu_seqlens_q and max_seqlen_k == max_seqlen_q and k.shape[0] == q.shape[0]
    k_where, k_lens = (q_where, q_lens) if same else padded_positions(cu_seqlens_k, k.shape[0], max_seqlen_k)
    # Keys and values share their positions: one scatter for both.
    kv = pad(torch.cat([k, v], dim=-1), k_where, max_seqlen_k)
    out = padded_fn(
        pad(q, q_where, max_seqlen_q), *kv.split([k.shape[-1], v.shape[-1]], dim=-1), q_lens, k_lens, **kwargs
    )
    return F.pad(out.flatten(0, 1), (0, 0, 0, 0, 0, 1))[q_where]


# A length bucket holds the sequences at least this fraction of its longest: padding then costs at
# most 1 / BUCKET_SPAN^2 - 1 of a bucket's attention, at a few more (small) calls per layer.
BUCKET_SPAN = 0.75


def length_buckets(lens: list[int]) -> list[list[int]]:
    """The sequences (by index), longest first, in groups whose shortest is at least BUCKET_SPAN of
    their longest; empty sequences are left out."""
    order = sorted((b for b in range(len(lens)) if lens[b] > 0), key=lambda b: -lens[b])
    buckets: list[list[int]] = []
    for b in order:
        if buckets and lens[b] >= BUCKET_SPAN * lens[buckets[-1][0]]:
            buckets[-1].append(b)
        else:
            buckets.append([b])
    return buckets


class _Bucket(NamedTuple):
    """Sequences of similar length in a padded [n, max_len] layout of their own: the packed row of
    each slot (the spare zero row past the packed ones where a sequence has ended), and lengths."""

    q_rows: Tensor  # [n * max_q]
    k_rows: Tensor  # [n * max_k]
    q_lens: Tensor  # [n]
    k_lens: Tensor  # [n]


@functools.lru_cache(maxsize=16)
def _bucket_plan(
    starts_q: tuple[int, ...], starts_k: tuple[int, ...], rows_q: int, rows_k: int, device: torch.device
) -> tuple[list[_Bucket], Tensor]:
    """The buckets of packed sequences at the offsets starts_q/k (of rows_q/k packed rows), and for
    each packed query row its slot among the buckets' outputs laid end to end (rows past the last
    sequence: the spare zero row after them). Cached: every layer of a forward pass has the same."""
    lens_q = [b - a for a, b in itertools.pairwise(starts_q)]
    lens_k = [b - a for a, b in itertools.pairwise(starts_k)]
    as_tensor = functools.partial(torch.tensor, dtype=torch.long, device=device)
    buckets, slots, filled = [], [-1] * rows_q, 0
    for group in length_buckets([max(pair) for pair in zip(lens_q, lens_k, strict=True)]):
        max_q, max_k = max(lens_q[b] for b in group), max(lens_k[b] for b in group)
        q_rows, k_rows = [], []
        for b in group:
            q_rows += [*range(starts_q[b], starts_q[b + 1]), *[rows_q] * (max_q - lens_q[b])]
            k_rows += [*range(starts_k[b], starts_k[b + 1]), *[rows_k] * (max_k - lens_k[b])]
        for slot, row in enumerate(q_rows, start=filled):
            if row < rows_q:
                slots[row] = slot
        filled += len(q_rows)
        buckets.append(
            _Bucket(*map(as_tensor, (q_rows, k_rows, [lens_q[b] for b in group], [lens_k[b] for b in group])))
        )
    return buckets, as_tensor([filled if slot < 0 else slot for slot in slots])


def packed_in_buckets(padded_fn, q, k, v, cu_seqlens_q, cu_seqlens_k, **kwargs):
    """Packed-layout attention from a padded-layout padded_fn (as `packed_via_padded`), run per
    bucket of sequences of similar length (`length_buckets`), each padded only to its own longest
    rather than the batch's: short sequences do not pay for the longest one's attention. Reads the
    offsets on the host, which is free on the CPU. Rows past cu_seqlens_q[-1] come out zero."""
    buckets, out_slots = _bucket_plan(
        tuple(cu_seqlens_q.tolist()), tuple(cu_seqlens_k.tolist()), q.shape[0], k.shape[0], q.device
    )
    spare_row = (0, 0, 0, 0, 0, 1)  # a zero row after the packed ones, for the slots past a sequence
    q_padded, kv_padded = F.pad(q, spare_row), F.pad(torch.cat([k, v], dim=-1), spare_row)
    outs = []
    for part in buckets:
        n = part.q_lens.shape[0]
        kb, vb = kv_padded[part.k_rows].unflatten(0, (n, -1)).split([k.shape[-1], v.shape[-1]], dim=-1)
        outs.append(padded_fn(q_padded[part.q_rows].unflatten(0, (n, -1)), kb, vb, part.q_lens, part.k_lens, **kwargs))
    outs = [out.flatten(0, 1) for out in outs] + [q.new_zeros((1, q.shape[1], v.shape[-1]))]
    return torch.cat(outs)[out_slots]


def attention_reference_varlen(
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
) -> Tensor:
    """`attention_reference` in the packed layout of `triton_attention_varlen` (output only)."""
    return packed_via_padded(
        attention_reference,
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        scale=scale,
        dropout_p=dropout_p,
    )


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------

_jit = (lambda fn: fn) if triton is None else triton.jit


def _constexpr(value):
    return value if tl is None else tl.constexpr(value)


# Softmax runs in base 2 (exp2 is the fast path on GPUs): exp(x) == exp2(x * LOG2E).
LOG2E = _constexpr(1.4426950408889634)
LN2 = _constexpr(0.6931471805599453)


@_jit
def _seq_bounds(SEQ, b, ROWS, PACKED: tl.constexpr):
    """(first token, length) of sequence b: SEQ holds cumulative offsets when packed, else lengths.
    Padded lengths are clamped to the ROWS of the tensor, so unchecked lengths never read past it."""
    if PACKED:
        start = tl.load(SEQ + b)
        length = tl.load(SEQ + b + 1) - start
    else:
        start = 0
        length = tl.minimum(tl.load(SEQ + b), ROWS)
    return start, length


@_jit
def _program_block(ROWS, NH, BLOCK: tl.constexpr):
    """(b * NH + h, b, h, first row) of this program's block: programs run over (b, h, row block)."""
    blocks = tl.cdiv(ROWS, BLOCK)
    bh = tl.program_id(0) // blocks
    return bh, bh // NH, bh % NH, (tl.program_id(0) % blocks) * BLOCK


@_jit
def _writable(rows, length, ROWS, ONLY_VALID: tl.constexpr):
    """Rows a program stores: only its sequence's valid rows where other data shares the tensor
    (the packed layout; dq of a gathered query), else every row, so that padding gets its zeros."""
    if ONLY_VALID:
        ok = rows < length
    else:
        ok = rows < ROWS
    return ok


@_jit
def _query_tokens(Q_INDEX, b, sib, q_start, rows, row_ok, GATHER_Q: tl.constexpr):
    """Token row of each query slot in q: looked up in q_index when the gather is fused."""
    if GATHER_Q:
        tokens = tl.load(Q_INDEX + b * sib + rows, mask=row_ok, other=0)
    else:
        tokens = q_start + rows
    return tokens


@_jit
def _dropout_keep(seed, dropout_p, bh, q_slot, k_pos, MAX_K):
    """Keep-mask shaped like q_slot + k_pos; a pure function of its arguments."""
    return tl.rand(seed + bh, q_slot * MAX_K + k_pos) >= dropout_p


@_jit
def _dot(a, b):
    """a @ b in float32. The Triton interpreter multiplies bfloat16 tiles as raw integers, so it gets
    float32 copies: the same numbers, since bf16 products are exact in fp32 as on the GPU."""
    if _UPCAST_DOTS:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


# TRITON_INTERPRET=1, set before these kernels were defined, makes them CPU-runnable interpreters.
INTERPRETED = triton is not None and not isinstance(_dot, triton.runtime.JITFunction)
_UPCAST_DOTS = _constexpr(INTERPRETED)


@_jit
def _attn_fwd_kernel(
    Q, K, V, Out, LSE, Q_SEQ, K_SEQ, Q_INDEX, SEED, scale, dropout_p,
    sqb, sqt, sqh,
    skb, skt, skh,
    svb, svt, svh,
    sob, sot, soh,
    slb, slh, slt,
    sib, NH, MAX_Q, MAX_K, TUNE_Q, TUNE_K,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PACKED: tl.constexpr, GATHER_Q: tl.constexpr, DROPOUT: tl.constexpr,
):  # fmt: skip
    # One program per (b, h, block of query slots); consecutive programs share K/V in L2.
    bh, b, h, start_m = _program_block(MAX_Q, NH, BLOCK_M)
    q_start, q_len = _seq_bounds(Q_SEQ, b, MAX_Q, PACKED)
    k_start, k_len = _seq_bounds(K_SEQ, b, MAX_K, PACKED)

    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    dims = tl.arange(0, HEAD_DIM)
    q_tok = _query_tokens(Q_INDEX, b, sib, q_start, rows, row_ok, GATHER_Q)
    q = tl.load(Q + b * sqb + h * sqh + q_tok[:, None] * sqt + dims[None, :], mask=row_ok[:, None], other=0.0)
    K += b * skb + h * skh + k_start * skt
    V += b * svb + h * svh + k_start * svt
    if DROPOUT:
        seed = tl.load(SEED)

    qk_scale = scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    hi = tl.where(start_m < q_len, k_len, 0)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < k_len
        kt = tl.load(K + cols[None, :] * skt + dims[:, None], mask=col_ok[None, :], other=0.0)
        s = _dot(q, kt) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            # The normaliser l_i sums the kept and the dropped probabilities alike.
            p = tl.where(_dropout_keep(seed, dropout_p, bh, rows[:, None], cols[None, :], MAX_K), p, 0.0)
        v = tl.load(V + cols[:, None] * svt + dims[None, :], mask=col_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v)
        m_i = m_new
    if DROPOUT:
        acc = acc / (1.0 - dropout_p)

    l_safe = tl.where(row_ok, l_i, 1.0)
    out = tl.where(row_ok[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(row_ok, (m_i + tl.log2(l_safe)) * LN2, 0.0)
    store_ok = _writable(rows, q_len, MAX_Q, PACKED)
    o_rows = q_start + rows
    tl.store(
        Out + b * sob + h * soh + o_rows[:, None] * sot + dims[None, :],
        out.to(Out.dtype.element_ty),
        mask=store_ok[:, None],
    )
    tl.store(LSE + b * slb + h * slh + o_rows * slt, lse, mask=store_ok)


@_jit
def _attn_bwd_preprocess_kernel(
    Out, DO, DELTA, Q_SEQ,
    sob, sot, soh,
    sdb, sdt, sdh,
    slb, slh, slt,
    NH, MAX_Q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, PACKED: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO * O), the softmax-backward correction term, in the layout of lse."""
    bh, b, h, start_m = _program_block(MAX_Q, NH, BLOCK_M)
    q_start, q_len = _seq_bounds(Q_SEQ, b, MAX_Q, PACKED)
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    dims = tl.arange(0, HEAD_DIM)
    o_rows = q_start + rows
    o = tl.load(Out + b * sob + h * soh + o_rows[:, None] * sot + dims[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + o_rows[:, None] * sdt + dims[None, :], mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    store_ok = _writable(rows, q_len, MAX_Q, PACKED)
    tl.store(DELTA + b * slb + h * slh + o_rows * slt, delta, mask=store_ok)


@_jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, Q_SEQ, K_SEQ, Q_INDEX, SEED, scale, dropout_p,
    sqb, sqt, sqh,
    skb, skt, skh,
    svb, svt, svh,
    sdb, sdt, sdh,
    sdkb, sdkt, sdkh,
    sdvb, sdvt, sdvh,
    slb, slh, slt,
    sib, NH, MAX_Q, MAX_K, TUNE_Q, TUNE_K,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PACKED: tl.constexpr, GATHER_Q: tl.constexpr, DROPOUT: tl.constexpr,
):  # fmt: skip
    # One program per (b, h, block of keys), looping over the query blocks: no atomics.
    bh, b, h, start_n = _program_block(MAX_K, NH, BLOCK_N)
    q_start, q_len = _seq_bounds(Q_SEQ, b, MAX_Q, PACKED)
    k_start, k_len = _seq_bounds(K_SEQ, b, MAX_K, PACKED)

    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < k_len
    dims = tl.arange(0, HEAD_DIM)
    k_rows = k_start + cols
    k = tl.load(K + b * skb + h * skh + k_rows[:, None] * skt + dims[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b * svb + h * svh + k_rows[:, None] * svt + dims[None, :], mask=col_ok[:, None], other=0.0)
    Q += b * sqb + h * sqh
    DO += b * sdb + h * sdh + q_start * sdt
    LSE += b * slb + h * slh + q_start * slt
    DELTA += b * slb + h * slh + q_start * slt
    if DROPOUT:
        seed = tl.load(SEED)
        keep_scale = 1.0 / (1.0 - dropout_p)

    qk_scale = scale * LOG2E
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    hi = tl.where(start_n < k_len, q_len, 0)
    for start_m in range(0, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        q_tok = _query_tokens(Q_INDEX, b, sib, q_start, rows, row_ok, GATHER_Q)
        q = tl.load(Q + q_tok[:, None] * sqt + dims[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + rows[:, None] * sdt + dims[None, :], mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(LSE + rows * slt, mask=row_ok, other=0.0) * LOG2E
        delta = tl.load(DELTA + rows * slt, mask=row_ok, other=0.0)
        # Transposed scores [keys, queries]; padding rows and columns get probability 0.
        s_t = _dot(k, tl.trans(q)) * qk_scale
        p_t = tl.where(col_ok[:, None] & row_ok[None, :], tl.exp2(s_t - lse2[None, :]), 0.0)
        dp_t = _dot(v, tl.trans(do))
        if DROPOUT:
            keep_t = _dropout_keep(seed, dropout_p, bh, rows[None, :], cols[:, None], MAX_K)
            dv += _dot(tl.where(keep_t, p_t * keep_scale, 0.0).to(do.dtype), do)
            dp_t = tl.where(keep_t, dp_t * keep_scale, 0.0)
        else:
            dv += _dot(p_t.to(do.dtype), do)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q)
    dk = dk * scale

    store_ok = _writable(cols, k_len, MAX_K, PACKED)
    tl.store(
        DK + b * sdkb + h * sdkh + k_rows[:, None] * sdkt + dims[None, :],
        dk.to(DK.dtype.element_ty),
        mask=store_ok[:, None],
    )
    tl.store(
        DV + b * sdvb + h * sdvh + k_rows[:, None] * sdvt + dims[None, :],
        dv.to(DV.dtype.element_ty),
        mask=store_ok[:, None],
    )


@_jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, Q_SEQ, K_SEQ, Q_INDEX, SEED, scale, dropout_p,
    sqb, sqt, sqh,
    skb, skt, skh,
    svb, svt, svh,
    sdb, sdt, sdh,
    sdqb, sdqt, sdqh,
    slb, slh, slt,
    sib, NH, MAX_Q, MAX_K, TUNE_Q, TUNE_K,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PACKED: tl.constexpr, GATHER_Q: tl.constexpr, DROPOUT: tl.constexpr,
):  # fmt: skip
    # One program per (b, h, block of query slots), looping over the key blocks.
    bh, b, h, start_m = _program_block(MAX_Q, NH, BLOCK_M)
    q_start, q_len = _seq_bounds(Q_SEQ, b, MAX_Q, PACKED)
    k_start, k_len = _seq_bounds(K_SEQ, b, MAX_K, PACKED)

    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    dims = tl.arange(0, HEAD_DIM)
    q_tok = _query_tokens(Q_INDEX, b, sib, q_start, rows, row_ok, GATHER_Q)
    o_rows = q_start + rows
    q = tl.load(Q + b * sqb + h * sqh + q_tok[:, None] * sqt + dims[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + o_rows[:, None] * sdt + dims[None, :], mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + b * slb + h * slh + o_rows * slt, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + b * slb + h * slh + o_rows * slt, mask=row_ok, other=0.0)
    K += b * skb + h * skh + k_start * skt
    V += b * svb + h * svh + k_start * svt
    if DROPOUT:
        seed = tl.load(SEED)
        keep_scale = 1.0 / (1.0 - dropout_p)

    qk_scale = scale * LOG2E
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    hi = tl.where(start_m < q_len, k_len, 0)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < k_len
        k = tl.load(K + cols[:, None] * skt + dims[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(V + cols[:, None] * svt + dims[None, :], mask=col_ok[:, None], other=0.0)
        s = _dot(q, tl.trans(k)) * qk_scale
        p = tl.where(row_ok[:, None] & col_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(v))
        if DROPOUT:
            keep = _dropout_keep(seed, dropout_p, bh, rows[:, None], cols[None, :], MAX_K)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k)
    dq = dq * scale

    store_ok = _writable(rows, q_len, MAX_Q, PACKED or GATHER_Q)
    tl.store(
        DQ + b * sdqb + h * sdqh + q_tok[:, None] * sdqt + dims[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=store_ok[:, None],
    )


@_jit
def _dropout_mask_kernel(SEED, MASK, dropout_p, MAX_Q, MAX_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(tl.load(SEED), dropout_p, bh, rows[:, None], cols[None, :], MAX_K)
    ok = (rows[:, None] < MAX_Q) & (cols[None, :] < MAX_K)
    tl.store(MASK + (bh * MAX_Q + rows[:, None]) * MAX_K + cols[None, :], keep.to(tl.int8), mask=ok)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


# GPU tile spaces per (head dim, element bytes), autotuned on the first launch of each (bucketed max
# lengths, layout, dropout, dtype). Chosen with perf/static_sm90.py --candidates (the bf16 sweep is
# perf/results/static_sm90_candidates.json): every configuration compiles for sm_90a without
# register spills in every variant, with triton 3.9 and 3.6 (perf/results/static_sm90*.json;
# tests/test_static_sm90.py). fp16/bf16 follow FlashAttention-2's shapes: forward 128 queries on 8
# warps (4 warps spill with dropout), or 128x32 blocks; dK/dV 32 or 16 queries per step on 4 warps
# (64x64 spills with dropout: on 4 warps, and at head dim 64 on 8 warps with triton 3.6's ptxas); dQ
# 128x32 on 8 warps or 64x32 on 4. float32 runs its products in IEEE FMA (no tensor cores): 32x32
# blocks, and 16x16 where those spill (dK/dV from head dim 64, the forward at 128). The interpreter
# runs blocks of 16, so that the small test shapes still cross block boundaries.
_FP32_SMALL = [tile(4, 2, BLOCK_M=32, BLOCK_N=32)]
FWD_SPACE = {
    (32, 2): [tile(8, 3, BLOCK_M=128, BLOCK_N=64), tile(4, 3, BLOCK_M=128, BLOCK_N=32)],
    (64, 2): [tile(8, 3, BLOCK_M=128, BLOCK_N=64), tile(4, 3, BLOCK_M=128, BLOCK_N=32)],
    (128, 2): [tile(8, 3, BLOCK_M=128, BLOCK_N=32), tile(8, 2, BLOCK_M=128, BLOCK_N=64)],
    (32, 4): _FP32_SMALL,
    (64, 4): _FP32_SMALL,
    (128, 4): [tile(4, 2, BLOCK_M=16, BLOCK_N=16)],
}
DKDV_SPACE = {
    (32, 2): [tile(4, 2, BLOCK_M=32, BLOCK_N=64), tile(8, 2, BLOCK_M=64, BLOCK_N=64)],
    (64, 2): [tile(4, 2, BLOCK_M=32, BLOCK_N=64), tile(4, 2, BLOCK_M=16, BLOCK_N=64)],
    (128, 2): [tile(4, 2, BLOCK_M=16, BLOCK_N=64)],
    (32, 4): _FP32_SMALL,
    (64, 4): [tile(4, 2, BLOCK_M=16, BLOCK_N=16)],
    (128, 4): [tile(4, 2, BLOCK_M=16, BLOCK_N=16)],
}
DQ_SPACE = {
    (32, 2): [tile(8, 2, BLOCK_M=128, BLOCK_N=32), tile(4, 2, BLOCK_M=64, BLOCK_N=32)],
    (64, 2): [tile(8, 2, BLOCK_M=128, BLOCK_N=32), tile(4, 2, BLOCK_M=64, BLOCK_N=32)],
    (128, 2): [tile(8, 2, BLOCK_M=128, BLOCK_N=32), tile(4, 2, BLOCK_M=64, BLOCK_N=32)],
    (32, 4): _FP32_SMALL,
    (64, 4): _FP32_SMALL,
    (128, 4): _FP32_SMALL,
}
PREPROCESS_SPACE = {(d, size): [tile(4, 1, BLOCK_M=64)] for d in HEAD_DIMS for size in (2, 4)}
INTERPRETER_TILES = tile(4, 1, BLOCK_M=16, BLOCK_N=16)
# Autotune keys besides the dtypes: max lengths bucketed to powers of two (TUNE_Q/TUNE_K), layout, dropout.
_KEY = ["TUNE_Q", "TUNE_K", "PACKED", "GATHER_Q", "DROPOUT"]
_FWD = Tiled(_attn_fwd_kernel, FWD_SPACE, INTERPRETER_TILES, _KEY)
_DKDV = Tiled(_attn_bwd_dkdv_kernel, DKDV_SPACE, INTERPRETER_TILES, _KEY)
_DQ = Tiled(_attn_bwd_dq_kernel, DQ_SPACE, INTERPRETER_TILES, _KEY)
_PREPROCESS = Tiled(_attn_bwd_preprocess_kernel, PREPROCESS_SPACE, tile(4, 1, BLOCK_M=16))
# dropout_keep_mask (tests only) keeps one fixed tile everywhere; Triton's default stages on a GPU.
_DROPOUT_MASK = Tiled(
    _dropout_mask_kernel, {None: [tile(4, 3, BLOCK_M=16, BLOCK_N=16)]}, tile(4, 1, BLOCK_M=16, BLOCK_N=16)
)
KERNELS = (_FWD, _PREPROCESS, _DKDV, _DQ, _DROPOUT_MASK)


def _row_blocks(batch: int, nh: int, rows: int, block: str):
    """Grid over (b, h, block of `rows`) for a tile's block size `block`."""
    return lambda meta: (batch * nh * triton.cdiv(rows, meta[block]),)


def _strides(packed: bool, *tensors: Tensor) -> list[int]:
    """The (batch, token, head) strides of each of q, k, v, out and their gradients, whose head dims
    have unit stride (see _unit_head_stride), or (batch, head, token) of lse; packed tensors have no
    batch axis."""
    return [s for t in tensors for s in ((0, *t.stride()) if packed else t.stride())[:3]]


def _unit_head_stride(*tensors: Tensor) -> list[Tensor]:
    """The kernels read head dims with unit stride, as any projection's output has them."""
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def _new_outputs(q: Tensor, max_q: int, packed: bool) -> tuple[Tensor, Tensor]:
    """Uninitialised (out, lse): the forward kernel writes every element."""
    nh, d = q.shape[-2], q.shape[-1]
    if packed:
        return q.new_empty(q.shape), q.new_empty((nh, q.shape[0]), dtype=torch.float32)
    return q.new_empty((q.shape[0], max_q, nh, d)), q.new_empty((q.shape[0], nh, max_q), dtype=torch.float32)


def _new_grads(q: Tensor, k: Tensor, v: Tensor, q_index: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Contiguous (dq, dk, dv), whatever the inputs' strides; with a fused gather only the indexed
    rows of dq are written, so it starts at zero."""
    dq = q.new_zeros(q.shape) if q_index is not None else q.new_empty(q.shape)
    return dq, k.new_empty(k.shape), v.new_empty(v.shape)


def _flags(q_index: Tensor | None, dropout_p: float, packed: bool) -> dict[str, bool]:
    return dict(PACKED=packed, GATHER_Q=q_index is not None, DROPOUT=dropout_p > 0.0)


def _dense(*tensors: Tensor | None) -> list[Tensor | None]:
    """The kernels index lengths, offsets and q_index rows with unit stride."""
    return [None if t is None else t.contiguous() for t in tensors]


def _index_stride(q_index: Tensor | None) -> int:
    return 0 if q_index is None else q_index.stride(0)


def _batch(q: Tensor, q_seq: Tensor, packed: bool) -> int:
    return q_seq.shape[0] - 1 if packed else q.shape[0]


def _launch_fwd(q, k, v, q_seq, k_seq, q_index, seed, scale, dropout_p, max_q, max_k, packed):
    q, k, v = _unit_head_stride(q, k, v)
    out, lse = _new_outputs(q, max_q, packed)
    q_seq, k_seq, q_index = _dense(q_seq, k_seq, q_index)
    batch, nh, d = _batch(q, q_seq, packed), q.shape[-2], q.shape[-1]
    _FWD(
        (d, q.element_size()), _row_blocks(batch, nh, max_q, "BLOCK_M"), q.device,
        q, k, v, out, lse, q_seq, k_seq, q_index, seed, scale, dropout_p,
        *_strides(packed, q, k, v, out, lse), _index_stride(q_index), nh, max_q, max_k, bucket(max_q), bucket(max_k),
        HEAD_DIM=d, **_flags(q_index, dropout_p, packed),
    )  # fmt: skip
    return out, lse


def _launch_bwd(dout, q, k, v, out, lse, q_seq, k_seq, q_index, seed, scale, dropout_p, max_q, max_k, packed):
    dout, q, k, v = _unit_head_stride(dout, q, k, v)
    q_seq, k_seq, q_index = _dense(q_seq, k_seq, q_index)
    batch, nh, d = _batch(q, q_seq, packed), q.shape[-2], q.shape[-1]
    dq, dk, dv = _new_grads(q, k, v, q_index)
    delta = torch.empty_like(lse)
    flags = _flags(q_index, dropout_p, packed)
    tune = (bucket(max_q), bucket(max_k))
    _PREPROCESS(
        (d, q.element_size()), _row_blocks(batch, nh, max_q, "BLOCK_M"), q.device,
        out, dout, delta, q_seq, *_strides(packed, out, dout, lse), nh, max_q, HEAD_DIM=d, PACKED=packed,
    )  # fmt: skip
    inputs = (q, k, v, dout, lse, delta)
    _DKDV(
        (d, q.element_size()), _row_blocks(batch, nh, max_k, "BLOCK_N"), q.device,
        *inputs, dk, dv, q_seq, k_seq, q_index, seed, scale, dropout_p,
        *_strides(packed, q, k, v, dout, dk, dv, lse), _index_stride(q_index), nh, max_q, max_k, *tune,
        HEAD_DIM=d, **flags,
    )  # fmt: skip
    _DQ(
        (d, q.element_size()), _row_blocks(batch, nh, max_q, "BLOCK_M"), q.device,
        *inputs, dq, q_seq, k_seq, q_index, seed, scale, dropout_p,
        *_strides(packed, q, k, v, dout, dq, lse), _index_stride(q_index), nh, max_q, max_k, *tune,
        HEAD_DIM=d, **flags,
    )  # fmt: skip
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# Ops: q_seq/k_seq are lengths [B], or cumulative offsets [B+1] when packed; max_q/max_k bound the
# sequence lengths (padded: the number of query slots and of key rows)
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("tokdrop::attention_fwd", mutates_args=())
def attention_fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_seq: Tensor,
    k_seq: Tensor,
    q_index: Tensor | None,
    seed: Tensor | None,
    scale: float,
    dropout_p: float,
    max_q: int,
    max_k: int,
    packed: bool,
) -> tuple[Tensor, Tensor]:
    return _launch_fwd(q, k, v, q_seq, k_seq, q_index, seed, scale, dropout_p, max_q, max_k, packed)


@attention_fwd_op.register_fake
def _(q, k, v, q_seq, k_seq, q_index, seed, scale, dropout_p, max_q, max_k, packed):
    return _new_outputs(q, max_q, packed)


@torch.library.custom_op("tokdrop::attention_bwd", mutates_args=())
def attention_bwd_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    q_seq: Tensor,
    k_seq: Tensor,
    q_index: Tensor | None,
    seed: Tensor | None,
    scale: float,
    dropout_p: float,
    max_q: int,
    max_k: int,
    packed: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _launch_bwd(dout, q, k, v, out, lse, q_seq, k_seq, q_index, seed, scale, dropout_p, max_q, max_k, packed)


@attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, q_seq, k_seq, q_index, seed, scale, dropout_p, max_q, max_k, packed):
    return _new_grads(q, k, v, q_index)


def _setup_context(ctx, inputs, output):
    q, k, v, q_seq, k_seq, q_index, seed, *ctx.params = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_seq, k_seq, q_index, seed)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, q_seq, k_seq, q_index, seed = ctx.saved_tensors
    dq, dk, dv = attention_bwd_op(dout, q, k, v, out, lse, q_seq, k_seq, q_index, seed, *ctx.params)
    return (dq, dk, dv) + (None,) * 9


attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def unsupported(dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the kernels cannot run queries of this dtype and head dim, or None when they can."""
    if triton is None:
        return "triton is not installed"
    if dtype not in DTYPES:
        return f"the Triton attention kernels take {DTYPES}, not {dtype}"
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} is not supported by the Triton kernels (they take {HEAD_DIMS})"
    return None


def _check_int(name: str, t: Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    """t must be an int32/int64 tensor of this shape (-1: any size) on `device`."""
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.dim() != len(shape) or any(want not in (-1, got) for want, got in zip(shape, t.shape, strict=True)):
        raise ValueError(f"{name} must have shape {list(shape)} (-1: any), got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {t.device}")


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, ndim: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D, got shape {list(t.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    problem = unsupported(q.dtype, q.shape[-1])
    if problem is not None:
        raise (ValueError if q.dtype in DTYPES else TypeError)(problem)
    if not q.shape[-2:] == k.shape[-2:] == v.shape[-2:]:
        raise ValueError(f"q, k, v must share (heads, head_dim), got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if k.shape[:-2] != v.shape[:-2]:
        raise ValueError(f"k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def _scale_and_seed(
    q: Tensor,
    scale: float | None,
    dropout_p: float,
    seed: Tensor | None,
) -> tuple[float, Tensor | None]:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p == 0.0:
        seed = None
    elif seed is None:
        seed = torch.randint(0, 2**62, (1,), device=q.device)
    elif seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != q.device:
        raise TypeError(
            f"seed must be a one-element int64 tensor on {q.device}, got {seed.dtype} "
            f"{list(seed.shape)} on {seed.device}"
        )
    return q.shape[-1] ** -0.5 if scale is None else float(scale), seed


def triton_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_lens: Tensor,
    k_lens: Tensor,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    q_index: Tensor | None = None,
    seed: Tensor | None = None,
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Padded-layout attention; returns (out, lse). See the module docstring for the shapes.

    q_index [B, K] int fuses the query gather: q is then the full [B, S, NH, D] and slot j of row b
    is the query q[b, q_index[b, j]] for j < q_lens[b]. seed: one-element int64 tensor keying the
    dropout mask, drawn from torch's generator when None. validate: check the values of the lengths
    and of q_index (device syncs; see tokdrop.kernels.validate).
    """
    _check_qkv(q, k, v, 4)
    batch = q.shape[0]
    if k.shape[0] != batch:
        raise ValueError(f"q and k must have the same batch size, got {list(q.shape)} and {list(k.shape)}")
    _check_int("q_lens", q_lens, (batch,), q.device)
    _check_int("k_lens", k_lens, (batch,), q.device)
    if q_index is not None:
        _check_int("q_index", q_index, (batch, -1), q.device)
    slots = q.shape[1] if q_index is None else q_index.shape[1]
    if validate:
        check_lengths(q_lens, k_lens, slots, k.shape[1])
        if q_index is not None:
            check_index("q_index", q_index, q.shape[1], q_lens)
    scale, seed = _scale_and_seed(q, scale, dropout_p, seed)
    return attention_fwd_op(q, k, v, q_lens, k_lens, q_index, seed, scale, float(dropout_p), slots, k.shape[1], False)


def triton_attention_varlen(
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
    seed: Tensor | None = None,
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Packed-layout attention; returns (out [Tq, NH, D], lse [NH, Tq]).

    max_seqlen_q/k are static upper bounds on the sequence lengths (Python ints, never read back
    from the device). validate: check the offsets against the tensors and bounds (device syncs).
    """
    _check_qkv(q, k, v, 3)
    _check_int("cu_seqlens_q", cu_seqlens_q, (-1,), q.device)
    _check_int("cu_seqlens_k", cu_seqlens_k, tuple(cu_seqlens_q.shape), q.device)
    if cu_seqlens_q.shape[0] < 2:
        raise ValueError(f"cu_seqlens_q must hold at least two offsets, got {list(cu_seqlens_q.shape)}")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if validate:
        check_packed(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    scale, seed = _scale_and_seed(q, scale, dropout_p, seed)
    return attention_fwd_op(
        q, k, v, cu_seqlens_q, cu_seqlens_k, None, seed, scale, float(dropout_p), max_seqlen_q, max_seqlen_k, True
    )


def dropout_keep_mask(seed: Tensor, batch: int, heads: int, max_q: int, max_k: int, dropout_p: float) -> Tensor:
    """The kernels' keep-mask, bool [B, NH, max_q, max_k], indexed by (b, h, query slot, key position).

    Slots and positions count from each sequence's start in the packed layout. Scale kept
    probabilities by 1 / (1 - dropout_p) to match the kernels.
    """
    if triton is None:
        raise RuntimeError("dropout_keep_mask runs a Triton kernel: triton is not installed")
    mask = torch.empty((batch, heads, max_q, max_k), dtype=torch.int8, device=seed.device)
    grid = lambda meta: (batch * heads, triton.cdiv(max_q, meta["BLOCK_M"]), triton.cdiv(max_k, meta["BLOCK_N"]))  # noqa: E731
    _DROPOUT_MASK(None, grid, seed.device, seed, mask, dropout_p, max_q, max_k)
    return mask.bool()
