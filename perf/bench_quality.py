"""The claim as a benchmark: do token dropping, NarrowBERT, random-LTD and ScTD reach dense's quality
for less compute? Each variant pretrains from the same initial weights on the same stream of batches
for the same training-time budget, its steps interleaved with the others' so that machine noise hits
them alike, and is evaluated on the same held-out masked tokens at regular intervals.

    python perf/bench_quality.py                      # 20 minutes per variant on 2 CPU cores
    python perf/bench_quality.py --quick              # a 2-minute smoke run
    python perf/bench_quality.py --finetune           # then fine-tune every variant (3 seeds)

Reported per variant: held-out loss and accuracy at equal training time and at equal training FLOPs
(tokdrop.flops), and the time to reach dense's final loss as a ratio to dense's time. Goals to report
against (not to tune for): token_drop reaches dense's final loss in at most 0.85x dense's time,
narrow in at most 0.7x. Each variant's learning rate warms up over the first tenth of its budget
and decays linearly to zero at its end (tokdrop.experiment.Trainee.follow_time_schedule).

With --finetune every pretrained encoder is fine-tuned identically (`tokdrop finetune`) on the
downstream tasks built from the held-out documents (tokdrop.downstream: the topic of a paragraph,
and whether sentence B follows sentence A), with three seeds; mean and spread of test accuracy
are reported next to the pretraining cost.

Writes perf/results/bench_quality_<device>.json (device, versions, commit, every curve point) and a
PNG of held-out loss against training time and against training FLOPs, with the unigram loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from provenance import REPO, device_name, git_commit  # perf/ is the script's folder, hence on sys.path

from tokdrop.cli import format_table, positive_int
from tokdrop.config import TokenDropConfig, with_mode
from tokdrop.experiment import Trainee, loss_at, make_trainees, prepare_data, run_interleaved, time_to_reach
from tokdrop.files import write_atomically
from tokdrop.training import config_from_arguments

VARIANTS = ("dense", "token_drop", "narrow", "random_ltd", "sctd")
GOALS = {"token_drop": 0.85, "narrow": 0.70}  # time to dense's final loss, as a share of dense's
# ScTD: the authors' interval and weight (their code: every 10 updates, 0.05 per KL term).
SCTD = {"consistency_every": 10, "consistency_weight": 0.05}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="training time per variant")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 minutes in all, small sizes")
    parser.add_argument("--finetune", action="store_true", help="fine-tune every variant on the downstream tasks")
    parser.add_argument("--seeds", type=positive_int, default=3, help="fine-tuning seeds")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--evals", type=positive_int, default=20, help="held-out evaluations per variant")
    parser.add_argument("--seq-len", type=positive_int, default=128)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--vocab-size", type=positive_int, default=8192)
    parser.add_argument("--eval-rows", type=positive_int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--layers", type=positive_int, default=6)
    parser.add_argument("--hidden", type=positive_int, default=256)
    parser.add_argument("--heads", type=positive_int, default=4)
    parser.add_argument("--intermediate", type=positive_int, default=1024)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--keep", type=float, default=0.5, help="token_drop, random_ltd and sctd: kept fraction")
    parser.add_argument("--full-layers", type=int, default=2, help="narrow: full layers")
    parser.add_argument("--train-words", type=positive_int, default=None, help="training text (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="default perf/results/bench_quality_<device>.json")
    parser.add_argument("--plot", type=Path, default=None, help="default: the JSON's path with .png")
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes = 2.0 / len(args.variants)
        args.seq_len, args.vocab_size, args.eval_rows, args.evals = 64, 2048, 64, 4
        args.layers, args.hidden, args.heads, args.intermediate, args.seeds = 4, 64, 2, 128, 1
        args.train_words = args.train_words or 300_000
    if "narrow" in args.variants and not 0 <= args.full_layers < args.layers:
        parser.error(f"--full-layers {args.full_layers} leaves no narrow layer in --layers {args.layers}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.json = args.json or REPO / "perf" / "results" / f"bench_quality_{device}.json"
    args.plot = args.plot or args.json.with_suffix(".png")
    return args


def variant_configs(args: argparse.Namespace, data) -> dict:
    base = config_from_arguments(
        args,
        vocab_size=data.tokenizer.get_vocab_size(),
        seq_len=args.seq_len,
        max_predictions_per_seq=data.num_predictions,
        pad_token_id=data.specials.pad,
    )
    allow_ids = data.specials.always_kept()
    configs = {}
    for name in args.variants:
        mode = "token_drop" if name == "sctd" else name
        config = with_mode(base, mode, keep=args.keep, full_layers=args.full_layers, allow_ids=allow_ids)
        if name == "sctd":
            config = dataclasses.replace(config, token_drop=TokenDropConfig(**{
                **dataclasses.asdict(config.token_drop), **SCTD,
            }))  # fmt: skip
        configs[name] = config
    return configs


def pretrain(args: argparse.Namespace, data) -> list[Trainee]:
    budget = args.minutes * 60
    trainees = make_trainees(
        variant_configs(args, data),
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        total_steps=None,
    )
    interval = budget / args.evals
    next_eval = {t.name: interval for t in trainees}

    def evaluate_now(trainee: Trainee) -> bool:
        if trainee.train_seconds < next_eval[trainee.name]:
            return False
        next_eval[trainee.name] += interval
        return True

    def after_step(trainee: Trainee) -> None:
        trainee.follow_time_schedule(budget, args.lr)
        if trainee.steps % 50 == 0:
            print(
                f"{trainee.name}: step {trainee.steps}, {trainee.train_seconds:.0f}/{budget:.0f} s, held-out "
                f"{trainee.curve[-1]['held_out_loss']:.3f}",
                file=sys.stderr,
            )

    for trainee in trainees:
        trainee.follow_time_schedule(budget, args.lr)
    run_interleaved(
        trainees,
        data,
        batch_size=args.batch_size,
        seed=args.seed,
        done=lambda trainee: trainee.train_seconds >= budget,
        evaluate_now=evaluate_now,
        after_step=after_step,
    )
    return trainees


def summarise(trainees: list[Trainee], unigram: float) -> dict:
    dense = next(t for t in trainees if t.name == "dense")
    dense_loss, dense_time = dense.curve[-1]["held_out_loss"], dense.curve[-1]["train_seconds"]
    common_time = min(t.curve[-1]["train_seconds"] for t in trainees)
    common_flops = min(t.curve[-1]["train_flops"] for t in trainees)
    dense_reached = time_to_reach(dense.curve, dense_loss)
    out = {}
    for trainee in trainees:
        reached = time_to_reach(trainee.curve, dense_loss)
        goal = GOALS.get(trainee.name)
        ratio = None if reached is None else reached / dense_reached
        out[trainee.name] = {
            "steps": trainee.steps,
            "train_seconds": trainee.train_seconds,
            "train_flops": trainee.train_flops,
            "flops_per_step": trainee.flops_per_step,
            "median_step_s": statistics.median(trainee.step_seconds),
            "final_held_out_loss": trainee.curve[-1]["held_out_loss"],
            "final_held_out_accuracy": trainee.curve[-1]["held_out_accuracy"],
            "held_out_loss_at_equal_time": loss_at(trainee.curve, common_time, "train_seconds"),
            "held_out_loss_at_equal_flops": loss_at(trainee.curve, common_flops, "train_flops"),
            "time_to_dense_final_loss_s": reached,
            "time_to_dense_final_loss_vs_dense": ratio,
            "goal_vs_dense": goal,
            "meets_goal": None if goal is None else ratio is not None and ratio <= goal,
            "curve": trainee.curve,
        }
    return {
        "unigram_loss": unigram,
        "dense_final_loss": dense_loss,
        "dense_train_seconds": dense_time,
        "equal_time_s": common_time,
        "equal_flops": common_flops,
        "variants": out,
    }


def finetune(args: argparse.Namespace, data, trainees: list[Trainee], workdir: Path) -> dict:
    """Fine-tune each pretrained encoder on the downstream tasks, `args.seeds` times each."""
    from tokdrop import cli
    from tokdrop.corpus import load_corpus
    from tokdrop.downstream import make_tasks

    tasks = make_tasks(load_corpus(), workdir / "tasks", seed=args.seed)
    results: dict = {}
    for trainee in trainees:
        model_dir = workdir / "models" / trainee.name
        trainee.model.save_pretrained(model_dir)
        write_atomically(model_dir / "tokenizer.json", lambda p: data.tokenizer.save(str(p)))
        for task_name, task in tasks.items():
            accuracies = []
            for seed in range(args.seeds):
                out = workdir / "finetune" / trainee.name / task_name / str(seed)
                argv = ["finetune", "--model", str(model_dir), *task.finetune_arguments(), "--seed", str(seed)]
                argv += ["--out", str(out), "--max-length", str(args.seq_len)] + (
                    ["--epochs", "1"] if args.quick else []
                )
                if cli.main(argv) != 0:
                    raise RuntimeError(f"tokdrop {' '.join(argv)} failed")
                accuracies.append(json.loads((out / "results.json").read_text())["test"]["accuracy"])
            results.setdefault(trainee.name, {})[task_name] = {
                "accuracies": accuracies,
                "mean": statistics.mean(accuracies),
                "spread": (max(accuracies) - min(accuracies)) / 2,
            }
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    data = prepare_data(
        seq_len=args.seq_len,
        vocab_size=args.vocab_size,
        eval_rows=args.eval_rows,
        batch_size=args.batch_size,
        seed=args.seed,
        max_train_words=args.train_words,
    )
    trainees = pretrain(args, data)
    results = {
        "benchmark": "perf/bench_quality.py",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(torch.device("cpu")),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git": git_commit(),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": {
            "train_sequences": len(data.train_rows),
            "train_tokens": data.train_tokens,
            "held_out_predictions": sum(int((b["labels"] != -100).sum()) for b in data.eval_batches),
        },
        "model": trainees[0].config.to_dict(),
        **summarise(trainees, data.unigram_loss),
    }
    _write(results, args)  # the pretraining figures are kept even if fine-tuning is interrupted
    if args.finetune:
        with tempfile.TemporaryDirectory(prefix="tokdrop_quality_") as workdir:
            results["finetune"] = finetune(args, data, trainees, Path(workdir))
        _write(results, args)
    return results


def _write(results: dict, args: argparse.Namespace) -> None:
    print(_table(results))
    write_atomically(args.json, lambda p: Path(p).write_text(json.dumps(results, indent=2) + "\n"))
    write_atomically(args.plot, lambda p: _plot(results, p))
    print(f"wrote {args.json} and {args.plot}")


def _table(results: dict) -> str:
    header = (
        "variant",
        "steps",
        "final loss",
        "accuracy",
        "loss @ equal time",
        "loss @ equal FLOPs",
        "to dense's loss",
    )
    rows = []
    for name, v in results["variants"].items():
        ratio = v["time_to_dense_final_loss_vs_dense"]
        reached = "not reached" if ratio is None else f"{ratio:.2f}x"
        if v["goal_vs_dense"] is not None:
            reached += f" (goal <= {v['goal_vs_dense']:.2f}: {'met' if v['meets_goal'] else 'missed'})"
        rows.append((
            name, str(v["steps"]), f"{v['final_held_out_loss']:.3f}", f"{v['final_held_out_accuracy']:.3f}",
            f"{v['held_out_loss_at_equal_time']:.3f}", f"{v['held_out_loss_at_equal_flops']:.3f}", reached,
        ))  # fmt: skip
    rows.append(("unigram (no context)", "", f"{results['unigram_loss']:.3f}", "", "", "", ""))
    text = format_table(header, rows)
    if "finetune" in results:
        tasks = sorted({task for per in results["finetune"].values() for task in per})
        header = ("variant", *(f"{task} accuracy" for task in tasks))
        rows = [
            (name, *(f"{per[task]['mean']:.3f} +- {per[task]['spread']:.3f}" for task in tasks))
            for name, per in results["finetune"].items()
        ]
        text += "\n\n" + format_table(header, rows)
    return text


def _plot(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.5), layout="constrained")
    for axes, axis, label in zip(
        figure.subplots(1, 2),
        ("train_seconds", "train_flops"),
        ("training time (s, evaluation excluded)", "training FLOPs (FLOP model)"),
        strict=True,
    ):
        for name, v in results["variants"].items():
            axes.plot([p[axis] for p in v["curve"]], [p["held_out_loss"] for p in v["curve"]], marker=".", label=name)
        axes.axhline(results["unigram_loss"], color="grey", linestyle="--", label="unigram (no context)")
        axes.set_xlabel(label)
        axes.set_ylabel("held-out MLM loss (nats)")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(f"bench_quality: {results['device']}, {results['arguments']['minutes']:.1f} min per variant")
    figure.savefig(path, format="png", dpi=110)


if __name__ == "__main__":
    main()
