"""Triton attention kernels against a float64 reference, op registration, and the backend dispatcher.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on small shapes; the tests marked
`needs_cuda` repeat the same checks at real sizes, compile with inductor, try the CUDA-only backends,
and write a JSON summary to perf/results/ (the `gpu_summary` fixture).
"""

from __future__ import annotations

import importlib
import json
import logging
import pathlib
import subprocess
import sys

import pytest
import torch
import triton
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tokdrop.kernels import backends as dispatch
from tokdrop.kernels import subset_attention as ta
from tokdrop.kernels.backends import via_packed
from tokdrop.kernels.subset_attention import attention_reference, attention_reference_varlen

needs_cuda = pytest.mark.needs_cuda
pytestmark = pytest.mark.usefixtures("poisoned_memory", "in_bounds_memory")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Error bound relative to the largest reference magnitude of each tensor, floored at 1 for standard
# normal inputs. dq and dk also carry the rounding of O in delta = rowsum(dO * O), an eps * |dO . v|
# ~ eps * sqrt(D) term even where the exact gradient vanishes (a single key): their floor is sqrt(D).
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
NAMES = ("out", "lse", "dq", "dk", "dv")
PERF = pathlib.Path(__file__).resolve().parents[1] / "perf"


def assert_near(actual, expected, dtype, what, floor=1.0):
    assert actual.shape == expected.shape, what
    assert not actual.isnan().any(), f"{what} has NaN (unwritten or invalid)"
    if actual.numel() == 0:
        return
    scale = max(expected.abs().max().item(), floor)
    err = (actual.double() - expected).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype]} x {scale:.3g}"


def assert_all_near(got, want, dtype):
    for name, a, e in zip(NAMES, got, want, strict=True):
        floor = a.shape[-1] ** 0.5 if name in ("dq", "dk") else 1.0
        assert_near(a, e, torch.float32 if name == "lse" else dtype, name, floor)


def lens_mask(lens, length):
    return torch.arange(length, device=lens.device) < lens[:, None]


def cumulative(lens):
    return torch.nn.functional.pad(lens.cumsum(0), (1, 0)).int()


def reference(q, k, v, q_lens, k_lens, dout, *, scale, dropout_p=0.0, mask=None, q_index=None, chunk=4):
    """Float64 (out, lse, dq, dk, dv) from the same inputs, a few sequences at a time (the float64
    scores of real sizes would not fit at once); q_index gathers the queries first."""
    parts = []
    for i in range(0, q.shape[0], chunk):
        part = slice(i, i + chunk)
        qd, kd, vd = (t[part].detach().double().requires_grad_() for t in (q, k, v))
        queries = qd
        if q_index is not None:
            queries = qd.gather(1, q_index[part].long()[:, :, None, None].expand(-1, -1, *q.shape[2:]))
        out = attention_reference(
            queries,
            kd,
            vd,
            q_lens[part],
            k_lens[part],
            scale=scale,
            dropout_p=dropout_p,
            dropout_mask=None if mask is None else mask[part],
        )
        out.backward(dout[part].double())
        scores = torch.einsum("bqhd,bkhd->bhqk", queries.detach(), kd.detach()) * scale
        keys = lens_mask(k_lens[part], k.shape[1])[:, None, None, :]
        lse = scores.masked_fill(~keys, float("-inf")).logsumexp(-1)
        lse = lse.masked_fill(~lens_mask(q_lens[part], queries.shape[1])[:, None, :], 0.0)
        parts.append((out.detach(), lse, qd.grad, kd.grad, vd.grad))
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))


