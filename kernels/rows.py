"""Drop (row gather) and restore (row scatter) of token rows, with autograd.

    drop_tokens(x [B, S, H], idx [B, K]) -> [B, K, H]
        out[b, j] = x[b, idx[b, j]]
    restore_tokens(saved [B, S, H], kept [B, K, H], idx [B, K], kept_lens [B]) -> [B, S, H]
        out = saved, except out[b, idx[b, j]] = kept[b, j] for j < kept_lens[b]

Every row of idx holds distinct positions, also in the slots j >= kept_lens[b] (positions that
restore leaves as saved). Gradients: drop scatters its gradient back into zeros; restore gives
d_saved = grad with the restored rows zeroed and d_kept = grad gathered at idx, zero in unused slots.

Restore is one pass over the output: an inverse index (position -> slot, or -1) tells each output row
whether to read `kept` or `saved`, instead of copying `saved` and scattering `kept` over the copy.
The Triton kernels run as the custom ops ``tokdrop::drop_tokens`` / ``tokdrop::restore_tokens``
(fake + autograd; their backward passes are ops too). `drop_tokens` / `restore_tokens` follow the
attention backend (tokdrop.kernels.backends): the Triton kernels under `triton`, the pure-PyTorch
references under every other backend, which torch.compile fuses like any other indexing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import current_backend
from .tuning import Tiled, tile
from .validate import check_index, check_range

try:
    import triton
    import triton.language as tl
except ImportError:  # installs without Triton run the references; the kernels are never launched
    triton = tl = None

_jit = (lambda fn: fn) if triton is None else triton.jit

# --------------------------------------------------------------------------------------------------
# Kernels: programs own [BLOCK_R rows x BLOCK_H features] tiles of the output, rows flattened (b, j)
# --------------------------------------------------------------------------------------------------


@_jit
def _tile(n_rows, row_len, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's flat rows r = (b, j) with j < row_len, its feature columns, and r's validity."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    return r, cols, r < n_rows, r // row_len, r % row_len


@_jit
def _gather_rows_kernel(
    X, IDX, LENS, OUT, n_rows, K, H,
    sxb, sxs, sxh,
    sib, sij,
    sob, soj, soh,
    HAS_LENS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """OUT[b, j] = X[b, IDX[b, j]]; zero in slots j >= LENS[b] when LENS is given."""
    r, cols, r_ok, b, j = _tile(n_rows, K, BLOCK_R, BLOCK_H)
    take = r_ok
    if HAS_LENS:
        take = take & (j < tl.load(LENS + b, mask=r_ok, other=0))
    src = tl.load(IDX + b * sib + j * sij, mask=take, other=0)
    h_ok = cols[None, :] < H
    x = tl.load(X + b[:, None] * sxb + src[:, None] * sxs + cols[None, :] * sxh, mask=take[:, None] & h_ok, other=0.0)
    tl.store(OUT + b[:, None] * sob + j[:, None] * soj + cols[None, :] * soh, x, mask=r_ok[:, None] & h_ok)


@_jit
def _merge_rows_kernel(
    BASE, ROWS, INV, OUT, n_rows, S, H,
    sbb, sbs, sbh,
    srb, srj, srh,
    sob, sos, soh,
    HAS_BASE: tl.constexpr, HAS_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """OUT[b, s] = ROWS[b, INV[b, s]] where INV[b, s] >= 0, else BASE[b, s]; absent inputs read 0."""
    r, cols, r_ok, b, s = _tile(n_rows, S, BLOCK_R, BLOCK_H)
    slot = tl.load(INV + r, mask=r_ok, other=-1)
    ok = r_ok[:, None] & (cols[None, :] < H)
    from_rows = (slot >= 0)[:, None]
    val = tl.zeros([BLOCK_R, BLOCK_H], OUT.dtype.element_ty)
    if HAS_ROWS:
        val = tl.load(
            ROWS + b[:, None] * srb + slot[:, None] * srj + cols[None, :] * srh, mask=ok & from_rows, other=0.0
        )
    if HAS_BASE:
        base = tl.load(
            BASE + b[:, None] * sbb + s[:, None] * sbs + cols[None, :] * sbh, mask=ok & ~from_rows, other=0.0
        )
        val = tl.where(from_rows, val, base)
    tl.store(OUT + b[:, None] * sob + s[:, None] * sos + cols[None, :] * soh, val, mask=ok)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


# Programs own whole rows of up to 1024 features (BLOCK_H, from the width) and BLOCK_R rows. The GPU
# space per BLOCK_H (autotuned per width, dtype and variant) takes about 4096 elements on 4 warps or
# 16384 on 8, at most 512 rows (more rows per thread spill their index arithmetic below 16
# features); every configuration compiles for sm_90a without spills (perf/static_sm90.py). The
# interpreter keeps the 4096-element tiles.
BLOCK_HS = tuple(2**i for i in range(11))
ROWS_SPACE = {
    h: [tile(4, 1, BLOCK_R=max(1, 4096 // h)), tile(8, 1, BLOCK_R=max(1, min(16384 // h, 512)))] for h in BLOCK_HS
}
_GATHER = Tiled(
    _gather_rows_kernel, ROWS_SPACE, lambda h: tile(4, 1, BLOCK_R=max(1, 4096 // h)), ["BLOCK_H", "HAS_LENS"]
)
_MERGE = Tiled(
    _merge_rows_kernel, ROWS_SPACE, lambda h: tile(4, 1, BLOCK_R=max(1, 4096 // h)), ["BLOCK_H", "HAS_BASE", "HAS_ROWS"]
)
KERNELS = (_GATHER, _MERGE)


def _row_tiles(n_rows: int, hidden: int):
    """BLOCK_H for rows of `hidden` features, and the grid over (row block, feature block)."""
    block_h = min(triton.next_power_of_2(hidden), 1024)
    return block_h, lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]), triton.cdiv(hidden, block_h))


def _gather_rows(x: Tensor, idx: Tensor, lens: Tensor | None) -> Tensor:
    batch, slots = idx.shape
    out = x.new_empty((batch, slots, x.shape[2]))
    block_h, grid = _row_tiles(batch * slots, x.shape[2])
    lens = None if lens is None else lens.contiguous()  # read with unit stride
    _GATHER(
        block_h,
        grid,
        x.device,
        x,
        idx,
        lens,
        out,
        batch * slots,
        slots,
        x.shape[2],
        *x.stride(),
        *idx.stride(),
        *out.stride(),
        HAS_LENS=lens is not None,
        BLOCK_H=block_h,
    )
    return out


def _inverse_index(idx: Tensor, lens: Tensor | None, positions: int) -> Tensor:
    """inv [B, S] int32: the slot j (< lens[b]) with idx[b, j] == s, else -1."""
    slots = torch.arange(idx.shape[1], device=idx.device, dtype=torch.int32).expand(idx.shape)
    if lens is not None:
        slots = slots.masked_fill(slots >= lens[:, None], -1)
    inv = torch.full((idx.shape[0], positions), -1, dtype=torch.int32, device=idx.device)
    return inv.scatter_(1, idx.long(), slots)


def _merge_rows(base: Tensor | None, rows: Tensor | None, inv: Tensor, like: Tensor) -> Tensor:
    """OUT[b, s] = rows[b, inv[b, s]] or base[b, s]; `like` gives the row dtype and width."""
    batch, positions = inv.shape
    hidden = like.shape[2]
    out = like.new_empty((batch, positions, hidden))
    no_strides = (0, 0, 0)
    block_h, grid = _row_tiles(batch * positions, hidden)
    _MERGE(
        block_h,
        grid,
        like.device,
        base,
        rows,
        inv,
        out,
        batch * positions,
        positions,
        hidden,
        *(no_strides if base is None else base.stride()),
        *(no_strides if rows is None else rows.stride()),
        *out.stride(),
        HAS_BASE=base is not None,
        HAS_ROWS=rows is not None,
        BLOCK_H=block_h,
    )
    return out


# --------------------------------------------------------------------------------------------------
# Ops
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("tokdrop::drop_tokens", mutates_args=())
def drop_tokens_op(x: Tensor, idx: Tensor) -> Tensor:
    return _gather_rows(x, idx, None)


@drop_tokens_op.register_fake
def _(x, idx):
    return x.new_empty((idx.shape[0], idx.shape[1], x.shape[2]))


@torch.library.custom_op("tokdrop::drop_tokens_backward", mutates_args=())
def drop_tokens_backward_op(grad: Tensor, idx: Tensor, positions: int) -> Tensor:
    return _merge_rows(None, grad, _inverse_index(idx, None, positions), grad)


@drop_tokens_backward_op.register_fake
def _(grad, idx, positions):
    return grad.new_empty((grad.shape[0], positions, grad.shape[2]))


def _drop_setup(ctx, inputs, output):
    x, idx = inputs
    ctx.positions = x.shape[1]
    ctx.save_for_backward(idx)


def _drop_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    return drop_tokens_backward_op(grad, idx, ctx.positions), None


drop_tokens_op.register_autograd(_drop_backward, setup_context=_drop_setup)


@torch.library.custom_op("tokdrop::restore_tokens", mutates_args=())
def restore_tokens_op(saved: Tensor, kept: Tensor, idx: Tensor, kept_lens: Tensor) -> Tensor:
    return _merge_rows(saved, kept, _inverse_index(idx, kept_lens, saved.shape[1]), saved)


@restore_tokens_op.register_fake
def _(saved, kept, idx, kept_lens):
    return saved.new_empty(saved.shape)


@torch.library.custom_op("tokdrop::restore_tokens_backward", mutates_args=())
def restore_tokens_backward_op(grad: Tensor, idx: Tensor, kept_lens: Tensor) -> tuple[Tensor, Tensor]:
    d_saved = _merge_rows(grad, None, _inverse_index(idx, kept_lens, grad.shape[1]), grad)
    return d_saved, _gather_rows(grad, idx, kept_lens)


@restore_tokens_backward_op.register_fake
def _(grad, idx, kept_lens):
    return grad.new_empty(grad.shape), grad.new_empty((idx.shape[0], idx.shape[1], grad.shape[2]))


def _restore_setup(ctx, inputs, output):
    _, _, idx, kept_lens = inputs
    ctx.save_for_backward(idx, kept_lens)


def _restore_backward(ctx, grad):
    idx, kept_lens = ctx.saved_tensors
    d_saved, d_kept = restore_tokens_backward_op(grad, idx, kept_lens)
    return d_saved, d_kept, None, None


restore_tokens_op.register_autograd(_restore_backward, setup_context=_restore_setup)


# --------------------------------------------------------------------------------------------------
# Public API and references
# --------------------------------------------------------------------------------------------------


def _check_int(name: str, t: Tensor, ndim: int, like: Tensor) -> None:
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.dim() != ndim or t.shape[0] != like.shape[0]:
        raise ValueError(f"{name} must be {ndim}-D with batch size {like.shape[0]}, got shape {list(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on {like.device}, got {t.device}")


def _check(x: Tensor, idx: Tensor, name: str = "x") -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} must be [B, S, H], got shape {list(x.shape)}")
    _check_int("idx", idx, 2, x)


def drop_tokens_reference(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, S, H] rows at idx [B, K] -> [B, K, H]."""
    return x.gather(1, idx.long()[..., None].expand(-1, -1, x.shape[2]))


