"""Value checks of the lengths and indices that the attention and row kernels trust.

The kernels read and write rows by these numbers, so a length past a tensor's end is an
out-of-bounds access, not just a wrong answer. Each check costs a device sync (a bool read back), so
callers that build the numbers themselves pass validate=False, and the checks are skipped while
torch.compile traces (a data-dependent branch would break the graph).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor


def _eager_only(check: Callable[..., None]) -> Callable[..., None]:
    """Run the check only outside torch.compile tracing."""

    @functools.wraps(check)
    def run(*args, **kwargs) -> None:
        if not torch.compiler.is_compiling():
            check(*args, **kwargs)

    return run


def _first_bad_row(bad: Tensor) -> int | None:
    """Index of the first True of a 1-D bool tensor, or None; the one device sync of a check."""
    if not bool(bad.any()):
        return None
    return int(bad.nonzero()[0, 0])


@_eager_only
def check_range(name: str, values: Tensor, low: int, high: int) -> None:
    """low <= values[b] <= high for every b."""
    b = _first_bad_row((values < low) | (values > high))
    if b is not None:
        raise ValueError(f"{name}[{b}]={int(values[b])} must lie in [{low}, {high}]")


@_eager_only
def check_lengths(q_lens: Tensor, k_lens: Tensor, max_q: int, max_k: int) -> None:
    """0 <= q_lens[b] <= max_q, 0 <= k_lens[b] <= max_k, and k_lens[b] >= 1 wherever q_lens[b] > 0."""
    bad = (q_lens < 0) | (q_lens > max_q) | (k_lens < 0) | (k_lens > max_k) | ((q_lens > 0) & (k_lens < 1))
    b = _first_bad_row(bad)
    if b is not None:
        raise ValueError(
            f"sequence {b} has q_lens={int(q_lens[b])}, k_lens={int(k_lens[b])}; lengths must satisfy "
            f"0 <= q_lens <= {max_q}, 0 <= k_lens <= {max_k}, and k_lens >= 1 where q_lens > 0"
        )


@_eager_only
def check_index(name: str, index: Tensor, positions: int, lens: Tensor | None = None) -> None:
    """Each row of index [B, K] holds distinct positions in [0, positions) in its slots j < lens[b]
    (all slots when lens is None)."""
    slots = torch.arange(index.shape[1], device=index.device)
    used = torch.ones_like(index, dtype=torch.bool) if lens is None else slots < lens[:, None]
    b = _first_bad_row((used & ((index < 0) | (index >= positions))).any(1))
    if b is not None:
        raise ValueError(f"{name} row {b} holds {index[b, used[b]].tolist()}: positions must lie in [0, {positions})")
    # Unused slots become distinct negative numbers, so only repeats among used slots compare equal.
    ordered = torch.where(used, index, -1 - slots).sort(1).values
    b = _first_bad_row((ordered[:, 1:] == ordered[:, :-1]).any(1))
    if b is not None:
        raise ValueError(f"{name} row {b} repeats a position: {index[b, used[b]].tolist()}")


@_eager_only
def check_cu_seqlens(name: str, cu_seqlens: Tensor, tokens: int) -> None:
    """Offsets start at 0 and end at <= tokens (the packed rows); check_lengths bounds their steps."""
    if _first_bad_row(torch.cat([cu_seqlens[:1] != 0, cu_seqlens[-1:] > tokens])) is not None:
        raise ValueError(f"{name}={cu_seqlens.tolist()} must start at 0 and end at <= {tokens}, the packed rows")


@_eager_only
def check_packed(
    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, tokens_q: int, tokens_k: int, max_seqlen_q: int, max_seqlen_k: int
) -> None:
    """Packed-layout offsets that stay inside tensors of tokens_q / tokens_k rows, with sequences of
    at most max_seqlen_q / max_seqlen_k tokens and a key wherever there are queries."""
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, tokens_q)
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, tokens_k)
    check_lengths(cu_seqlens_q.diff(), cu_seqlens_k.diff(), max_seqlen_q, max_seqlen_k)
