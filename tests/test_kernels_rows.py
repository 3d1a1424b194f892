"""Drop/restore row kernels against their PyTorch references: exact, forward and backward."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tokdrop.kernels import rows, use_backend

needs_cuda = pytest.mark.needs_cuda
# NaN-poisoned allocations and bounds-checked interpreter memory (conftest.py).
pytestmark = pytest.mark.usefixtures("poisoned_memory", "in_bounds_memory")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_case(batch, seq_len, slots, hidden, dtype, idx_dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(seq_len, generator=gen)[:slots] for _ in range(batch)]).to(idx_dtype)
    kept_lens = torch.randint(0, slots + 1, (batch,), generator=gen)
    kept_lens[0] = slots if seed % 2 else 0  # the edges, every other case
    saved, kept = (torch.randn(batch, n, hidden, generator=gen).to(dtype) for n in (seq_len, slots))
    return tuple(t.to(device) for t in (saved, kept, idx, kept_lens))


def assert_identical(fn, reference, inputs, grad_out):
    """fn and reference give bit-identical outputs and input gradients."""
    results = []
    for f in (fn, reference):
        leaves = [t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs]
        out = f(*leaves)
        results.append((out, *torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad_out)))
    for a, e in zip(*results, strict=True):
        assert torch.equal(a, e)


cases = st.tuples(
    st.integers(1, 3),
    st.integers(1, 40),
    st.integers(1, 40),
    st.sampled_from([1, 7, 64, 100]),
    st.sampled_from(DTYPES),
    st.sampled_from([torch.int32, torch.int64]),
    st.integers(0, 2**16),
)


@given(cases)
@settings(max_examples=25)
@example((2, 40, 40, 64, torch.bfloat16, torch.int64, 1))
def test_drop_and_restore_equal_their_references_exactly(case):
    batch, seq_len, slots, hidden, dtype, idx_dtype, seed = case
    slots = min(slots, seq_len)
    saved, kept, idx, kept_lens = make_case(batch, seq_len, slots, hidden, dtype, idx_dtype, seed)
    g_drop, g_restore = torch.randn_like(kept), torch.randn_like(saved)

    assert_identical(rows.drop_tokens_op, rows.drop_tokens_reference, [saved, idx], g_drop)
    assert_identical(rows.restore_tokens_op, rows.restore_tokens_reference, [saved, kept, idx, kept_lens], g_restore)


def test_strided_views():
    saved, kept, idx, kept_lens = make_case(2, 12, 5, 16, torch.float32, torch.int64, 0)
    saved, kept = saved.repeat(1, 1, 2)[:, :, ::2], kept.repeat(1, 1, 2)[:, :, ::2]
    idx, kept_lens = idx.T.contiguous().T, kept_lens.repeat_interleave(2)[::2]
    assert not idx.is_contiguous() and not kept_lens.is_contiguous() and not saved.is_contiguous()
    assert_identical(rows.drop_tokens_op, rows.drop_tokens_reference, [saved, idx], torch.randn(2, 5, 16))
    assert_identical(
        rows.restore_tokens_op, rows.restore_tokens_reference, [saved, kept, idx, kept_lens], torch.randn(2, 12, 16)
    )


def test_restore_semantics_by_hand():
    saved = torch.arange(6.0).reshape(1, 6, 1)
    kept = torch.tensor([[[10.0], [20.0], [30.0]]])
    idx = torch.tensor([[4, 1, 2]])  # slot 2 is unused: position 2 keeps its saved row
    out = rows.restore_tokens_op(saved, kept, idx, torch.tensor([2]))
    assert out.flatten().tolist() == [0.0, 20.0, 2.0, 3.0, 10.0, 5.0]


def test_opcheck(tmp_path):
    """In a fresh process: in full CPU runs of the suite (never alone) the Triton interpreter crashed
    inside opcheck of these ops after other tests had loaded compiled libraries into the process."""
    code = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, sys.argv[1])
        from test_kernels_rows import make_case
        from tokdrop.kernels import rows
        saved, kept, idx, kept_lens = make_case(2, 12, 5, 33, torch.float32, torch.int64, 0)
        saved.requires_grad_()
        kept.requires_grad_()
        torch.library.opcheck(rows.drop_tokens_op, (saved, idx))
        torch.library.opcheck(rows.restore_tokens_op, (saved, kept, idx, kept_lens))
        torch.library.opcheck(rows.drop_tokens_backward_op, (kept.detach(), idx, 12))
        torch.library.opcheck(rows.restore_tokens_backward_op, (saved.detach(), idx, kept_lens))
    """)
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    # In tmp_path: the checkout's tokdrop/ folder would shadow the installed package.
    result = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compiles_fullgraph_on_cpu():
    saved, kept, idx, kept_lens = make_case(2, 12, 5, 33, torch.float32, torch.int64, 0)
    saved.requires_grad_()

    def f(saved, kept):
        x = rows.drop_tokens_op(saved, idx) * 2 + kept
        return rows.restore_tokens_op(saved, x, idx, kept_lens).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(
        torch.autograd.grad(compiled(saved, kept), saved), torch.autograd.grad(f(saved, kept), saved)
    )


