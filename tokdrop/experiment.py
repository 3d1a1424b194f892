"""Pretraining comparisons, as the demo and perf/bench_quality.py run them: several variants of one
model start from the same weights, train on the same stream of masked batches with their steps
interleaved (so that machine noise hits them alike), and record held-out MLM loss and accuracy
against their own training time (evaluation excluded) and training FLOPs.

The text is the corpus of tokdrop.corpus: a tokenizer is trained on the training documents, the
training rows are packed from them, and the held-out rows from the held-out documents, masked once
with a fixed seed. The reference for every loss is the unigram loss: predicting each held-out
masked token by its frequency in the training rows, which is what a model that learnt nothing about
context can reach.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import Tensor

from tokdrop.config import BertConfig
from tokdrop.corpus import Corpus, load_corpus
from tokdrop.data import MaskingCollator, load_tokenizer, pack_sequences, train_tokenizer
from tokdrop.flops import training_flops
from tokdrop.model import IGNORE_INDEX, BertForMaskedLM
from tokdrop.training import build_model, evaluate, make_optimizer, train_step, warmup_linear_decay
from tokdrop.vocabulary import SpecialTokenIds, special_tokens


@dataclass(frozen=True)
class PretrainingData:
    tokenizer: Tokenizer
    collator: MaskingCollator
    specials: SpecialTokenIds
    train_rows: Tensor  # [N, seq_len] packed rows, no padding
    eval_batches: list[dict[str, Tensor]]  # held-out rows, masked once, the same for every evaluation
    num_predictions: int  # masked positions per row
    unigram_loss: float  # of the held-out predictions, from the training rows' token frequencies
    train_tokens: int  # text tokens in train_rows


def training_documents(corpus: Corpus, max_words: int | None) -> list[str]:
    """The training paragraphs, or those of whole training documents taken in a fixed pseudo-random
    order (by the CRC-32 of their names) until `max_words`: a slice that samples every source."""
    if max_words is None:
        return list(corpus.train)
    documents = sorted(corpus.train_documents, key=lambda d: zlib.crc32(d.name.encode()))
    paragraphs, words = [], 0
    for document in documents:
        if words >= max_words:
            break
        paragraphs += document.paragraphs
        words += sum(len(p.split()) for p in document.paragraphs)
    return paragraphs


def prepare_data(
    *,
    seq_len: int,
    vocab_size: int,
    eval_rows: int,
    batch_size: int,
    seed: int,
    max_train_words: int | None = None,
    tokenizer: str | Path | None = None,
) -> PretrainingData:
    """Corpus, tokenizer (trained on the training text unless given), packed training rows and
    masked held-out batches, and the unigram loss of those batches."""
    corpus = load_corpus()
    texts = training_documents(corpus, max_train_words)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else train_tokenizer(texts, vocab_size)
    specials = special_tokens(tok)
    collator = MaskingCollator.from_tokenizer(tok, seed=seed)
    train_rows = pack_sequences(tok, texts, seq_len)
    held_out_rows = pack_sequences(tok, corpus.held_out, seq_len)[:eval_rows]
    held_out_masking = torch.Generator().manual_seed(seed + 1)
    eval_batches = [collator(rows, generator=held_out_masking) for rows in held_out_rows.split(batch_size)]
    return PretrainingData(
        tokenizer=tok,
        collator=collator,
        specials=specials,
        train_rows=train_rows,
        eval_batches=eval_batches,
        num_predictions=collator.num_predictions(seq_len),
        unigram_loss=unigram_loss(train_rows, eval_batches, tok.get_vocab_size()),
        train_tokens=train_rows.numel() - 2 * len(train_rows),
    )


def unigram_loss(train_rows: Tensor, batches: Sequence[dict[str, Tensor]], vocab_size: int) -> float:
    """Mean cross-entropy of the batches' predicted tokens under the training rows' token
    frequencies (add-one smoothing, so that unseen tokens cost a finite loss)."""
    counts = torch.bincount(train_rows.flatten(), minlength=vocab_size).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    labels = torch.cat([b["labels"][b["labels"] != IGNORE_INDEX] for b in batches])
    return float(-log_probs[labels].mean())


def batch_indices(num_rows: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Row indices of consecutive batches: epoch after epoch, each a fresh permutation of the rows,
    so that a row is seen once per epoch."""
    order = torch.Generator().manual_seed(seed)
    pending: list[int] = []
    while True:
        if len(pending) < batch_size:
            pending += torch.randperm(num_rows, generator=order).tolist()
        batch, pending = pending[:batch_size], pending[batch_size:]
        yield batch