def run_kernel(fn, q, k, v, *args, dout, **kwargs):
    """(out, lse, dq, dk, dv) of a kernel entry point."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v, *args, **kwargs)
    out.backward(dout)
    return out.detach(), lse, q.grad, k.grad, v.grad


def random_lens(gen, batch, length):
    """Lengths in [0, length] with the edges 0, 1, length - 1 and length over-represented."""
    edges = torch.tensor([0, 1, length - 1, length])[torch.randint(0, 4, (batch,), generator=gen)]
    lens = torch.randint(0, length + 1, (batch,), generator=gen)
    return torch.where(torch.rand(batch, generator=gen) < 0.4, edges, lens).to(torch.int32)


def make_inputs(c, device, q_rows=None):
    """q [B, q_rows or Lq, NH, D], k, v, q_lens, k_lens (>= 1 where q_lens > 0), a dropout seed, dout,
    and with q_rows an index [B, Lq] of distinct rows of q."""
    gen = torch.Generator().manual_seed(c["seed"])
    b, nh, d, dtype = c["batch"], c["heads"], c["head_dim"], c["dtype"]
    q = torch.randn(b, q_rows or c["lq"], nh, d, generator=gen).to(dtype)
    k, v = (torch.randn(b, c["lk"], nh, d, generator=gen).to(dtype) for _ in range(2))
    dout = torch.randn(b, c["lq"], nh, d, generator=gen).to(dtype)
    q_lens = random_lens(gen, b, c["lq"])
    k_lens = torch.maximum(random_lens(gen, b, c["lk"]), (q_lens > 0).int())
    q_index = None
    if q_rows is not None:
        q_index = torch.stack([torch.randperm(q_rows, generator=gen)[: c["lq"]] for _ in range(b)])
    seed = torch.randint(0, 2**62, (1,), generator=gen)
    return [None if t is None else t.to(device) for t in (q, k, v, q_lens, k_lens, seed, dout, q_index)]


def check_padded(c, gather, device="cpu"):
    """Padded layout, or (gather) queries read through an index from full [B, S, NH, D] states:
    outputs and gradients near float64, and exact zeros on the padding."""
    q_rows = c["lq"] + 7 if gather else None
    q, k, v, q_lens, k_lens, seed, dout, q_index = make_inputs(c, device, q_rows)
    scale = 0.7 / c["head_dim"] ** 0.5
    mask = ta.dropout_keep_mask(seed, c["batch"], c["heads"], c["lq"], c["lk"], c["dropout_p"])
    got = run_kernel(
        ta.triton_attention,
        q,
        k,
        v,
        q_lens,
        k_lens,
        dout=dout,
        scale=scale,
        dropout_p=c["dropout_p"],
        q_index=q_index,
        seed=seed,
    )
    assert_all_near(
        got,
        reference(q, k, v, q_lens, k_lens, dout, scale=scale, dropout_p=c["dropout_p"], mask=mask, q_index=q_index),
        c["dtype"],
    )
    out, lse, dq, dk, dv = got
    q_valid, k_valid = lens_mask(q_lens, c["lq"]), lens_mask(k_lens, c["lk"])
    q_used = q_valid  # rows of q with a gradient: with a gather, the indexed rows of valid slots
    if gather:
        q_used = torch.zeros(c["batch"], q_rows, dtype=torch.bool, device=device).scatter(1, q_index, q_valid)
    assert (out[~q_valid] == 0).all() and (lse.transpose(1, 2)[~q_valid] == 0).all()
    assert (dq[~q_used] == 0).all() and (dk[~k_valid] == 0).all() and (dv[~k_valid] == 0).all()


def check_packed(c, extra_q=0, extra_k=0, device="cpu"):
    """Packed layout (the padded inputs' valid rows) with differing cu_seqlens; max_seqlen_q/k are
    upper bounds, `extra` above the longest sequence."""
    q, k, v, q_lens, k_lens, seed, dout, _ = make_inputs(c, device)
    q_valid, k_valid = lens_mask(q_lens, c["lq"]), lens_mask(k_lens, c["lk"])
    max_q, max_k = int(q_lens.max()) + extra_q, int(k_lens.max()) + extra_k
    got = run_kernel(
        ta.triton_attention_varlen,
        q[q_valid],
        k[k_valid],
        v[k_valid],
        cumulative(q_lens),
        cumulative(k_lens),
        max_q,
        max_k,
        dout=dout[q_valid],
        dropout_p=c["dropout_p"],
        seed=seed,
    )
    # The packed mask counts query slots and key positions from each sequence's start, like the padded one.
    mask = ta.dropout_keep_mask(seed, c["batch"], c["heads"], max_q, max_k, c["dropout_p"])
    mask = torch.nn.functional.pad(mask, (0, max(c["lk"] - max_k, 0), 0, max(c["lq"] - max_q, 0)))
    out, lse, dq, dk, dv = reference(
        q,
        k,
        v,
        q_lens,
        k_lens,
        dout,
        scale=c["head_dim"] ** -0.5,
        dropout_p=c["dropout_p"],
        mask=mask[:, :, : c["lq"], : c["lk"]],
    )
    want = (out[q_valid], lse.transpose(1, 2)[q_valid].T, dq[q_valid], dk[k_valid], dv[k_valid])
    assert_all_near(got, want, c["dtype"])


@st.composite
def cases(draw):
    lq, lk = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    return dict(
        batch=draw(st.integers(1, 3)),
        lq=lq,
        lk=draw(st.sampled_from([lk, lq])),
        heads=draw(st.integers(1, 2)),
        head_dim=draw(st.sampled_from([32, 64])),
        dtype=draw(st.sampled_from(DTYPES)),
        dropout_p=draw(st.sampled_from([0.0, 0.0, 0.25])),
        seed=draw(st.integers(0, 2**16)),
    )


# The interpreter takes about a second per example: keep the counts small.
@given(cases(), st.booleans())
@settings(max_examples=20)
@example(dict(batch=3, lq=17, lk=17, heads=2, head_dim=32, dtype=torch.float32, dropout_p=0.0, seed=1), False)
@example(dict(batch=2, lq=5, lk=33, heads=1, head_dim=64, dtype=torch.bfloat16, dropout_p=0.25, seed=2), True)
def test_padded_and_gathered_match_float64_reference(c, gather):
    check_padded(c, gather)


@given(cases(), st.integers(0, 3), st.integers(0, 3))
@settings(max_examples=20)
@example(dict(batch=3, lq=9, lk=31, heads=2, head_dim=32, dtype=torch.float16, dropout_p=0.25, seed=3), 0, 0)
def test_packed_matches_float64_reference(c, extra_q, extra_k):
    check_packed(c, extra_q, extra_k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_dim_128(dtype):
    check_padded(dict(batch=2, lq=19, lk=23, heads=1, head_dim=128, dtype=dtype, dropout_p=0.25, seed=4), False)


@pytest.mark.parametrize("gather", [False, True])
def test_strided_views(gather):
    """q, k, v as views of a fused QKV projection; lengths and index as strided views."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(2, 24, 3, 2, 32, generator=gen).unbind(2)
    q_lens, k_lens = torch.tensor([[20, 7], [0, 24]], dtype=torch.int32).T  # rows of stride 2
    q_index = torch.stack([torch.randperm(24, generator=gen) for _ in range(2)], 1)[:20].T if gather else None
    dout = torch.randn(2, 20 if gather else 24, 2, 32, generator=gen)
    got = run_kernel(ta.triton_attention, q, k, v, q_lens, k_lens, dout=dout, q_index=q_index)
    assert_all_near(got, reference(q, k, v, q_lens, k_lens, dout, scale=32**-0.5, q_index=q_index), torch.float32)


def test_dropout_mask_is_a_function_of_the_seed():
    seed = torch.tensor([1234])
    mask = ta.dropout_keep_mask(seed, 2, 2, 64, 48, 0.3)
    assert torch.equal(mask, ta.dropout_keep_mask(seed, 2, 2, 64, 48, 0.3))
    assert not torch.equal(mask, ta.dropout_keep_mask(seed + 1, 2, 2, 64, 48, 0.3))
    assert abs(mask.float().mean().item() - 0.7) < 0.02
    # Heads and sequences draw different numbers.
    assert not torch.equal(mask[0, 0], mask[0, 1]) and not torch.equal(mask[0, 0], mask[1, 0])


def test_dropout_is_deterministic_for_a_seed_and_fresh_without_one():
    c = dict(batch=2, lq=16, lk=20, heads=1, head_dim=32, dtype=torch.float32, dropout_p=0.5, seed=5)
    q, k, v, q_lens, k_lens, seed, _, _ = make_inputs(c, "cpu")
    first = ta.triton_attention(q, k, v, q_lens, k_lens, dropout_p=0.5, seed=seed)[0]
    assert torch.equal(first, ta.triton_attention(q, k, v, q_lens, k_lens, dropout_p=0.5, seed=seed)[0])
    assert not torch.equal(first, ta.triton_attention(q, k, v, q_lens, k_lens, dropout_p=0.5)[0])


def small_inputs(dtype=torch.float32, length=20, head_dim=32):
    """Two sequences: all queries over 7 keys, and no queries over 3 keys."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, length, 2, head_dim, generator=gen).to(dtype) for _ in range(3))
    return q, k, v, torch.tensor([length, 0], dtype=torch.int32), torch.tensor([7, 3], dtype=torch.int32)


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda a: a.update(q=a["q"][..., :16].contiguous()), ValueError, "16"),
        (lambda a: a.update(q=a["q"][0]), ValueError, "4-D"),
        (lambda a: a.update(k=a["k"].half()), TypeError, "torch.float16"),
        (lambda a: a.update(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()), TypeError, "float64"),
        (lambda a: a.update(q_lens=a["q_lens"].float()), TypeError, "q_lens"),
        (lambda a: a.update(k_lens=a["k_lens"][:1]), ValueError, "k_lens"),
        (lambda a: a.update(v=a["v"][:, :5]), ValueError, "v"),
        (lambda a: a.update(q_index=torch.zeros(3, 4, dtype=torch.int64)), ValueError, "q_index"),
        (lambda a: a.update(dropout_p=1.0), ValueError, "dropout_p"),
        (lambda a: a.update(dropout_p=0.1, seed=torch.tensor([1.0])), TypeError, "seed"),
    ],
)
def test_bad_inputs_raise_naming_the_value(change, error, words):
    q, k, v, q_lens, k_lens = small_inputs()
    args = dict(q=q, k=k, v=v, q_lens=q_lens, k_lens=k_lens)
    change(args)
    with pytest.raises(error, match=words):
        ta.triton_attention(**args)


def test_bad_packed_inputs_raise():
    q = torch.randn(10, 2, 32)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        ta.triton_attention_varlen(q, q, q, cu, cu[:2], 6, 6)
    with pytest.raises(ValueError, match="3-D"):
        ta.triton_attention_varlen(q[None], q, q, cu, cu, 6, 6)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        ta.triton_attention_varlen(q, q, q, cu, cu, 6, -1)


@pytest.mark.parametrize(
    "q_lens, k_lens, words",
    [
        ([21, 0], [7, 3], "sequence 0 has q_lens=21"),
        ([20, -1], [7, 3], "sequence 1 has q_lens=-1"),
        ([20, 0], [7, 21], "sequence 1 has q_lens=0, k_lens=21"),
        ([20, 0], [0, 3], "sequence 0 has q_lens=20, k_lens=0"),
    ],
)
def test_lengths_outside_the_tensors_raise(q_lens, k_lens, words):
    q, k, v, _, _ = small_inputs()
    q_lens, k_lens = torch.tensor(q_lens), torch.tensor(k_lens)
    with pytest.raises(ValueError, match=words):
        ta.triton_attention(q, k, v, q_lens, k_lens)
    with pytest.raises(ValueError, match=words):
        dispatch.attention(q, k, v, q_lens, k_lens, backend="sdpa")


@pytest.mark.parametrize(
    "index, words",
    [
        ([[0, 5, 39], [1, 2, 3]], r"q_index row 0 holds \[0, 5, 39\]: positions must lie in \[0, 20\)"),
        ([[0, 5, 6], [1, -2, 3]], r"q_index row 1 holds \[1, -2\]"),
        ([[0, 5, 5], [1, 2, 3]], r"q_index row 0 repeats a position: \[0, 5, 5\]"),
    ],
)
def test_bad_query_index_raises(index, words):
    q, k, v, _, _ = small_inputs()
    with pytest.raises(ValueError, match=words):
        ta.triton_attention(q, k, v, torch.tensor([3, 2]), torch.tensor([7, 3]), q_index=torch.tensor(index))


def test_query_index_may_repeat_in_unused_slots():
    q, k, v, _, _ = small_inputs()
    index, q_lens, k_lens = torch.tensor([[4, 9, 9], [1, 1, 1]]), torch.tensor([2, 1]), torch.tensor([7, 3])
    fused, _ = ta.triton_attention(q, k, v, q_lens, k_lens, q_index=index)
    gathered_first, _ = ta.triton_attention(q[torch.arange(2)[:, None], index], k, v, q_lens, k_lens)
    torch.testing.assert_close(fused, gathered_first, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "cu_q, cu_k, words",
    [
        ([1, 4, 10], [0, 4, 10], r"cu_seqlens_q=\[1, 4, 10\] must start at 0"),
        ([0, 4, 10], [0, 4, 11], r"cu_seqlens_k=\[0, 4, 11\] must start at 0 and end at <= 10"),
        ([0, 5, 4], [0, 4, 10], "sequence 1 has q_lens=-1"),
        ([0, 3, 10], [0, 4, 10], "sequence 1 has q_lens=7, k_lens=6; .* q_lens <= 6"),
        ([0, 4, 10], [0, 0, 10], "sequence 0 has q_lens=4, k_lens=0"),
    ],
)
def test_bad_packed_offsets_raise(cu_q, cu_k, words):
    q = torch.randn(10, 2, 32)
    with pytest.raises(ValueError, match=words):
        ta.triton_attention_varlen(q, q, q, torch.tensor(cu_q), torch.tensor(cu_k), 6, 10)


def test_unchecked_padded_lengths_are_clamped_to_the_tensors():
    q, k, v, _, _ = small_inputs()
    k, v = k[:, :10].contiguous(), v[:, :10].contiguous()
    unchecked, _ = ta.triton_attention(q, k, v, torch.tensor([0, 25]), torch.tensor([3, 14]), validate=False)
    clamped, _ = ta.triton_attention(q, k, v, torch.tensor([0, 20]), torch.tensor([3, 10]))
    assert torch.equal(unchecked, clamped)


@pytest.mark.skipif(not ta.INTERPRETED, reason="on a GPU this would be a real out-of-bounds read")
def test_interpreter_bounds_check_catches_an_overrun():
    """The in_bounds_memory fixture can fail: unchecked packed offsets that end past k."""
    q = torch.randn(10, 2, 32)
    k = q[:6].clone()
    with pytest.raises(triton.runtime.errors.InterpreterError, match="out-of-bounds load"):
        ta.triton_attention_varlen(q, k, k, torch.tensor([0, 4, 10]), torch.tensor([0, 3, 9]), 6, 6, validate=False)


# --------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------


def op_args(layout, dropout_p=0.0, batch=2, length=20, heads=2, head_dim=32, device="cpu"):
    """Arguments of tokdrop::attention_fwd for one layout (padded, gathered or packed)."""
    gen = torch.Generator().manual_seed(0)
    q_lens = torch.tensor([length, 1, 0, 13][:batch], dtype=torch.int32)
    k_lens = torch.tensor([3, length, 0, 9][:batch], dtype=torch.int32)
    seed = torch.tensor([7]) if dropout_p else None
    rows = 2 * length if layout == "gathered" else length
    q, k, v = (torch.randn(batch, n, heads, head_dim, generator=gen) for n in (rows, length, length))
    if layout == "packed":
        q, k, v = q[lens_mask(q_lens, length)], k[lens_mask(k_lens, length)], v[lens_mask(k_lens, length)]
        args = (q, k, v, cumulative(q_lens), cumulative(k_lens), None, seed, 0.2, dropout_p, length, length, True)
    else:
        index = torch.stack([torch.randperm(rows, generator=gen)[:length] for _ in range(batch)])
        args = (
            q,
            k,
            v,
            q_lens,
            k_lens,
            index if layout == "gathered" else None,
            seed,
            0.2,
            dropout_p,
            length,
            length,
            False,
        )
    return tuple(a.to(device).requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a for a in args)


# opcheck's schema test runs the op under a dispatch mode, inside which the Triton interpreter
# once crashed a full CPU run of the suite; on GPU every opcheck test runs.
INTERPRETER_OPCHECK = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
ALL_OPCHECK = ("test_schema", *INTERPRETER_OPCHECK)


def opcheck_both(args):
    """opcheck the forward op (autograd included) and the backward op (no double backward)."""
    utils = INTERPRETER_OPCHECK if args[0].device.type == "cpu" else ALL_OPCHECK
    torch.library.opcheck(ta.attention_fwd_op, args, test_utils=utils)
    out, lse = ta.attention_fwd_op(*args)
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(
        ta.attention_bwd_op, (torch.randn_like(out), *plain[:3], out.detach(), lse, *plain[3:]), test_utils=utils
    )


@pytest.mark.parametrize("layout, dropout_p", [("padded", 0.0), ("gathered", 0.0), ("packed", 0.0), ("padded", 0.2)])
def test_opcheck(layout, dropout_p):
    opcheck_both(op_args(layout, dropout_p))


def test_compiles_fullgraph_on_cpu():
    """The Triton backend is an opaque op to dynamo: no graph break. (On CPU `aot_eager` stands in
    for inductor; test_gpu_compile_inductor compiles for real.)"""
    q, k, v, q_lens, k_lens = small_inputs()
    q.requires_grad_()

    def f(q, k, v):
        return dispatch.attention(q, k, v, q_lens, k_lens, backend="triton").square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(torch.autograd.grad(compiled(q, k, v), q), torch.autograd.grad(f(q, k, v), q))


# --------------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------------


def assert_same_with_grads(got, want, inputs):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, inputs, g)
    assert all(not t.isnan().any() for t in grads)
    torch.testing.assert_close(grads, torch.autograd.grad(want, inputs, g), rtol=1e-5, atol=1e-5)


def test_triton_backend_matches_sdpa_on_cpu():
    q, k, v, q_lens, k_lens = (t.requires_grad_(t.is_floating_point()) for t in small_inputs())
    got = dispatch.attention(q, k, v, q_lens.long(), k_lens.long(), scale=0.3, backend="triton")
    assert_same_with_grads(got, dispatch.attention(q, k, v, q_lens, k_lens, scale=0.3, backend="sdpa"), (q, k, v))


def test_triton_backend_falls_back_for_head_dims_the_kernels_lack(caplog):
    q, k, v, q_lens, k_lens = small_inputs(head_dim=48)
    with pytest.raises(ValueError, match="head_dim 48"):
        ta.triton_attention(q, k, v, q_lens, k_lens)
    dispatch._log_fallback.cache_clear()
    with caplog.at_level(logging.WARNING, logger="tokdrop.kernels"):
        for _ in range(3):
            torch.testing.assert_close(
                dispatch.attention(q, k, v, q_lens, k_lens, backend="triton"),
                dispatch.attention(q, k, v, q_lens, k_lens, backend="sdpa"),
            )
    assert [r.getMessage() for r in caplog.records] == [
        "attention backend 'triton' falls back to 'sdpa': head_dim 48 is not supported by the Triton kernels "
        "(they take (32, 64, 128))"
    ]
    backend = dispatch.resolve_backend("triton", "cpu", torch.float32, 48)
    assert backend.name == "sdpa" and "standing in for 'triton': head_dim 48" in repr(backend)
    assert repr(dispatch.resolve_backend("triton", "cpu", torch.float32, 64)) == "Backend('triton')"


def test_packing_adapter_with_the_packed_kernel():
    """via_packed (the varlen backend's layout change) around our own packed kernel, on CPU."""
    q, k, v, q_lens, k_lens = (t.requires_grad_(t.is_floating_point()) for t in small_inputs())
    run = via_packed(lambda *args: ta.triton_attention_varlen(*args)[0])
    assert_same_with_grads(
        run(q, k, v, q_lens, k_lens, scale=0.3), attention_reference(q, k, v, q_lens, k_lens, scale=0.3), (q, k, v)
    )


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # CPU runs it eagerly
def test_flex_forward_on_cpu():
    q, k, v, q_lens, k_lens = small_inputs()  # FlexAttention has no backward pass on CPU
    torch.testing.assert_close(
        dispatch.attention(q, k, v, q_lens, k_lens, backend="flex"),
        attention_reference(q, k, v, q_lens, k_lens),
        rtol=1e-5,
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="dropout"):
        dispatch.attention(q, k, v, q_lens, k_lens, dropout_p=0.1, backend="flex")


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.resolve_backend(None, "cpu").name == "sdpa"
    assert dispatch.resolve_backend("triton", "cpu").name == "triton"  # under TRITON_INTERPRET=1
    with pytest.raises(ValueError, match="'varlen' is not available on cpu tensors: .*CUDA"):
        dispatch.resolve_backend("varlen", "cpu")
    with pytest.raises(ValueError, match="'nope' is not an attention backend"):
        dispatch.resolve_backend("nope", "cpu")
    monkeypatch.setenv(dispatch.ENV_VAR, "eager")
    assert dispatch.resolve_backend("triton", "cpu").name == "eager"
    with dispatch.use_backend("sdpa"):  # the explicit block wins over the environment
        assert dispatch.resolve_backend("triton", "cpu").name == "sdpa"
        with dispatch.use_backend("triton"):
            assert dispatch.resolve_backend(None, "cpu").name == "triton"
        assert dispatch.resolve_backend(None, "cpu").name == "sdpa"
    assert dispatch.resolve_backend(None, "cpu").name == "eager"
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=r"\$TOKDROP_ATTENTION='bogus'"):
        dispatch.resolve_backend("sdpa", "cpu")
    with pytest.raises(ValueError, match="'bogus' is not an attention backend"):
        with dispatch.use_backend("bogus"):
            pass


def test_register_backend_adds_a_backend(monkeypatch):
    """A new record under a new name becomes dispatchable, by a config or use_backend."""
    calls = []

    def doubled(q, k, v, q_lens, k_lens, *, scale=None, dropout_p=0.0):
        calls.append(q.shape)
        return 2 * attention_reference(q, k, v, q_lens, k_lens, scale=scale)

    monkeypatch.setitem(dispatch._REGISTRY, "doubled", dispatch.Backend("doubled", doubled))
    q, k, v, q_lens, k_lens = small_inputs()
    torch.testing.assert_close(
        dispatch.attention(q, k, v, q_lens, k_lens, backend="doubled"), 2 * attention_reference(q, k, v, q_lens, k_lens)
    )
    with dispatch.use_backend("doubled"):
        dispatch.attention(q, k, v, q_lens, k_lens)
    assert len(calls) == 2 and "doubled" in dispatch.backend_names()
    with pytest.raises(TypeError, match="Backend record"):
        dispatch.register_backend("doubled")


@pytest.mark.parametrize("backend", ["triton", "sdpa", "eager"])
def test_packed_layout_on_every_cpu_backend(backend):
    """attention_varlen: the Triton packed kernel, or the padded backends through padding."""
    c = dict(batch=3, lq=13, lk=13, heads=2, head_dim=32, dtype=torch.float32, dropout_p=0.0, seed=8)
    q, k, v, q_lens, k_lens, _, _, _ = make_inputs(c, "cpu")
    q_valid, k_valid = lens_mask(q_lens, 13), lens_mask(k_lens, 13)
    args = (q[q_valid], k[k_valid], v[k_valid], cumulative(q_lens), cumulative(k_lens), 13, 13)
    got = dispatch.attention_varlen(*args, scale=0.4, backend=backend)
    want = attention_reference(q, k, v, q_lens, k_lens, scale=0.4)[q_valid]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention_reference_varlen(*args, scale=0.4), want, rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40), st.integers(1, 40)), min_size=1, max_size=12),
    st.integers(0, 3),
    st.integers(0, 2**31 - 1),
)
def test_length_buckets_match_the_reference_and_its_gradients(lens, spare_rows, seed):
    """The CPU's packed path (packed_in_buckets over sdpa), float64: every sequence lands in one
    bucket whose shortest is at least BUCKET_SPAN of its longest; output and gradients are the
    reference's, and rows past the last sequence are zero."""
    q_lens, k_lens = (torch.tensor(side) for side in zip(*lens, strict=True))
    sizes = torch.maximum(q_lens, k_lens)
    groups = ta.length_buckets(sizes.tolist())
    assert sorted(b for g in groups for b in g) == list(range(len(lens)))
    assert all(sizes[g].min() >= ta.BUCKET_SPAN * sizes[g].max() for g in groups)
    generator = torch.Generator().manual_seed(seed)
    tq, tk = int(q_lens.sum()) + spare_rows, int(k_lens.sum())
    q, k, v = (
        torch.randn(rows, 2, 8, dtype=torch.float64, generator=generator, requires_grad=True) for rows in (tq, tk, tk)
    )
    args = (q, k, v, cumulative(q_lens), cumulative(k_lens), 40, 40)
    got = dispatch.attention_varlen(*args, scale=0.3, backend="sdpa")
    want = attention_reference_varlen(*args, scale=0.3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert not got[tq - spare_rows :].any()
    dout = torch.randn(got.shape, dtype=torch.float64, generator=generator)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_missing_xformers_is_named():
    with pytest.raises(ValueError, match="xformers is not installed"):
        dispatch.resolve_backend("xformers", "cpu")


def test_benchmark_smoke_run(tmp_path):
    """perf/bench_attention.py's code path on tiny shapes; without CUDA it refuses a real run."""
    bench = [sys.executable, str(PERF / "bench_attention.py")]
    done = subprocess.run(
        [*bench, "--device", "cpu", "--smoke", "--out", str(tmp_path / "b.json")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "b.json").read_text())
    assert {"device", "torch", "triton", "git", "date", "cases", "targets", "query_gather"} <= result.keys()
    assert result["query_gather"]["cases"] >= 1
    assert {"triton", "triton_gather", "gather_then_triton", "sdpa"} <= result["cases"][-1]["results"].keys()
    assert all(
        r["max_abs_diff_vs_sdpa"] < 0.05 for case in result["cases"] for r in case["results"].values() if "fwd_ms" in r
    )
    if not torch.cuda.is_available():
        assert subprocess.run(bench, capture_output=True, timeout=600).returncode == 2


# --------------------------------------------------------------------------------------------------
# GPU: the same checks at real sizes, inductor, CUDA-only backends; a JSON summary in perf/results/
# --------------------------------------------------------------------------------------------------


# Head dim 64 in every dtype; 128 in the 16-bit ones.
REAL_HEADS = [(64, dtype) for dtype in DTYPES] + [(128, torch.float16), (128, torch.bfloat16)]


@needs_cuda
@pytest.mark.parametrize("layout", ["padded", "gathered", "packed"])
@pytest.mark.parametrize("head_dim, dtype", REAL_HEADS)
@pytest.mark.parametrize("lq, lk", [(128, 128), (512, 512), (256, 512), (154, 1024), (1024, 1024)])
def test_gpu_real_sizes(gpu_summary, layout, head_dim, dtype, lq, lk):
    """B=32, NH=12, D=64 and 128; bfloat16 (the training dtype) with attention dropout 0.1."""
    c = dict(
        batch=32,
        lq=lq,
        lk=lk,
        heads=12,
        head_dim=head_dim,
        dtype=dtype,
        dropout_p=0.1 if dtype == torch.bfloat16 else 0.0,
        seed=lq + lk,
    )
    with gpu_summary.check(f"real_sizes/{layout}/D={head_dim}/{dtype}/Lq={lq}/Lk={lk}"):
        if layout == "packed":
            check_packed(c, device="cuda")
        else:
            check_padded(c, layout == "gathered", device="cuda")


@needs_cuda
@pytest.mark.parametrize("layout, dropout_p", [("padded", 0.0), ("gathered", 0.0), ("packed", 0.0), ("padded", 0.1)])
def test_gpu_opcheck(gpu_summary, layout, dropout_p):
    with gpu_summary.check(f"opcheck/{layout}/dropout={dropout_p}"):
        opcheck_both(op_args(layout, dropout_p, batch=4, length=200, heads=3, head_dim=64, device="cuda"))


@needs_cuda
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_gpu_compile_inductor(gpu_summary, dropout_p):
    with gpu_summary.check(f"compile_fullgraph_inductor/dropout={dropout_p}"):
        q, k, v, q_lens, k_lens = (t.cuda() for t in small_inputs(torch.bfloat16, length=300, head_dim=64))
        q.requires_grad_()

        def f(q, k, v):
            out = dispatch.attention(q, k, v, q_lens, k_lens, dropout_p=dropout_p, backend="triton")
            return out.float().square().sum()

        torch._dynamo.reset()
        (grad,) = torch.autograd.grad(torch.compile(f, fullgraph=True)(q, k, v), q)
        assert not grad.isnan().any()
        if dropout_p == 0.0:
            torch.testing.assert_close(grad, torch.autograd.grad(f(q, k, v), q)[0])


@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "sdpa", "flex", "varlen", "xformers"])
def test_gpu_backends_match_reference(gpu_summary, backend):
    try:
        dispatch.resolve_backend(backend, "cuda")
    except ValueError as err:
        pytest.skip(str(err))
    with gpu_summary.check(f"backend/{backend}"):
        c = dict(batch=8, lq=77, lk=256, heads=12, head_dim=64, dtype=torch.bfloat16, seed=0)
        q, k, v, q_lens, k_lens, _, dout, _ = make_inputs(c, "cuda")
        got = run_kernel(lambda *a: (dispatch.attention(*a, backend=backend), None), q, k, v, q_lens, k_lens, dout=dout)
        want = reference(q, k, v, q_lens, k_lens, dout, scale=64**-0.5)
        assert_all_near(got[:1] + want[1:2] + got[2:], want, torch.bfloat16)  # backends return no lse