def test_public_functions_follow_the_attention_backend_and_check_inputs(monkeypatch):
    """The Triton row kernels under the triton backend (here the interpreter), the references under
    the others (sdpa is the CPU default)."""
    saved, kept, idx, kept_lens = make_case(2, 12, 5, 8, torch.float32, torch.int64, 0)
    launched = []
    for name in ("drop_tokens_op", "restore_tokens_op"):
        op = getattr(rows, name)
        monkeypatch.setattr(rows, name, lambda *args, op=op, name=name: launched.append(name) or op(*args))
    for backend, kernels in (("sdpa", []), ("eager", []), ("triton", ["drop_tokens_op", "restore_tokens_op"])):
        launched.clear()
        with use_backend(backend):
            assert torch.equal(rows.drop_tokens(saved, idx), rows.drop_tokens_reference(saved, idx))
            assert torch.equal(
                rows.restore_tokens(saved, kept, idx, kept_lens),
                rows.restore_tokens_reference(saved, kept, idx, kept_lens),
            )
        assert launched == kernels, backend
    with pytest.raises(ValueError, match=r"x must be \[B, S, H\]"):
        rows.drop_tokens(saved[0], idx)
    with pytest.raises(TypeError, match="idx must be int32 or int64, got torch.float32"):
        rows.drop_tokens(saved, idx.float())
    with pytest.raises(ValueError, match="idx must be 2-D with batch size 2"):
        rows.drop_tokens(saved, idx[:1])
    with pytest.raises(ValueError, match=r"kept must have shape \[2, 5, 8\]"):
        rows.restore_tokens(saved, kept[:, :4], idx, kept_lens)
    with pytest.raises(TypeError, match="kept and saved must share a dtype"):
        rows.restore_tokens(saved, kept.double(), idx, kept_lens)
    with pytest.raises(ValueError, match="kept_lens"):
        rows.restore_tokens(saved, kept, idx, kept_lens[:1])


@pytest.mark.parametrize("bad", ["past the end", "negative", "repeated"])
def test_indices_outside_the_rows_or_repeated_raise(bad):
    saved, kept, idx, kept_lens = make_case(2, 12, 5, 8, torch.float32, torch.int64, 0)
    if bad == "past the end":
        idx[1, 2] = 12
    elif bad == "negative":
        idx[0, 0] = -1
    else:
        idx[1, 4] = idx[1, 0]
    with pytest.raises(ValueError, match=r"idx row \d (holds|repeats)"):
        rows.drop_tokens(saved, idx)
    with pytest.raises(ValueError, match=r"idx row \d (holds|repeats)"):
        rows.restore_tokens(saved, kept, idx, kept_lens)


def test_kept_lens_beyond_the_slots_raise():
    saved, kept, idx, kept_lens = make_case(2, 12, 5, 8, torch.float32, torch.int64, 0)
    with pytest.raises(ValueError, match=r"kept_lens\[1\]=6 must lie in \[0, 5\]"):
        rows.restore_tokens(saved, kept, idx, torch.tensor([5, 6]))


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_len, slots", [(512, 256), (1024, 154), (1024, 1024)])
def test_gpu_real_sizes(gpu_summary, dtype, seq_len, slots):
    with gpu_summary.check(f"rows/{dtype}/S={seq_len}/K={slots}"):
        saved, kept, idx, kept_lens = make_case(32, seq_len, slots, 768, dtype, torch.int64, 0, "cuda")
        g_drop, g_restore = torch.randn_like(kept), torch.randn_like(saved)
        assert_identical(rows.drop_tokens, rows.drop_tokens_reference, [saved, idx], g_drop)
        assert_identical(rows.restore_tokens, rows.restore_tokens_reference, [saved, kept, idx, kept_lens], g_restore)


@needs_cuda
def test_gpu_compile_inductor(gpu_summary):
    with gpu_summary.check("rows/compile_fullgraph_inductor"):
        saved, kept, idx, kept_lens = make_case(8, 256, 128, 768, torch.bfloat16, torch.int64, 0, "cuda")
        saved.requires_grad_()

        def f(saved, kept):
            x = rows.drop_tokens(saved, idx) * 2 + kept
            return rows.restore_tokens(saved, x, idx, kept_lens).float().square().sum()

        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True)
        torch.testing.assert_close(
            torch.autograd.grad(compiled(saved, kept), saved), torch.autograd.grad(f(saved, kept), saved)
        )
        torch.library.opcheck(rows.restore_tokens_op, (saved, kept, idx, kept_lens))