@dataclass
class Trainee:
    """One variant under training and what it has recorded."""

    name: str
    config: BertConfig
    model: BertForMaskedLM
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    flops_per_step: float
    steps: int = 0
    train_seconds: float = 0.0
    train_losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    curve: list[dict[str, float]] = field(default_factory=list)

    @property
    def train_flops(self) -> float:
        return self.steps * self.flops_per_step

    def follow_time_schedule(self, budget_seconds: float, base_lr: float) -> None:
        """BERT's warm-up and linear decay over a training-time budget instead of a step count:
        each variant gets the whole schedule within its own budget, whatever its speed."""
        progress = min(self.train_seconds / budget_seconds, 1.0)
        factor = progress / 0.1 if progress < 0.1 else (1.0 - progress) / 0.9
        for group in self.optimizer.param_groups:
            group["lr"] = base_lr * max(factor, 1e-3)

    def step(self, batch: dict[str, Tensor]) -> None:
        drop = self.config.token_drop
        forward = {"consistency": True} if drop is not None and drop.consistency_due(self.steps) else {}
        loss, seconds = train_step(self.model, self.optimizer, batch, self.scheduler, **forward)
        self.steps += 1
        self.train_seconds += seconds
        self.train_losses.append(loss)
        self.step_seconds.append(seconds)

    def record(self, batches: Sequence[dict[str, Tensor]]) -> dict[str, float]:
        result = evaluate(self.model, batches)
        point = {
            "step": self.steps,
            "train_seconds": self.train_seconds,
            "train_flops": self.train_flops,
            "held_out_loss": result.loss,
            "held_out_accuracy": result.accuracy,
        }
        self.curve.append(point)
        return point


def make_trainees(
    configs: dict[str, BertConfig],
    *,
    seq_len: int,
    batch_size: int,
    lr: float,
    seed: int,
    total_steps: int | None,
    device: torch.device | str = "cpu",
) -> list[Trainee]:
    """A trainee per config, each from the same initial weights (where the configs share their
    parameters), with BERT's AdamW and, given `total_steps`, its warm-up (a tenth) and linear decay
    (without, the caller schedules the rate, e.g. Trainee.follow_time_schedule)."""
    trainees = []
    for name, config in configs.items():
        model = build_model(config, seed, device)
        optimizer = make_optimizer(model, lr)
        scheduler = None
        if total_steps is not None:
            scheduler = warmup_linear_decay(optimizer, total_steps, warmup_steps=max(1, total_steps // 10))
        predictions = config.max_predictions_per_seq
        flops = batch_size * training_flops(config, seq_len, predictions)
        drop = config.token_drop
        if drop is not None and drop.consistency_every:  # a consistency step also runs the full pass
            full = training_flops(dataclasses.replace(config, token_drop=None), seq_len, predictions)
            flops += batch_size * full / drop.consistency_every
        trainees.append(Trainee(name, config, model, optimizer, scheduler, flops))
    return trainees


def run_interleaved(
    trainees: Sequence[Trainee],
    data: PretrainingData,
    *,
    batch_size: int,
    seed: int,
    done: Callable[[Trainee], bool],
    evaluate_now: Callable[[Trainee], bool],
    after_step: Callable[[Trainee], None] = lambda trainee: None,
) -> None:
    """Train the trainees one step each in turn on the same batch, until each is `done`; every
    trainee is evaluated before its first step, whenever `evaluate_now` says, and after its last."""
    for trainee in trainees:
        trainee.record(data.eval_batches)
    indices = batch_indices(len(data.train_rows), batch_size, seed)
    device = next(trainees[0].model.parameters()).device
    while not all(done(t) for t in trainees):
        rows = data.train_rows[next(indices)]
        batch = {name: t.to(device) for name, t in data.collator(rows).items()}
        for trainee in trainees:
            if done(trainee):
                continue
            trainee.step(batch)
            if done(trainee) or evaluate_now(trainee):
                trainee.record(data.eval_batches)
            after_step(trainee)


def time_to_reach(curve: Sequence[dict[str, float]], target: float, axis: str = "train_seconds") -> float | None:
    """The `axis` value (training seconds or FLOPs) at which a held-out loss curve first reaches
    `target`, interpolated linearly between the evaluations around it; None if it never does."""
    for before, after in zip(curve, curve[1:], strict=False):
        if after["held_out_loss"] <= target:
            if before["held_out_loss"] <= target:
                return before[axis]
            share = (before["held_out_loss"] - target) / (before["held_out_loss"] - after["held_out_loss"])
            return before[axis] + share * (after[axis] - before[axis])
    if curve and curve[0]["held_out_loss"] <= target:
        return curve[0][axis]
    return None


def loss_at(curve: Sequence[dict[str, float]], value: float, axis: str) -> float:
    """The held-out loss of a curve at `axis` = value, interpolated linearly; past its end, the last."""
    for before, after in zip(curve, curve[1:], strict=False):
        if after[axis] >= value:
            span = after[axis] - before[axis]
            share = 0.0 if span == 0 else (value - before[axis]) / span
            return before["held_out_loss"] + share * (after["held_out_loss"] - before["held_out_loss"])
    return curve[-1]["held_out_loss"]
