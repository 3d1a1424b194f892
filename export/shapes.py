"""Shapes of an export: the ranges of its dynamic axes, the tracing inputs, and the padded batches
it is validated on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tokdrop.config import BertConfig
from tokdrop.export.errors import ExportError
from tokdrop.export.signature import BATCH_DIM, INPUT_NAMES, SEQ_DIM


def check_ranges(config: BertConfig, max_batch: int, max_seq_len: int | None) -> tuple[int, int]:
    """Validated (max_batch, max_seq_len); max_seq_len None means the longest sequence the position
    embeddings cover (max_position_embeddings, less RoBERTa's offset)."""
    if max_seq_len is None:
        max_seq_len = config.max_sequence_length
    for name, value in (("max_batch", max_batch), ("max_seq_len", max_seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ExportError(f"{name} must be an int >= 1, got {value!r}")
    if max_seq_len > config.max_sequence_length:
        raise ExportError(
            f"max_seq_len={max_seq_len} is above the {config.max_sequence_length} positions of the model's "
            f"max_position_embeddings={config.max_position_embeddings}: positions past them have no embedding"
        )
    return max_batch, max_seq_len


def make_inputs(
    config: BertConfig, lengths: Sequence[int], seq_len: int | None = None, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Random right-padded (input_ids, attention_mask, token_type_ids) with the given real lengths
    (a length of 0 is a fully padded row); token types 0 then 1 for the second half of each row."""
    seq_len = max(max(lengths), 1) if seq_len is None else seq_len
    g = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    low = min(5, config.vocab_size - 1)
    ids = torch.randint(low, config.vocab_size, (batch, seq_len), generator=g)
    lens = torch.tensor(list(lengths))
    mask = (torch.arange(seq_len) < lens[:, None]).long()
    ids = torch.where(mask.bool(), ids, config.pad_token_id)
    types = ((torch.arange(seq_len) >= (lens[:, None] + 1) // 2) & mask.bool()).long()
    if config.type_vocab_size < 2:
        types.zero_()
    return ids, mask, types


def dynamic_shapes(max_batch: int, max_seq_len: int) -> dict[str, dict[int, Any]]:
    """One batch Dim and one sequence Dim shared by the three inputs (static where the range is a
    single value, which torch.export cannot mark dynamic)."""
    from torch.export import Dim

    batch = Dim(BATCH_DIM, min=1, max=max_batch) if max_batch > 1 else None
    seq = Dim(SEQ_DIM, min=1, max=max_seq_len) if max_seq_len > 1 else None
    axes = {k: v for k, v in ((0, batch), (1, seq)) if v is not None}
    return {name: dict(axes) for name in INPUT_NAMES}


def example_inputs(config: BertConfig, max_batch: int, max_seq_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """Tracing inputs: sizes >= 2 where dynamic (0/1 would be specialised), padding in the last row."""
    batch = min(2, max_batch)
    seq = min(8, max_seq_len)
    lengths = [seq] * batch
    if batch > 1:
        lengths[-1] = max(1, seq // 2)
    return make_inputs(config, lengths, seq)


def validation_shapes(max_batch: int, max_seq_len: int) -> list[list[int]]:
    """Per-row real lengths of the validation batches: small, odd and the maximum, with padding."""
    shapes = [[min(7, max_seq_len)]]
    b, s = min(3, max_batch), min(37, max_seq_len)
    shapes.append([s, max(1, s // 3), max(1, s - 5)][:b])
    b, s = max_batch, max_seq_len
    g = torch.Generator().manual_seed(1)
    rows = [s] + torch.randint(1, s + 1, (b - 1,), generator=g).tolist()
    shapes.append(rows)
    unique = []
    for lengths in shapes:
        if lengths not in unique:
            unique.append(lengths)
    return unique
