"""Pretrain a small BERT on Python's own documentation three ways at equal steps: dense, token
dropping and NarrowBERT. Offline, a few minutes on a laptop CPU.

The three models start from the same weights and see the same batches in the same order; their
training steps run interleaved (dense, token_drop, narrow, dense, ...) so that machine noise hits
all three alike. Writes into --out: results.json, heldout_loss.png (held-out MLM loss against
training wall-clock time, evaluation excluded), table.txt and the tokenizer.json that was used.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from tokdrop.cli import add_model_arguments, add_subcommand, format_table, positive_int
from tokdrop.config import BertConfig, with_mode
from tokdrop.corpus import load_corpus
from tokdrop.data import (
    MaskingCollator,
    load_tokenizer,
    pack_sequences,
    special_token_ids,
    train_tokenizer,
)
from tokdrop.files import write_atomically
from tokdrop.flops import training_flops
from tokdrop.training import (
    build_model,
    config_from_arguments,
    evaluate,
    make_optimizer,
    train_step,
    warmup_linear_decay,
)

VARIANTS = ("dense", "token_drop", "narrow")

# Step times of the first steps include one-off allocation and kernel selection.
_UNTIMED_STEPS = 2


def add_command(subcommands: argparse._SubParsersAction) -> None:
    """Add the `demo` subcommand to the `tokdrop` command."""
    add_subcommand(
        subcommands,
        "demo",
        summary="pretrain a small BERT dense, with token dropping and as NarrowBERT; compare",
        description=__doc__,
        add_arguments=add_arguments,
        run=run,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=positive_int, default=120, help="training steps per model")
    parser.add_argument("--seq-len", type=positive_int, default=256, help="tokens per sequence")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, data order and masking")
    parser.add_argument(
        "--evals",
        type=positive_int,
        default=6,
        help="held-out evaluations, evenly spaced over the run, plus one before training",
    )
    parser.add_argument(
        "--eval-rows",
        type=positive_int,
        default=32,
        help="held-out sequences per evaluation",
    )
    parser.add_argument(
        "--vocab-size",
        type=positive_int,
        default=8192,
        help="WordPiece vocabulary size of the tokenizer trained on the corpus",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="use this tokenizer.json / vocab.txt (or a directory holding one) instead of training one",
    )
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory")
    # No dropout by default: the run sees each training sequence at most once, so there is nothing
    # to regularise, and dropout would only slow the loss down.
    add_model_arguments(parser, layers=6, hidden=128, heads=2, intermediate=512, dropout=0.0)


@dataclass(frozen=True)
class _DemoData:
    tokenizer: Tokenizer
    collator: MaskingCollator
    train_rows: torch.Tensor  # [N, seq_len] packed sequences
    eval_batches: list[dict[str, torch.Tensor]]  # masked once, the same for every evaluation
    configs: dict[str, BertConfig]  # keyed by VARIANTS
    num_predictions: int


@dataclass
class _Trainee:
    """One model variant under training and what it has recorded so far."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    progress: tqdm
    train_losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    curve: list[dict[str, float]] = field(default_factory=list)  # held-out loss against training time

    def record_held_out_loss(self, step: int, batches: list[dict[str, torch.Tensor]]) -> None:
        self.curve.append(
            {
                "step": step,
                "train_seconds": sum(self.step_seconds),
                "held_out_loss": evaluate(self.model, batches),
            }
        )


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    data = _prepare(args)
    trainees = _train(args, data)
    results = _summarise(args, trainees, data)
    table = _format_table(results["variants"])
    print(table)
    results["wall_seconds"] = time.perf_counter() - started
    write_atomically(args.out / "results.json", lambda p: Path(p).write_text(json.dumps(results, indent=2) + "\n"))
    write_atomically(args.out / "table.txt", lambda p: Path(p).write_text(table + "\n"))
    write_atomically(args.out / "heldout_loss.png", lambda p: _plot(results["variants"], p))
    write_atomically(args.out / "tokenizer.json", lambda p: data.tokenizer.save(str(p)))
    print(f"wrote results.json, table.txt, heldout_loss.png and tokenizer.json to {args.out}/")
    return 0


def _prepare(args: argparse.Namespace) -> _DemoData:
    """Corpus, tokenizer, packed rows, held-out batches and the three model configs."""
    corpus = load_corpus()
    if args.tokenizer is not None:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        tokenizer = train_tokenizer(corpus.train, args.vocab_size)
    specials = special_token_ids(tokenizer)
    collator = MaskingCollator.from_tokenizer(tokenizer, seed=args.seed)
    num_predictions = collator.num_predictions(args.seq_len)
    base = config_from_arguments(
        args,
        vocab_size=tokenizer.get_vocab_size(),
        seq_len=args.seq_len,
        max_predictions_per_seq=num_predictions,
        pad_token_id=specials.pad,
    )
    held_out_rows = pack_sequences(tokenizer, corpus.held_out, args.seq_len)[: args.eval_rows]
    held_out_masking = torch.Generator().manual_seed(args.seed + 1)
    return _DemoData(
        tokenizer=tokenizer,
        collator=collator,
        train_rows=pack_sequences(tokenizer, corpus.train, args.seq_len),
        eval_batches=[collator(rows, generator=held_out_masking) for rows in held_out_rows.split(args.batch_size)],
        configs={
            mode: with_mode(
                base,
                mode,
                keep=args.keep,
                full_layers=args.full_layers,
                allow_ids=(specials.cls, specials.sep, specials.mask, specials.unk),
            )
            for mode in VARIANTS
        },
        num_predictions=num_predictions,
    )


