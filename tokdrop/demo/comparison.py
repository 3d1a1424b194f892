"""The demo's run: prepare the data, train the three variants interleaved, then write the table,
the plot, results.json and the models (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from tokdrop.cli import format_table
from tokdrop.config import with_mode
from tokdrop.demo import VARIANTS
from tokdrop.experiment import Trainee, make_trainees, prepare_data, run_interleaved, time_to_reach
from tokdrop.files import write_atomically
from tokdrop.training import config_from_arguments

# The first steps' times include one-off allocation and kernel selection.
_UNTIMED_STEPS = 2


def run_demo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    bar = tqdm(total=args.steps * len(VARIANTS), desc="preparing the data", unit="step", dynamic_ncols=True)
    data = prepare_data(
        seq_len=args.seq_len,
        vocab_size=args.vocab_size,
        eval_rows=args.eval_rows,
        batch_size=args.batch_size,
        seed=args.seed,
        max_train_words=args.train_words,
        tokenizer=args.tokenizer,
    )
    views = math.ceil(args.steps * args.batch_size / len(data.train_rows))
    if views > 2:
        tqdm.write(
            f"note: {args.steps} steps of {args.batch_size} see each of the {len(data.train_rows)} training "
            f"sequences up to {views} times; raise --train-words for fresh text"
        )
    base = config_from_arguments(
        args,
        vocab_size=data.tokenizer.get_vocab_size(),
        seq_len=args.seq_len,
        max_predictions_per_seq=data.num_predictions,
        pad_token_id=data.specials.pad,
    )
    allow_ids = data.specials.always_kept()
    configs = {
        mode: with_mode(base, mode, keep=args.keep, full_layers=args.full_layers, allow_ids=allow_ids)
        for mode in VARIANTS
    }
    trainees = make_trainees(
        configs, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, seed=args.seed, total_steps=args.steps
    )
    eval_steps = {math.ceil(k * args.steps / args.evals) for k in range(1, args.evals + 1)}
    bar.set_description("training dense, token_drop, narrow")

    def advance(trainee: Trainee) -> None:
        bar.update()
        bar.set_postfix({t.name: f"{t.curve[-1]['held_out_loss']:.2f}" for t in trainees}, refresh=False)

    run_interleaved(
        trainees,
        data,
        batch_size=args.batch_size,
        seed=args.seed,
        done=lambda trainee: trainee.steps >= args.steps,
        evaluate_now=lambda trainee: trainee.steps in eval_steps,
        after_step=advance,
    )
    bar.close()

    args.out.mkdir(parents=True, exist_ok=True)
    results = _summarise(args, trainees, data, views)
    for trainee in trainees:
        directory = args.out / "models" / trainee.name
        trainee.model.save_pretrained(directory)
        write_atomically(directory / "tokenizer.json", lambda p: data.tokenizer.save(str(p)))
        results["variants"][trainee.name]["model_dir"] = str(directory)
    table = _table(results)
    print(table)
    results["wall_seconds"] = time.perf_counter() - started
    write_atomically(args.out / "results.json", lambda p: Path(p).write_text(json.dumps(results, indent=2) + "\n"))
    write_atomically(args.out / "table.txt", lambda p: Path(p).write_text(table + "\n"))
    write_atomically(args.out / "heldout_loss.png", lambda p: _plot(results, p))
    write_atomically(args.out / "tokenizer.json", lambda p: data.tokenizer.save(str(p)))
    print(f"wrote results.json, table.txt, heldout_loss.png, tokenizer.json and models/ to {args.out}/")
    return 0


def _summarise(args: argparse.Namespace, trainees: list[Trainee], data, views: int) -> dict:
    tokens_per_step = args.batch_size * args.seq_len
    dense = next(t for t in trainees if t.name == "dense")
    dense_loss = dense.curve[-1]["held_out_loss"]
    dense_time = time_to_reach(dense.curve, dense_loss)
    variants = {}
    for trainee in trainees:
        step_s = statistics.median(trainee.step_seconds[_UNTIMED_STEPS:] or trainee.step_seconds)
        reached = time_to_reach(trainee.curve, dense_loss)
        variants[trainee.name] = {
            "median_step_s": step_s,
            "tokens_per_s": tokens_per_step / step_s,
            "held_out_loss": trainee.curve[-1]["held_out_loss"],
            "held_out_accuracy": trainee.curve[-1]["held_out_accuracy"],
            "train_seconds": trainee.train_seconds,
            "train_flops": trainee.train_flops,
            "time_to_dense_loss_s": reached,
            "time_to_dense_loss_vs_dense": None if reached is None else reached / dense_time,
            "flop_model_speedup": dense.flops_per_step / trainee.flops_per_step,
            "curve": trainee.curve,
            "train_losses": trainee.train_losses,
        }
    for summary in variants.values():
        summary["speedup_vs_dense"] = summary["tokens_per_s"] / variants["dense"]["tokens_per_s"]
    return {
        "command": "tokdrop demo",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if not callable(v)},
        "data": {
            "train_sequences": len(data.train_rows),
            "train_tokens": data.train_tokens,
            "held_out_sequences": sum(len(batch["input_ids"]) for batch in data.eval_batches),
            "predictions_per_sequence": data.num_predictions,
            "max_views_per_training_sequence": views,
        },
        "unigram_loss": data.unigram_loss,
        "model": trainees[0].config.to_dict(),
        "variants": variants,
    }


def _table(results: dict) -> str:
    header = (
        "variant",
        "step (ms)",
        "tokens/s",
        "held-out loss",
        "accuracy",
        "tokens/s vs dense",
        "time to dense's loss",
        "FLOP model",
    )
    rows = []
    for name, v in results["variants"].items():
        reached = v["time_to_dense_loss_s"]
        to_dense = "not reached" if reached is None else f"{reached:.0f} s ({v['time_to_dense_loss_vs_dense']:.2f}x)"
        rows.append(
            (
                name,
                f"{v['median_step_s'] * 1e3:.0f}",
                f"{v['tokens_per_s']:.0f}",
                f"{v['held_out_loss']:.3f}",
                f"{v['held_out_accuracy']:.3f}",
                f"{v['speedup_vs_dense']:.2f}x",
                to_dense,
                f"{v['flop_model_speedup']:.2f}x",
            )
        )
    rows.append(("unigram (no context)", "", "", f"{results['unigram_loss']:.3f}", "", "", "", ""))
    return format_table(header, rows)


def _plot(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    figure = Figure(figsize=(7.5, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for name, v in results["variants"].items():
        axes.plot(
            [p["train_seconds"] for p in v["curve"]],
            [p["held_out_loss"] for p in v["curve"]],
            marker="o",
            label=f"{name} ({v['tokens_per_s']:.0f} tokens/s)",
        )
    axes.axhline(results["unigram_loss"], color="grey", linestyle="--", label="unigram (no context)")
    axes.set_xlabel("training time (s, evaluation excluded)")
    axes.set_ylabel("held-out MLM loss (nats)")
    axes.set_title("tokdrop demo: same weights, same batches, interleaved steps")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, format="png", dpi=120)
