"""The training step shared by the demo, the benchmarks and fine-tuning: model construction, BERT's
optimizer and learning-rate schedule, a timed step and held-out evaluation."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from tokdrop.config import BertConfig
from tokdrop.model import IGNORE_INDEX, BertForMaskedLM, MaskedLM, RobertaForMaskedLM

# The masked-LM class of each config family, by the config's model_type.
_MASKED_LM_CLASSES: dict[str, type[MaskedLM]] = {
    cls.config_class.model_type: cls for cls in (BertForMaskedLM, RobertaForMaskedLM)
}


def config_from_arguments(
    args: Any,
    *,
    vocab_size: int,
    seq_len: int,
    max_predictions_per_seq: int,
    pad_token_id: int = 0,
    config_class: type[BertConfig] = BertConfig,
) -> BertConfig:
    """The dense base config of the flags added by `add_model_arguments`, of `config_class`
    (BertConfig, or RobertaConfig with its own defaults for the fields the flags leave out), with
    position embeddings for `seq_len` tokens (RoBERTa's: `seq_len` after its position offset)."""
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.intermediate,
        pad_token_id=pad_token_id,
        hidden_dropout_prob=args.dropout,
        attention_probs_dropout_prob=args.dropout,
        max_predictions_per_seq=max_predictions_per_seq,
    )
    offset = config_class(**fields).position_offset  # RoBERTa's positions start after the padding id
    return config_class(**fields, max_position_embeddings=seq_len + offset)


class StepResult(NamedTuple):
    loss: float
    seconds: float


def build_model(config: BertConfig, seed: int, device: torch.device | str = "cpu") -> MaskedLM:
    """A freshly initialised masked-LM model of the config's family (BertForMaskedLM, or
    RobertaForMaskedLM for a RobertaConfig) in training mode; the same seed gives the same initial
    weights."""
    torch.manual_seed(seed)
    return _MASKED_LM_CLASSES[config.model_type](config).to(device).train()


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
        # One pass over each tensor instead of one per operation: the step runs about 5x faster on a
        # CPU (MiniLM-L6: 13 ms instead of 72), where torch's default is that per-operation loop.
        fused=all(p.device.type in ("cpu", "cuda") for p in params),
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
    **forward: Any,
) -> StepResult:
    """One timed training step: forward, backward, optimizer (and scheduler) step.

    ``batch`` holds the model's keyword inputs, on the model's device, with ``labels``; `forward`
    are further keywords of the model (e.g. consistency=True). The time covers exactly the step,
    with the device synchronised at both ends.
    """
    device = batch["input_ids"].device
    _synchronize(device)
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch, **forward).loss
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    loss_value = loss.item()  # waits for the device, like _synchronize
    seconds = time.perf_counter() - start
    return StepResult(loss_value, seconds)


class EvalResult(NamedTuple):
    loss: float  # mean masked-LM loss per prediction
    accuracy: float  # fraction of predictions whose most likely token is the label


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[Mapping[str, Tensor]]) -> EvalResult:
    """Masked-LM loss and accuracy over the predictions of ``batches``, in eval mode (the full
    encoder runs)."""
    was_training = model.training
    model.eval()
    try:
        total_loss, correct, total_predictions = 0.0, 0, 0
        for batch in batches:
            out = model(**batch)
            slots = torch.arange(out.positions.shape[1], device=out.positions.device) < out.counts[:, None]
            targets = torch.where(slots, batch["labels"].gather(1, out.positions), IGNORE_INDEX)
            predicted = targets != IGNORE_INDEX
            predictions = int(predicted.sum())
            total_loss += out.loss.item() * predictions
            correct += int((out.logits.argmax(-1) == targets)[predicted].sum())
            total_predictions += predictions
    finally:
        model.train(was_training)
    if total_predictions == 0:
        raise ValueError("the evaluation batches hold no predicted positions")
    return EvalResult(total_loss / total_predictions, correct / total_predictions)