def restore_tokens_reference(saved: Tensor, kept: Tensor, idx: Tensor, kept_lens: Tensor) -> Tensor:
    """saved [B, S, H] with rows idx[b, j] replaced by kept[b, j] for j < kept_lens[b]."""
    valid = torch.arange(idx.shape[1], device=idx.device) < kept_lens[:, None]
    # Unused slots write back the saved rows (distinct positions), so the scatter leaves them as is
    # and its gradient stays exact.
    rows = torch.where(valid[..., None], kept, drop_tokens_reference(saved, idx))
    return saved.scatter(1, idx.long()[..., None].expand(-1, -1, saved.shape[2]), rows)


def _use_kernels(x: Tensor) -> bool:
    return current_backend(x.device.type).triton_rows


def drop_tokens(x: Tensor, idx: Tensor, *, validate: bool = True) -> Tensor:
    """Rows of x [B, S, H] at idx [B, K] -> [B, K, H] (Triton or the reference, by the backend).

    validate: check that every row of idx holds distinct positions in [0, S) (a device sync).
    """
    _check(x, idx)
    if validate:
        check_index("idx", idx, x.shape[1])
    return drop_tokens_op(x, idx) if _use_kernels(x) else drop_tokens_reference(x, idx)


def restore_tokens(saved: Tensor, kept: Tensor, idx: Tensor, kept_lens: Tensor, *, validate: bool = True) -> Tensor:
    """saved [B, S, H] with kept [B, K, H] written back at idx [B, K] for slots j < kept_lens[b].

    validate: check idx as drop_tokens does and 0 <= kept_lens <= K (device syncs).
    """
    _check(saved, idx, "saved")
    if kept.shape != (*idx.shape, saved.shape[2]):
        raise ValueError(f"kept must have shape {[*idx.shape, saved.shape[2]]}, got {list(kept.shape)}")
    if kept.dtype != saved.dtype:
        raise TypeError(f"kept and saved must share a dtype, got {kept.dtype} and {saved.dtype}")
    _check_int("kept_lens", kept_lens, 1, saved)
    if validate:
        check_index("idx", idx, saved.shape[1])
        check_range("kept_lens", kept_lens, 0, idx.shape[1])
    if _use_kernels(saved):
        return restore_tokens_op(saved, kept, idx, kept_lens)
    return restore_tokens_reference(saved, kept, idx, kept_lens)
