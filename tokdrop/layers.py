"""Building blocks for token dropping, NarrowBERT and random-LTD, usable on any encoder.

Layer protocol. `Encoder` runs a stack of layers, each a callable

    layer(x, x_lens, kv=None, kv_lens=None) -> Tensor shaped like x

    x        [B, Lq, H]  the tokens this layer updates (queries, residual stream, FFN input);
                         row b holds x_lens[b] real tokens first, then padding
    kv       [B, Lk, H]  where keys and values come from; None = x itself (self-attention),
                         with kv_lens[b] real tokens first

`BertLayer` below follows it. Padding rows may hold any finite values; nothing reads them.
`BertLayer` also takes the packed layout: x [T, H] holding the sequences back to back, with
x_lens a `Packed` record of their offsets (the unpadded encoder; full and narrow layers only).

Layer plan. Each layer of an `Encoder` has a kind, and the kinds say which tokens it sees:

    full     every token, self-attention
    cross    the kept tokens (the `keep` best by importance score) are the queries, every token gives
             keys and values; token dropping starts here, and the state here is saved
    kept     the kept tokens only
    narrow   the query tokens (query_index; every position without one) over keys and values from the
             state at the first narrow layer, which stays fixed (NarrowBERT). A last narrow layer
             after full ones runs the last layer at the predicted positions only
    ltd      random-LTD: a fresh random subset of `keep` tokens per row runs the layer attending only
             to each other; the other tokens bypass it unchanged

cross and kept act only when importance scores are given and ltd only in training mode; otherwise
they run as full layers. Dropped tokens are restored before the next layer that is not kept, and at
the end: the kept outputs are scattered into the state saved at the cross layer, so dropped tokens
carry that state.

Index layout. Selections of positions are [B, K] index tensors plus per-row counts: the first
counts[b] entries of row b are the selected positions in ascending order, and the rest are other
positions of the same row, so every row of the index holds distinct positions and shapes stay static.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from tokdrop.checks import check_int, check_number, check_probability
from tokdrop.config import ACTIVATIONS, BertConfig, check_keep, drop_schedule
from tokdrop.kernels import attention, attention_varlen, drop_tokens, restore_tokens
from tokdrop.kernels.validate import check_index, check_lengths, check_range

FULL, CROSS, KEPT, NARROW, LTD = "full", "cross", "kept", "narrow", "ltd"


class Packed(NamedTuple):
    """The sequences of a packed [T, H] tensor: sequence b is rows cu_seqlens[b]:cu_seqlens[b + 1],
    at most max_seqlen long (a static bound)."""

    cu_seqlens: Tensor  # [B + 1] int32, starting at 0
    max_seqlen: int


def unpad(hidden: Tensor, lengths: Tensor) -> tuple[Tensor, Packed, Tensor]:
    """The real rows of right-padded hidden [B, S, H] packed as [T, H], their `Packed` offsets, and
    the flat positions [T] they came from (for `pad`). T is read back from the device."""
    batch, seq_len = hidden.shape[:2]
    real = (torch.arange(seq_len, device=hidden.device) < lengths[:, None]).flatten()
    where = real.nonzero().squeeze(1)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return hidden.flatten(0, 1)[where], Packed(cu_seqlens, seq_len), where


def pad(packed: Tensor, where: Tensor, batch: int, seq_len: int) -> Tensor:
    """`unpad`'s inverse: [T, H] back to [B, S, H], exact zeros at the padding."""
    out = packed.new_zeros((batch * seq_len, packed.shape[-1]))
    return out.index_copy(0, where, packed).unflatten(0, (batch, seq_len))


LAYER_KINDS = (FULL, CROSS, KEPT, NARROW, LTD)

# A float keep fraction is turned into a count with ceil(keep * length); the slack absorbs binary
# rounding such as 0.3 * 10 = 3.0000000000000004.
_CEIL_SLACK = 1e-9


def _eager() -> bool:
    """Input checks that read tensor values run eagerly only; a compiled graph must not sync."""
    return not torch.compiler.is_compiling()


