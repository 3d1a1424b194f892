"""Run under torchrun by tests/test_pretrain.py: each rank seeds torch as `tokdrop pretrain` does
(tokdrop.pretrain.trainer.rank_seed), trains a DDP-wrapped random-LTD BertModel for two steps on
rows of its own, and rank 0 writes to argv[1] whether the ranks drew the same subsets.

    torchrun --nproc-per-node 2 tests/ltd_ranks.py OUT.json [--ltd-same-across-ranks]
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import tokdrop
import tokdrop.layers
from tokdrop.pretrain import distributed
from tokdrop.pretrain.settings import Settings
from tokdrop.pretrain.trainer import rank_seed


def main(out: str, same: bool) -> None:
    rank, world_size, _ = distributed.init_distributed(timeout=60)
    drawn = []
    select = tokdrop.layers.select_tokens

    def recording(*args, **kwargs):
        index, counts = select(*args, **kwargs)
        drawn.append(index.tolist())
        return index, counts

    tokdrop.layers.select_tokens = recording
    config = tokdrop.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=24, random_ltd=tokdrop.RandomLTDConfig(keep=0.5),
    )  # fmt: skip
    torch.manual_seed(0)  # the same weights on every rank
    model = DistributedDataParallel(tokdrop.BertModel(config).train())
    torch.manual_seed(rank_seed(Settings(mode="random_ltd", ltd_same_across_ranks=same), rank))
    rows = torch.Generator().manual_seed(rank)
    for _ in range(2):
        ids = torch.randint(5, 50, (3, 24), generator=rows)
        hidden, pooled = model(ids, torch.ones_like(ids))
        (hidden.sum() + pooled.sum()).backward()
    everyone = [None] * world_size
    dist.all_gather_object(everyone, drawn)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"layers_drawn": len(drawn), "same": all(d == everyone[0] for d in everyone)}, f)
    del model  # DDP's reducer must go before its process group: its destructor can hang after it
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], "--ltd-same-across-ranks" in sys.argv[2:])
