"""Pieces shared by the demo and the step benchmark: the model variants built from one base config,
a timed training step, held-out evaluation, and the FLOP model of a training step."""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from tokdrop.config import BertConfig, NarrowConfig, TokenDropConfig, drop_schedule
from tokdrop.layers import max_kept
from tokdrop.model import IGNORE_INDEX, BertForMaskedLM

VARIANTS = ("dense", "token_drop", "narrow")

# Backward-pass cost relative to the forward pass (DESIGN.md, performance method): a matmul's
# backward computes two products of the forward's size; attention's recomputes part of the forward.
_LINEAR_BACKWARD = 2.0
_ATTENTION_BACKWARD = 2.5


class StepResult(NamedTuple):
    loss: float
    seconds: float


def variant_configs(
    base: BertConfig, *, keep: float | int = 0.5, full_layers: int = 2, allow_ids: Iterable[int] = ()
) -> dict[str, BertConfig]:
    """The dense, token-dropping and NarrowBERT configs of one base config, keyed by `VARIANTS`.

    ``allow_ids`` are the ids token dropping always keeps ([CLS], [SEP], [MASK], [UNK]).
    """
    dense = dataclasses.replace(base, token_drop=None, narrow=None)
    return {
        "dense": dense,
        "token_drop": dataclasses.replace(dense, token_drop=TokenDropConfig(keep=keep, allow_ids=tuple(allow_ids))),
        "narrow": dataclasses.replace(dense, narrow=NarrowConfig(full_layers=full_layers)),
    }


def build_model(config: BertConfig, seed: int, device: torch.device | str = "cpu") -> BertForMaskedLM:
    """A freshly initialised model in training mode; the same seed gives the same initial weights."""
    torch.manual_seed(seed)
    return BertForMaskedLM(config).to(device).train()


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW with BERT's grouping: no weight decay on biases and LayerNorm weights (the 1-D tensors)."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=lr,
    )


def warmup_linear_decay(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """BERT's schedule: linear warm-up to the base rate over `warmup_steps`, then linear decay to 0."""
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / (total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Mapping[str, Tensor],
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> StepResult:
    """One timed training step: forward, backward, optimizer (and scheduler) step.

    ``batch`` holds the model's keyword inputs, on the model's device, with ``labels``. The time
    covers exactly the step, with the device synchronised at both ends.
    """
    device = batch["input_ids"].device
    _synchronize(device)
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    loss_value = loss.item()  # waits for the device, like _synchronize
    seconds = time.perf_counter() - start
    return StepResult(loss_value, seconds)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[Mapping[str, Tensor]]) -> float:
    """Mean masked-LM loss per prediction over ``batches``, in eval mode (the full encoder runs)."""
    was_training = model.training
    model.eval()
    try:
        total_loss, total_predictions = 0.0, 0
        for batch in batches:
            predictions = int((batch["labels"] != IGNORE_INDEX).sum())
            total_loss += model(**batch).loss.item() * predictions
            total_predictions += predictions
    finally:
        model.train(was_training)
    if total_predictions == 0:
        raise ValueError("the evaluation batches hold no predicted positions")
    return total_loss / total_predictions


# ----------------------------------------------------------------------------------------- FLOP model


def _layer_flops(config: BertConfig, n_queries: int, n_keys: int) -> float:
    """Training FLOPs of one encoder layer: `n_queries` tokens go through the query and output
    projections, attention and the FFN; keys and values are projected from `n_keys` tokens."""
    hidden, inner = config.hidden_size, config.intermediate_size
    linear = 2 * (2 * n_queries * hidden * hidden + 2 * n_keys * hidden * hidden + 2 * n_queries * hidden * inner)
    attention = 4 * hidden * n_queries * n_keys
    return (1 + _LINEAR_BACKWARD) * linear + (1 + _ATTENTION_BACKWARD) * attention


def training_flops(
    config: BertConfig, seq_len: int, num_predictions: int, *, decode_every_position: bool = False
) -> float:
    """FLOPs of one training step per sequence of `seq_len` real tokens with `num_predictions`
    masked positions, following the mode of `config` (dense, token dropping or NarrowBERT).

    The MLM head (transform + vocabulary projection) runs on the predicted positions, or on every
    position with `decode_every_position` (as Hugging Face's BertForMaskedLM does). Embedding
    look-ups, LayerNorms and softmax are left out: they are small next to the matmuls.
    """
    n_layers = config.num_hidden_layers
    full = _layer_flops(config, seq_len, seq_len)
    if config.token_drop is not None:
        start, end = drop_schedule(n_layers, config.token_drop.start_layer, config.token_drop.end_layer)
        kept = max_kept(seq_len, config.token_drop.keep)
        encoder = (
            (start + n_layers - end) * full
            + _layer_flops(config, kept, seq_len)  # the cross layer
            + (end - start - 1) * _layer_flops(config, kept, kept)
        )
    elif config.narrow is not None:
        n_full = config.narrow.full_layers
        encoder = n_full * full + (n_layers - n_full) * _layer_flops(config, num_predictions, seq_len)
    else:
        encoder = n_layers * full
    decoded = seq_len if decode_every_position else num_predictions
    hidden = config.hidden_size
    head = (1 + _LINEAR_BACKWARD) * 2 * decoded * (hidden * hidden + hidden * config.vocab_size)
    return encoder + head


# ------------------------------------------------------------------------------ command-line plumbing


def format_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned, a rule under the header."""
    lines = [tuple(header), *(tuple(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def render(line: Sequence[str]) -> str:
        cells = [line[0].ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)
        ]
        return "  ".join(cells)

    rendered = [render(line) for line in lines]
    return "\n".join([rendered[0], "-" * len(rendered[0]), *rendered[1:]])


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the line breaks of a module docstring used as description; shows each flag's default."""


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def add_model_arguments(
    parser: argparse.ArgumentParser,
    *,
    layers: int,
    hidden: int,
    heads: int,
    intermediate: int,
    dropout: float = 0.1,
) -> None:
    """Flags for the base model and the two cheap modes, with the given defaults."""
    group = parser.add_argument_group("model")
    group.add_argument("--layers", type=positive_int, default=layers, help="encoder layers")
    group.add_argument("--hidden", type=positive_int, default=hidden, help="hidden size")
    group.add_argument("--heads", type=positive_int, default=heads, help="attention heads")
    group.add_argument(
        "--intermediate",
        type=positive_int,
        default=intermediate,
        help="feed-forward inner size",
    )
    group.add_argument(
        "--dropout",
        type=float,
        default=dropout,
        help="hidden and attention-probability dropout",
    )
    group.add_argument(
        "--keep",
        type=float,
        default=0.5,
        help="token dropping: fraction of each sequence kept in the middle layers",
    )
    group.add_argument(
        "--full-layers",
        type=int,
        default=2,
        help="NarrowBERT: full layers before the narrow ones",
    )


def config_from_arguments(
    args: argparse.Namespace,
    *,
    vocab_size: int,
    seq_len: int,
    max_predictions_per_seq: int,
    pad_token_id: int = 0,
) -> BertConfig:
    """The dense base config of the flags added by `add_model_arguments`."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=seq_len,
        pad_token_id=pad_token_id,
        hidden_dropout_prob=args.dropout,
        attention_probs_dropout_prob=args.dropout,
        max_predictions_per_seq=max_predictions_per_seq,
    )