def pack_positions(mask: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Index [B, size] of the True positions of `mask` [B, S] (ascending, then the False ones) and
    their per-row counts [B]. Raises if a row has more than `size` True positions."""
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a [B, S] bool tensor, got {tuple(mask.shape)} {mask.dtype}")
    seq_len = mask.shape[1]
    if not 1 <= size <= seq_len:
        raise ValueError(f"size must be in [1, {seq_len}], got {size}")
    counts = mask.sum(dim=1)
    if _eager() and bool((counts > size).any()):
        row = int((counts > size).nonzero()[0, 0])
        raise ValueError(f"row {row} selects {int(counts[row])} positions, more than the {size} slots")
    return _packed_positions(mask, size), counts


def _packed_positions(mask: Tensor, size: int) -> Tensor:
    """pack_positions' index, for masks that select at most `size` positions per row."""
    seq_len = mask.shape[1]
    positions = torch.arange(seq_len, device=mask.device)
    # Unique keys: selected positions sort first, each group in position order.
    order_key = torch.where(mask, positions, positions + seq_len)
    return order_key.argsort(dim=1)[:, :size]


def kept_counts(lengths: Tensor, keep: float | int) -> Tensor:
    """Tokens kept per row: ceil(keep * length) for a fraction, min(keep, length) for a count."""
    if isinstance(keep, float):
        return torch.ceil(lengths.double() * keep - _CEIL_SLACK).to(lengths.dtype)
    return lengths.clamp(max=keep)


def max_kept(seq_len: int, keep: float | int) -> int:
    """Static upper bound of `kept_counts` for sequences of `seq_len` positions."""
    check_keep(keep)
    if isinstance(keep, int):
        if keep > seq_len:
            raise ValueError(f"keep={keep} tokens is more than the sequence length {seq_len}")
        return keep
    return math.ceil(seq_len * keep - _CEIL_SLACK)


def select_tokens(
    scores: Tensor, lengths: Tensor, keep: float | int, *, validate: bool = True
) -> tuple[Tensor, Tensor]:
    """Keep the highest-scoring real tokens of each row.

    scores [B, S] float (higher = more important; +inf always kept while the count allows),
    lengths [B] real tokens per row (right padding). Returns the index [B, K_max] in the layout of
    the module docstring and the kept counts [B]. Ties go to the earlier position; padding is never
    kept while real tokens remain. validate: check lengths and scores for NaN (device syncs).
    """
    if scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(f"scores must be a [B, S] float tensor, got {tuple(scores.shape)} {scores.dtype}")
    batch, seq_len = scores.shape
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
    size = max_kept(seq_len, keep)
    if validate:
        check_range("lengths", lengths, 0, seq_len)
        _check_scores(scores)
    positions = torch.arange(seq_len, device=scores.device)
    is_real = positions < lengths[:, None]
    ranked = torch.where(is_real, scores, float("-inf")).sort(dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(ranked).scatter_(1, ranked, positions.expand(batch, -1))
    counts = kept_counts(lengths, keep)
    return _packed_positions(rank < counts[:, None], size), counts


def _check_scores(scores: Tensor) -> None:
    if _eager() and bool(scores.isnan().any()):
        raise ValueError("scores contain NaN")


class TokenImportance(nn.Module):
    """Moving average of the MLM loss per vocabulary id (the token-dropping paper's importance).

    After each training step, for every id predicted in the batch:
    table[id] = beta * table[id] + (1 - beta) * mean loss of that id's predictions.
    Ignored labels (< 0) and non-finite losses are skipped; nothing updates in eval mode; the sums
    are all-reduced over the default process group so every data-parallel rank holds the same
    table. Allow-listed ids are pinned to +inf and the padding id to -inf after every update.

    mode "random" scores tokens uniformly at random instead, with the same pins.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        mode: str = "mlm_loss",
        beta: float = 0.995,
        init_value: float = 10.0,
        allow_ids: Sequence[int] = (),
        pad_id: int | None = 0,
    ) -> None:
        super().__init__()
        check_int("vocab_size", vocab_size, 1)
        if mode not in ("mlm_loss", "random"):
            raise ValueError(f"mode must be 'mlm_loss' or 'random', got {mode!r}")
        check_probability("beta", beta)
        check_number("init_value", init_value)
        for name, ids in (("allow_ids", list(allow_ids)), ("pad_id", [] if pad_id is None else [pad_id])):
            for token_id in ids:
                check_int(f"{name} entry" if name == "allow_ids" else name, token_id, 0, vocab_size - 1)
        self.mode, self.beta, self.pad_id = mode, beta, pad_id
        self.register_buffer("table", torch.full((vocab_size,), float(init_value)))
        self.register_buffer("allow_ids", torch.tensor(list(allow_ids), dtype=torch.long), persistent=False)
        self.pin()

    @torch.no_grad()
    def pin(self) -> None:
        self.table.index_fill_(0, self.allow_ids, float("inf"))
        if self.pad_id is not None:
            self.table[self.pad_id] = float("-inf")

    def scores(self, input_ids: Tensor, *, validate: bool = True) -> Tensor:
        """Importance [B, S] of each token. validate: check the ids against the table (a device
        sync; the models checked them already)."""
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if validate:
            check_range("token id", input_ids.flatten(), 0, self.table.shape[0] - 1)
        pinned = self.table[input_ids]
        if self.mode == "mlm_loss":
            return pinned
        noise = torch.rand(input_ids.shape, device=input_ids.device)
        return torch.where(pinned.isinf(), pinned, noise)

    @torch.no_grad()
    def update(self, labels: Tensor, losses: Tensor, *, validate: bool = True) -> None:
        """Fold per-prediction losses into the table; labels < 0 are ignored. validate: check the
        labels against the table (a device sync; the models checked them already)."""
        if not self.training or self.mode != "mlm_loss":
            return
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.shape != losses.shape:
            raise ValueError(f"labels {tuple(labels.shape)} and losses {tuple(losses.shape)} differ in shape")
        labels, losses = labels.reshape(-1), losses.reshape(-1).float()
        vocab_size = self.table.shape[0]
        valid = (labels >= 0) & torch.isfinite(losses)
        if validate and _eager() and bool((labels >= vocab_size).any()):
            raise ValueError(f"label id {int(labels.max())} is outside the vocabulary of {vocab_size}")
        ids = torch.where(valid, labels, 0)
        totals = torch.zeros(2, vocab_size, device=self.table.device)
        totals[0].index_add_(0, ids, torch.where(valid, losses, 0.0))
        totals[1].index_add_(0, ids, valid.float())
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
        sums, counts = totals
        mean = sums / counts.clamp(min=1.0)
        self.table.copy_(torch.where(counts > 0, self.beta * self.table + (1 - self.beta) * mean, self.table))
        self.pin()


class _QKV(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)


class _DenseResidualNorm(nn.Module):
    """LayerNorm(residual + dropout(dense(x))), Hugging Face's BertSelfOutput / BertOutput."""

    def __init__(self, d_in: int, d_out: int, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(x)))


class _Attention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = _QKV(config.hidden_size)
        self.output = _DenseResidualNorm(config.hidden_size, config.hidden_size, config)


class _Intermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    """A post-LayerNorm BERT layer following the layer protocol; parameter names match Hugging Face.

    Full: layer(h, lens). Kept-only: layer(kept, kept_lens). Cross: layer(kept, kept_lens, h, lens).
    The lengths are trusted, not checked (a device sync per layer): the encoders check theirs once
    per forward, and the kernels clamp lengths to the tensors, so bad ones never read past them.
    Attention runs on the backend of the model's forward pass (tokdrop.kernels.backends).
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.attn_dropout = config.attention_probs_dropout_prob
        self.attention = _Attention(config)
        self.intermediate = _Intermediate(config)
        self.output = _DenseResidualNorm(config.intermediate_size, config.hidden_size, config)

    def forward(
        self, x: Tensor, x_lens: Tensor | Packed, kv: Tensor | None = None, kv_lens: Tensor | Packed | None = None
    ) -> Tensor:
        if kv is None:
            kv, kv_lens = x, x_lens
        proj = self.attention.self
        heads = (self.num_heads, -1)
        q, k, v = (
            proj.query(x).unflatten(-1, heads),
            proj.key(kv).unflatten(-1, heads),
            proj.value(kv).unflatten(-1, heads),
        )
        dropout_p = self.attn_dropout if self.training else 0.0
        if isinstance(x_lens, Packed):
            context = attention_varlen(
                q, k, v, x_lens.cu_seqlens, kv_lens.cu_seqlens, x_lens.max_seqlen, kv_lens.max_seqlen,
                dropout_p=dropout_p, validate=False,
            )  # fmt: skip
        else:
            context = attention(q, k, v, x_lens, kv_lens, dropout_p=dropout_p, validate=False)
        x = self.attention.output(context.flatten(-2), x)
        return self.output(self.intermediate(x), x)


def token_drop_plan(num_layers: int, start_layer: int | None = None, end_layer: int | None = None) -> tuple[str, ...]:
    """Token dropping's plan: full layers, the cross layer at `start_layer`, kept layers up to
    `end_layer`, full layers after (None: the paper's L/2 - 1 and L - 1)."""
    start, end = drop_schedule(num_layers, start_layer, end_layer)
    return (FULL,) * start + (CROSS,) + (KEPT,) * (end - start - 1) + (FULL,) * (num_layers - end)


def narrow_plan(num_layers: int, full_layers: int = 2) -> tuple[str, ...]:
    """NarrowBERT's plan: `full_layers` full layers, then narrow ones."""
    if not 0 <= full_layers < num_layers:
        raise ValueError(f"full_layers must be in [0, {num_layers}), got {full_layers}")
    return (FULL,) * full_layers + (NARROW,) * (num_layers - full_layers)


def random_ltd_plan(num_layers: int, layers: Sequence[int] | None = None) -> tuple[str, ...]:
    """random-LTD's plan: `layers` (None: all but the first and the last) draw their own tokens."""
    chosen = set(range(1, num_layers - 1) if layers is None else layers)
    return tuple(LTD if i in chosen else FULL for i in range(num_layers))


def check_plan(plan: Sequence[str]) -> None:
    """Kinds are LAYER_KINDS; kept layers follow a cross layer; after a narrow layer only narrow ones."""
    for i, kind in enumerate(plan):
        if kind not in LAYER_KINDS:
            raise ValueError(f"layer {i} has kind {kind!r}; expected one of {LAYER_KINDS}")
        if kind == KEPT and (i == 0 or plan[i - 1] not in (CROSS, KEPT)):
            raise ValueError(f"layer {i} is 'kept' but does not follow a 'cross' or 'kept' layer: {tuple(plan)}")
        if i and plan[i - 1] == NARROW and kind != NARROW:
            raise ValueError(f"layer {i} is {kind!r} after a 'narrow' layer; only 'narrow' can follow: {tuple(plan)}")


class Encoder(nn.Module):
    """Run a stack of layers (the layer protocol) by a plan of one kind per layer (module docstring).

    forward(hidden [B, S, H], lengths [B], *, scores [B, S] or None, query_index [B, M] or None,
    query_lens [B] or None, inputs list or None) -> [B, S, H], or [B, M, H] at the query positions
    when query_index is given. `inputs`, when given, receives each layer's input x in turn (every
    token, the kept tokens or the queries). `keep` (a fraction of each row's real tokens, or a count)
    sets how many tokens the cross, kept and ltd layers see; it may change between calls. validate:
    check the lengths, queries and scores (device syncs); the models pass False, having checked
    their inputs and built the rest themselves.
    """

    def __init__(self, layers: Sequence[nn.Module], plan: Sequence[str], keep: float | int = 0.5) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)
        if len(plan) != len(self.layer):
            raise ValueError(f"the plan has {len(plan)} kinds for {len(self.layer)} layers")
        check_plan(plan)
        check_keep(keep)
        self.plan, self.keep = tuple(plan), keep

    def extra_repr(self) -> str:
        return f"plan={self.plan}, keep={self.keep}"

    def forward(
        self,
        hidden: Tensor,
        lengths: Tensor,
        *,
        scores: Tensor | None = None,
        query_index: Tensor | None = None,
        query_lens: Tensor | None = None,
        inputs: list[Tensor] | None = None,
        validate: bool = True,
    ) -> Tensor:
        if isinstance(lengths, Packed):
            return self._packed(hidden, lengths, scores, query_index, inputs)
        seq_len = hidden.shape[1]
        if (query_index is None) != (query_lens is None):
            raise ValueError("query_index and query_lens must be given together")
        if scores is not None and scores.shape != hidden.shape[:2]:
            raise ValueError(f"scores have shape {tuple(scores.shape)}, the hidden states {tuple(hidden.shape[:2])}")
        if validate:
            check_lengths(lengths, lengths, seq_len, seq_len)
            if query_index is not None:
                check_lengths(query_lens, lengths, query_index.shape[1], seq_len)
                check_index("query_index", query_index, seq_len, query_lens)
            if scores is not None:
                _check_scores(scores)

        record = (lambda x: x) if inputs is None else (lambda x: inputs.append(x) or x)
        saved = kept = index = kept_lens = None  # while tokens are dropped
        queries = context = None  # from the first narrow layer on
        for layer, kind in zip(self.layer, self.plan, strict=True):
            if kind == KEPT and kept is not None:
                kept = layer(record(kept), kept_lens)
                continue
            if kept is not None:
                hidden, kept = restore_tokens(saved, kept, index, kept_lens, validate=False), None
            if kind == CROSS and scores is not None:
                index, kept_lens = select_tokens(scores, lengths, self.keep, validate=False)
                saved = hidden
                kept = layer(record(drop_tokens(hidden, index, validate=False)), kept_lens, hidden, lengths)
            elif kind == LTD and self.training:
                index, kept_lens = select_tokens(
                    torch.rand(hidden.shape[:2], device=hidden.device), lengths, self._ltd_keep(seq_len), validate=False
                )
                subset = layer(record(drop_tokens(hidden, index, validate=False)), kept_lens)
                hidden = restore_tokens(hidden, subset, index, kept_lens, validate=False)
            elif kind == NARROW:
                if queries is None:
                    context = hidden
                    queries, query_lens = (
                        (hidden, lengths)
                        if query_index is None
                        else (drop_tokens(hidden, query_index, validate=False), query_lens)
                    )
                queries = layer(record(queries), query_lens, context, lengths)
            else:
                hidden = layer(record(hidden), lengths)
        if kept is not None:
            hidden = restore_tokens(saved, kept, index, kept_lens, validate=False)
        if queries is not None:
            return queries
        return hidden if query_index is None else drop_tokens(hidden, query_index, validate=False)

    def _packed(
        self, hidden: Tensor, lengths: Packed, scores: Tensor | None, query_index: Tensor | None, inputs: list | None
    ) -> Tensor:
        """Every layer on packed tokens [T, H]: full layers, and narrow ones over every token."""
        if scores is not None or query_index is not None or (self.training and LTD in self.plan):
            raise ValueError("the packed layout runs every token of every layer: no dropping, no query subset")
        context = None
        for layer, kind in zip(self.layer, self.plan, strict=True):
            if inputs is not None:
                inputs.append(hidden)
            if kind == NARROW:
                context = hidden if context is None else context
                hidden = layer(hidden, lengths, context, lengths)
            else:
                hidden = layer(hidden, lengths)
        return hidden

    def _ltd_keep(self, seq_len: int) -> float | int:
        """A kept count larger than this batch's rows keeps them whole."""
        return min(self.keep, seq_len) if isinstance(self.keep, int) else self.keep


class TokenDropEncoder(Encoder):
    """An `Encoder` with token dropping (the paper's schedule by default; see TokenDropConfig).

    forward(hidden [B, S, H], lengths [B], scores [B, S] or None) -> [B, S, H]. With scores None
    every layer runs on the full sequence.
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        keep: float | int = 0.5,
        start_layer: int | None = None,
        end_layer: int | None = None,
    ) -> None:
        super().__init__(layers, token_drop_plan(len(layers), start_layer, end_layer), keep)

    def forward(self, hidden: Tensor, lengths: Tensor, scores: Tensor | None = None, **queries: Tensor) -> Tensor:
        return super().forward(hidden, lengths, scores=scores, **queries)


class NarrowEncoder(Encoder):
    """An `Encoder` in NarrowBERT's plan: `full_layers` full layers give E [B, S, H]; every later
    layer updates only the query tokens, projecting its keys and values from the fixed E.

    forward(hidden, lengths, query_index [B, M] or None, query_lens [B] or None) -> [B, M, H] (or
    [B, S, H] with every position a query when query_index is None).
    """

    def __init__(self, layers: Sequence[nn.Module], full_layers: int = 2) -> None:
        super().__init__(layers, narrow_plan(len(layers), full_layers))

    def forward(
        self, hidden: Tensor, lengths: Tensor, query_index: Tensor | None = None, query_lens: Tensor | None = None
    ) -> Tensor:
        return super().forward(hidden, lengths, query_index=query_index, query_lens=query_lens)


__all__ = [
    "LAYER_KINDS",
    "Packed",
    "pad",
    "unpad",
    "BertLayer",
    "Encoder",
    "NarrowEncoder",
    "TokenDropEncoder",
    "TokenImportance",
    "check_plan",
    "drop_tokens",
    "kept_counts",
    "max_kept",
    "narrow_plan",
    "pack_positions",
    "random_ltd_plan",
    "restore_tokens",
    "select_tokens",
    "token_drop_plan",
]