def _train(args: argparse.Namespace, data: _DemoData) -> list[_Trainee]:
    """Train the variants in lockstep on the same batches; evaluate before and at `--evals` points."""
    trainees = []
    for position, name in enumerate(VARIANTS):
        model = build_model(data.configs[name], args.seed)
        optimizer = make_optimizer(model, args.lr)
        scheduler = warmup_linear_decay(optimizer, args.steps, warmup_steps=max(1, args.steps // 10))
        progress = tqdm(total=args.steps, desc=f"{name:>10}", position=position, unit="step", dynamic_ncols=True)
        trainees.append(_Trainee(name, model, optimizer, scheduler, progress))
        trainees[-1].record_held_out_loss(0, data.eval_batches)

    eval_steps = {math.ceil(k * args.steps / args.evals) for k in range(1, args.evals + 1)}
    order = torch.Generator().manual_seed(args.seed)
    epoch: list[int] = []  # row indices still to visit, in this epoch's shuffled order
    for step in range(1, args.steps + 1):
        if len(epoch) < args.batch_size:
            epoch += torch.randperm(len(data.train_rows), generator=order).tolist()
        indices, epoch = epoch[: args.batch_size], epoch[args.batch_size :]
        batch = data.collator(data.train_rows[indices])
        for trainee in trainees:
            loss, seconds = train_step(trainee.model, trainee.optimizer, batch, trainee.scheduler)
            trainee.train_losses.append(loss)
            trainee.step_seconds.append(seconds)
            trainee.progress.set_postfix(loss=f"{loss:.3f}", train_s=f"{sum(trainee.step_seconds):.1f}")
            trainee.progress.update()
        if step in eval_steps:
            for trainee in trainees:
                trainee.record_held_out_loss(step, data.eval_batches)
    for trainee in trainees:
        trainee.progress.close()
    return trainees


def _summarise(args: argparse.Namespace, trainees: list[_Trainee], data: _DemoData) -> dict:
    tokens_per_step = args.batch_size * args.seq_len
    configs, num_predictions = data.configs, data.num_predictions
    dense_flops = training_flops(configs["dense"], args.seq_len, num_predictions)
    variants = {}
    for trainee in trainees:
        timed = trainee.step_seconds[_UNTIMED_STEPS:] or trainee.step_seconds
        step_s = statistics.median(timed)
        variants[trainee.name] = {
            "median_step_s": step_s,
            "tokens_per_s": tokens_per_step / step_s,
            "held_out_loss": trainee.curve[-1]["held_out_loss"],
            "train_seconds": sum(trainee.step_seconds),
            "flop_model_speedup": dense_flops / training_flops(configs[trainee.name], args.seq_len, num_predictions),
            "curve": trainee.curve,
            "train_losses": trainee.train_losses,
        }
    dense_step_s = variants["dense"]["median_step_s"]
    for summary in variants.values():
        summary["speedup_vs_dense"] = dense_step_s / summary["median_step_s"]
    return {
        "command": "tokdrop demo",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "arguments": {
            key: str(value) if isinstance(value, Path) else value
            for key, value in vars(args).items()
            if not callable(value)
        },
        "data": {
            "train_sequences": len(data.train_rows),
            "held_out_sequences": sum(len(batch["input_ids"]) for batch in data.eval_batches),
            "predictions_per_sequence": num_predictions,
        },
        "model": configs["dense"].to_dict(),
        "variants": variants,
    }


def _format_table(variants: dict[str, dict]) -> str:
    header = ("variant", "step (ms)", "tokens/s", "held-out loss", "speed-up", "FLOP model")
    rows = [
        (
            name,
            f"{v['median_step_s'] * 1e3:.0f}",
            f"{v['tokens_per_s']:.0f}",
            f"{v['held_out_loss']:.3f}",
            f"{v['speedup_vs_dense']:.2f}x",
            f"{v['flop_model_speedup']:.2f}x",
        )
        for name, v in variants.items()
    ]
    return format_table(header, rows)


def _plot(variants: dict[str, dict], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for name, v in variants.items():
        axes.plot(
            [p["train_seconds"] for p in v["curve"]],
            [p["held_out_loss"] for p in v["curve"]],
            marker="o",
            label=f"{name} ({v['speedup_vs_dense']:.2f}x faster steps)",
        )
    axes.set_xlabel("training wall-clock time (s, evaluation excluded)")
    axes.set_ylabel("held-out MLM loss")
    axes.set_title("tokdrop demo: equal steps, same data order and seed")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, format="png", dpi=120)
