"""The training stream of a shard directory: rows packed from its tokens, visited in a seeded
pseudo-random order, masked, and split by data-parallel rank.

Nothing is held in memory: rows are sliced from the shards' memory maps when asked for, and the
shuffled order is a permutation computed per position (`feistel_permutation`), never a stored index.
So a batch depends only on its positions and the seed, which is what makes resuming exact.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Iterator
from itertools import accumulate

import numpy as np
import torch
from torch import Tensor

from tokdrop.data import MaskingCollator
from tokdrop.pretrain.shards import ShardSet

_FEISTEL_ROUNDS = 4


def derive_seed(*parts: object) -> int:
    """A 63-bit seed determined by `parts` (e.g. the run seed, a purpose and a position)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def feistel_permutation(index: int, size: int, key: object) -> int:
    """Position `index` of a pseudo-random permutation of range(size) chosen by `key`, in O(1) memory.

    A 4-round Feistel network is a bijection on [0, 4^h) for the smallest h with 4^h >= size; values
    that land outside range(size) are sent through it again (cycle walking), which stays inside the
    cycle of `index` and so ends in range(size), after fewer than 4 passes on average.
    """
    if not 0 <= index < size:
        raise ValueError(f"index must be in [0, {size}), got {index}")
    half = max(1, ((size - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    value = index
    while True:
        left, right = value >> half, value & mask
        for round_ in range(_FEISTEL_ROUNDS):
            left, right = right, left ^ (derive_seed(key, round_, right) & mask)
        value = (left << half) | right
        if value < size:
            return value


class PackedRows:
    """Rows ``[CLS] + seq_len - 2 consecutive tokens + [SEP]`` cut from each shard in order (as
    `tokdrop.data.pack_sequences` cuts its token stream); a shard's ragged tail is left out."""

    def __init__(self, shards: ShardSet, seq_len: int, cls_id: int, sep_id: int) -> None:
        if seq_len < 3:
            raise ValueError(f"seq_len must be >= 3 ([CLS], a token, [SEP]), got {seq_len}")
        self.shards, self.seq_len, self.cls_id, self.sep_id = shards, seq_len, cls_id, sep_id
        self.body = seq_len - 2
        self._ends = list(accumulate(count // self.body for count in shards.counts))
        if len(self) == 0:
            raise ValueError(
                f"{shards.directory} holds {shards.total_tokens} tokens, too few for one row of seq_len={seq_len}"
            )

    def __len__(self) -> int:
        return self._ends[-1]

    def __getitem__(self, row: int) -> Tensor:
        """Row `row` as a LongTensor [seq_len]."""
        shard = bisect_right(self._ends, row)
        start = (row - (self._ends[shard - 1] if shard else 0)) * self.body
        ids = np.empty(self.seq_len, dtype=np.int64)
        ids[0], ids[-1] = self.cls_id, self.sep_id
        ids[1:-1] = self.shards.tokens(shard)[start : start + self.body]
        return torch.from_numpy(ids)


class MaskedStream(torch.utils.data.Dataset):
    """Position q of an endless stream of masked rows, fixed by the seed alone.

    Epoch e = q // len(rows) visits every row once, in the order of a Feistel permutation keyed by
    (seed, e); row masking draws from a generator seeded by (seed, q). So a batch depends only on
    its positions: not on the number of ranks or workers, nor on where a run was resumed.
    """

    def __init__(self, rows: PackedRows, collator: MaskingCollator, seed: int) -> None:
        self.rows, self.collator, self.seed = rows, collator, seed

    def __getitem__(self, position: int) -> dict[str, Tensor]:
        epoch, index = divmod(position, len(self.rows))
        ids = self.rows[feistel_permutation(index, len(self.rows), (self.seed, epoch))]
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "mask", position))
        return {name: row[0] for name, row in self.collator(ids[None], generator=generator).items()}


def rank_batches(
    first_step: int, steps: int, micro_batch: int, accumulation: int, rank: int, world_size: int
) -> Iterator[list[int]]:
    """Stream positions of rank `rank`'s micro-batches for steps [first_step, steps).

    Step t consumes positions [t*G, (t+1)*G) with G = micro_batch * accumulation * world_size; its
    micro-batch m on rank r is the slice starting at t*G + (m*world_size + r)*micro_batch. With one
    micro-batch per step, the ranks' batches together are exactly a single process's batch of G.
    """
    global_batch = micro_batch * accumulation * world_size
    for step in range(first_step, steps):
        for micro in range(accumulation):
            start = step * global_batch + (micro * world_size + rank) * micro_batch
            yield list(range(start, start + micro_batch))


__all__ = ["MaskedStream", "PackedRows", "derive_seed", "feistel_permutation", "rank_batches"]
