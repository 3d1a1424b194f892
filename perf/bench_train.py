"""Time BERT masked-LM pretraining steps on a GPU, every mode and baseline side by side in one run.

    python perf/bench_train.py                                        # CUDA, BERT-base, seq 128 and 512
    python perf/bench_train.py --compile none default max-autotune --max-batch
    python perf/bench_train.py --preset mini --vocab-size 1000 --device cpu --warmup 1 --reps 2 --seq-len 32

Models: tokdrop dense, token_drop (keep 0.5, the paper's layers), narrow (NarrowBERT, 2 full
layers), random_ltd (token dropping with random importance), varlen (tokdrop dense on the
`varlen` attention backend: packed FlashAttention, CUDA only, no attention dropout) and
transformers (Hugging Face BertForMaskedLM, sdpa). Each runs under every `--compile` mode
("none" is eager; "max-autotune" adds CUDA graphs where shapes are static); a variant is
"model[mode]". On CUDA: bf16 autocast; on CPU: fp32; fused AdamW on both (tokdrop.training.make_optimizer).

Per sequence length all variants stay resident and run interleaved, one step each per repetition
in a rotating order, so that clock and load drift hit them alike; warm-up repetitions (which also
compile) are not timed. Model FLOPs utilisation divides the FLOP model (tokdrop.flops) by a
matmul peak measured in the same run (bf16 on CUDA, fp32 on CPU). A variant that runs out of
memory is recorded and dropped; the others go on. JSON goes to perf/results/bench_train_<device>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import roofline
import torch
import transformers
from bench_step import SPECIALS, random_batch, transformers_model
from provenance import device_name, git_commit
from torch import nn

from tokdrop.cli import HelpFormatter, format_table, positive_int
from tokdrop.config import MODES, BertConfig, with_mode
from tokdrop.data import num_mlm_predictions
from tokdrop.files import write_atomically
from tokdrop.flops import training_flops
from tokdrop.kernels import resolve_backend
from tokdrop.presets import PRESETS
from tokdrop.training import build_model, make_optimizer, train_step

REPO = Path(__file__).resolve().parent.parent
MODELS = ("dense", "token_drop", "narrow", "random_ltd", "varlen", "transformers")
COMPILE_MODES = ("none", "default", "max-autotune")
# The speed-ups the modes must reach to be worth using (token dropping near the paper's 25% saving,
# NarrowBERT at 2x, dense ahead of compiled transformers): (kind, numerator, denominator,
# {seq_len: target}; None is every length).
# "time" and "memory" ratios must be at most the target, "throughput" ratios at least.
TARGETS = (
    ("time", "token_drop", "dense", {512: 0.78, 128: 0.85}),
    ("time", "narrow", "dense", {512: 0.50}),
    ("throughput", "dense", "transformers_compiled", {None: 1.3}),
    ("memory", "token_drop", "dense", {None: 0.85}),
)
MFU_TARGET = 0.45
LR = 1e-4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--preset", choices=tuple(PRESETS), default="base", help="model size")
    parser.add_argument("--vocab-size", type=positive_int, default=30522, help="vocabulary size")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--seq-len", type=positive_int, nargs="+", default=[128, 512], help="sequence lengths")
    parser.add_argument("--batch", type=positive_int, default=32, help="sequences per step")
    parser.add_argument(
        "--compile",
        nargs="+",
        choices=COMPILE_MODES,
        default=["none", "default"],
        help="torch.compile modes; every model runs under each",
    )
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="models to run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first (they compile)")
    parser.add_argument("--reps", type=positive_int, default=20, help="timed repetitions")
    parser.add_argument(
        "--max-batch",
        action="store_true",
        help="CUDA: also find each variant's largest batch that fits and time it there",
    )
    parser.add_argument("--max-batch-limit", type=positive_int, default=1024, help="largest batch --max-batch tries")
    parser.add_argument(
        "--peak-size",
        type=positive_int,
        default=None,
        help="matmul side for the peak (default 8192 on CUDA, 1024 on CPU)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data")
    parser.add_argument(
        "--json", type=Path, default=None, help="results file (default perf/results/bench_train_<device>.json)"
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds: build no further variant (and no further length) after this, and write what was measured",
    )
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA GPU (use --device cpu for a smoke run)")
    if args.max_batch and args.device != "cuda":
        parser.error("--max-batch needs --device cuda (host memory is not the limit worth measuring)")
    longest = max(args.seq_len)
    if longest > 512:
        parser.error(f"--seq-len {longest} exceeds BERT's 512 positions")
    return args


# --------------------------------------------------------------------------------------- measurement


def matmul_peak(device: torch.device, size: int) -> dict[str, object]:
    """TFLOP/s of one large square matmul: bf16 on CUDA (the tensor-core peak), fp32 on CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    times = []
    for rep in range(13):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        if rep >= 3:  # the first calls pick kernels and warm clocks
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "size": size,
        "median_s": seconds,
        "tflops": 2 * size**3 / seconds / 1e12,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Autocast(nn.Module):
    """Runs the wrapped model's forward under bf16 autocast; backward follows the forward's dtypes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return self.model(**batch)


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of a variant's parameters, gradients and optimizer state (its resident share)."""
    tensors = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    unique = {id(t): t for t in tensors}  # tied weights count once
    return sum(t.numel() * t.element_size() for t in unique.values())


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err)


def failure(err: Exception, when: str) -> dict[str, object]:
    """A failed variant's record. GPU time is scarce, so one variant's failure (out of memory, a
    compile error) must not lose the others' figures; anything but OOM also prints its traceback."""
    if not is_oom(err):
        traceback.print_exception(err, file=sys.stderr)
    return {"error": f"{type(err).__name__} {when}: {str(err)[:500]}", "oom": is_oom(err)}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ variants


@dataclasses.dataclass
class Variant:
    model_name: str
    compile: str
    flops_per_seq: float
    build: Callable[[], nn.Module]  # a fresh model on the device, in training mode
    roofline: Callable[[int], float] = lambda batch: float("nan")  # predicted step seconds at a batch size

    @property
    def name(self) -> str:
        return f"{self.model_name}[{self.compile}]"


def model_configs(base: BertConfig) -> dict[str, BertConfig]:
    """tokdrop's configs of the run's models: every training mode, and dense on the varlen backend."""
    allow_ids = SPECIALS.always_kept()
    configs = {mode: with_mode(base, mode, allow_ids=allow_ids) for mode in MODES}
    # varlen_attn has no attention dropout; MosaicBERT trains without it as well.
    configs["varlen"] = dataclasses.replace(configs["dense"], attn_backend="varlen", attention_probs_dropout_prob=0.0)
    return configs


def make_variants(args: argparse.Namespace, base: BertConfig, seq_len: int, skipped: dict[str, str]) -> list[Variant]:
    """Every (model, compile mode) pair of the run; unrunnable ones go to `skipped` with the reason."""
    device = torch.device(args.device)
    configs = model_configs(base)
    predictions = num_mlm_predictions(seq_len)
    spec = roofline.spec_for(device_name(device))
    variants = []
    for model_name in args.models:
        if model_name == "varlen":
            try:
                resolve_backend("varlen", device.type)
            except ValueError as err:
                skipped.update({f"varlen[{mode}]": str(err) for mode in args.compile})
                continue
        for mode in args.compile:
            if model_name == "transformers":
                flops = training_flops(base, seq_len, predictions, decode_every_position=True)
                config, every = base, True

                def build(mode=mode):
                    return wrap(transformers_model(base, args.seed, args.device), device, mode)
            else:
                config, every = configs[model_name], False
                flops = training_flops(config, seq_len, predictions)

                def build(config=config, mode=mode):
                    return wrap(build_model(config, args.seed, device), device, mode)

            def predict(batch, config=config, every=every):
                step = roofline.training_step(config, seq_len, batch, predictions, spec, decode_every_position=every)
                return step["seconds"]

            variants.append(Variant(model_name, mode, flops, build, predict))
    return variants


def wrap(model: nn.Module, device: torch.device, mode: str) -> nn.Module:
    """The model as timed: under bf16 autocast on CUDA, compiled unless `mode` is "none"."""
    if device.type == "cuda":
        model = Autocast(model)
    if mode == "none":
        return model
    # Static shapes: one graph per sequence length, which CUDA graphs (max-autotune) need.
    return torch.compile(model, mode=mode, dynamic=False)


def batch_for(args: argparse.Namespace, seq_len: int, batch: int) -> dict[str, torch.Tensor]:
    shape = argparse.Namespace(
        seed=args.seed,
        vocab_size=args.vocab_size,
        batch_size=batch,
        seq_len=seq_len,
        predictions=num_mlm_predictions(seq_len),
        device=args.device,
    )
    return random_batch(shape)


def time_interleaved(
    variants: list[Variant], batch: dict[str, torch.Tensor], args: argparse.Namespace, device: torch.device
) -> dict[str, dict[str, object]]:
    """Build every variant, then run warm-up and timed repetitions in rotating order."""
    results: dict[str, dict[str, object]] = {}
    live: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    for variant in variants:
        if args.stop_at is not None and time.monotonic() > args.stop_at:
            results[variant.name] = {"skipped": "past the --deadline before it was built"}
            continue
        try:
            model = variant.build()
            optimizer = make_optimizer(model, lr=LR)
            step_with_peak(model, optimizer, batch, device)  # compiles, within the deadline's reach
            live[variant.name] = (model, optimizer)
        except Exception as err:
            results[variant.name] = failure(err, "while building")
            free(device)
    steps: dict[str, list[float]] = {name: [] for name in live}
    peaks: dict[str, int] = {}
    for rep in range(args.warmup + args.reps):
        names = list(live)
        shift = rep % max(1, len(names))
        for name in names[shift:] + names[:shift]:
            model, optimizer = live[name]
            try:
                seconds, peak = step_with_peak(model, optimizer, batch, device)
            except Exception as err:
                results[name] = failure(err, f"in repetition {rep + 1}")
                del live[name], model, optimizer
                free(device)
                continue
            if rep >= args.warmup:
                steps[name].append(seconds)
                if peak is not None:
                    peaks[name] = max(peaks.get(name, 0), peak)
        print(
            f"  repetition {rep + 1}/{args.warmup + args.reps}" + (" (warm-up)" if rep < args.warmup else ""),
            file=sys.stderr,
            flush=True,
        )
    for name in live:
        results[name] = {"step_s": steps[name], "peak_memory_bytes": peaks.get(name)}
    live.clear()
    free(device)
    return results


def step_with_peak(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], device: torch.device
) -> tuple[float, int | None]:
    """One train_step and, on CUDA, this variant's peak: the step's peak allocation less what the
    other resident variants hold, i.e. the peak it would have alone on the GPU."""
    if device.type != "cuda":
        return train_step(model, optimizer, batch).seconds, None
    others = torch.cuda.memory_allocated(device) - state_bytes(model, optimizer)
    torch.cuda.reset_peak_memory_stats(device)
    seconds = train_step(model, optimizer, batch).seconds
    return seconds, torch.cuda.max_memory_allocated(device) - others


def largest_batch(variant: Variant, args: argparse.Namespace, seq_len: int, device: torch.device, peak: dict) -> dict:
    """Double the batch until a step runs out of memory, then bisect; time the largest that fits."""

    def fits(batch: int) -> bool:
        try:
            model = variant.build()
            optimizer = make_optimizer(model, lr=LR)
            data = batch_for(args, seq_len, batch)
            for _ in range(2):  # the second step holds the optimizer state too
                train_step(model, optimizer, data)
            return True
        except Exception as err:
            if not is_oom(err):
                raise
            return False
        finally:
            model = optimizer = data = None  # drop the references, or free() cannot release the memory
            free(device)

    low, high = 0, None
    batch = args.batch
    while high is None and batch <= args.max_batch_limit:
        if fits(batch):
            low, batch = batch, batch * 2
        else:
            high = batch
    high = high or args.max_batch_limit + 1
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    if low == 0:
        return {"largest_batch": 0, "note": f"no batch from {args.batch} down fits"}
    timed = time_interleaved([variant], batch_for(args, seq_len, low), args, device)[variant.name]
    entry = {"largest_batch": low, "capped": low == args.max_batch_limit, **timed}
    return summarise(entry, variant, low, seq_len, peak)


def summarise(entry: dict, variant: Variant, batch: int, seq_len: int, peak: dict | None) -> dict:
    """Median, tokens/s, TFLOP/s and MFU of a timed variant (errors pass through)."""
    if "step_s" not in entry:
        return entry
    median = statistics.median(entry["step_s"])
    flops = variant.flops_per_seq * batch
    tflops = flops / median / 1e12
    return {
        "model": variant.model_name,
        "compile": variant.compile,
        "batch": batch,
        "median_step_s": median,
        "min_step_s": min(entry["step_s"]),
        "tokens_per_s": batch * seq_len / median,
        "roofline_ms": variant.roofline(batch) * 1e3,
        "flops_per_step": flops,
        "tflops": tflops,
        "mfu": tflops / peak["tflops"] if peak else None,
        **entry,
    }


# ------------------------------------------------------------------------------------------- targets


def best(variants: dict[str, dict], model: str) -> tuple[str, dict] | None:
    """The fastest timed variant of `model`; "transformers_compiled" means any compiled HF one."""
    name_ok = (
        (lambda v: v.get("model") == "transformers" and v["compile"] != "none")
        if model == "transformers_compiled"
        else (lambda v: v.get("model") == model)
    )
    timed = [(name, v) for name, v in variants.items() if "median_step_s" in v and name_ok(v)]
    return min(timed, key=lambda item: item[1]["median_step_s"]) if timed else None


def target_checks(runs: dict[str, dict], device_type: str) -> list[dict[str, object]]:
    """TARGETS per sequence length, each model at its fastest compile mode. They are
    GPU targets: elsewhere the ratios are computed but pass/miss stays None."""
    checks = []
    for seq, run in runs.items():
        variants = run["variants"]
        for kind, numerator, denominator, per_length in TARGETS:
            target = per_length.get(int(seq), per_length.get(None))
            num, den = best(variants, numerator), best(variants, denominator)
            check = {
                "name": f"{kind} {numerator}/{denominator}",
                "seq_len": int(seq),
                "target": target,
                "direction": ">=" if kind == "throughput" else "<=",
                "numerator": num and num[0],
                "denominator": den and den[0],
                "measured": None,
                "flop_model": None,
                "met": None,
            }
            if num and den:
                n, d = num[1], den[1]
                if kind == "time":
                    check["measured"] = n["median_step_s"] / d["median_step_s"]
                    check["flop_model"] = n["flops_per_step"] / d["flops_per_step"]
                elif kind == "throughput":
                    check["measured"] = n["tokens_per_s"] / d["tokens_per_s"]
                elif n["peak_memory_bytes"] and d["peak_memory_bytes"]:
                    check["measured"] = n["peak_memory_bytes"] / d["peak_memory_bytes"]
            if check["measured"] is not None and target is not None and device_type == "cuda":
                check["met"] = check["measured"] >= target if kind == "throughput" else check["measured"] <= target
            checks.append(check)
        dense = best(variants, "dense")
        mfu = dense[1]["mfu"] if dense else None
        checks.append(
            {
                "name": "mfu dense",
                "seq_len": int(seq),
                "target": MFU_TARGET,
                "direction": ">=",
                "numerator": dense and dense[0],
                "denominator": "matmul peak",
                "measured": mfu,
                "flop_model": None,
                "met": None if mfu is None or device_type != "cuda" else mfu >= MFU_TARGET,
            }
        )
    return checks


# ---------------------------------------------------------------------------------------------- main


def versions() -> dict[str, str | None]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    base = BertConfig(
        **PRESETS[args.preset], vocab_size=args.vocab_size, pad_token_id=SPECIALS.pad, max_position_embeddings=512
    )
    peak = matmul_peak(device, args.peak_size or (8192 if device.type == "cuda" else 1024))
    print(f"{peak['dtype']} matmul peak: {peak['tflops']:.2f} TFLOP/s", file=sys.stderr)

    runs: dict[str, dict] = {}
    args.stop_at = None if args.deadline is None else time.monotonic() + args.deadline
    for seq_len in args.seq_len:
        if args.stop_at is not None and time.monotonic() > args.stop_at:
            runs[str(seq_len)] = {"skipped": {"all": "past the --deadline"}, "variants": {}}
            continue
        # Static prediction slots keep the compiled graphs free of host syncs.
        config = dataclasses.replace(base, max_predictions_per_seq=num_mlm_predictions(seq_len))
        skipped: dict[str, str] = {}
        variants = make_variants(args, config, seq_len, skipped)
        print(f"seq {seq_len}: {', '.join(v.name for v in variants)}", file=sys.stderr)
        timed = time_interleaved(variants, batch_for(args, seq_len, args.batch), args, device)
        run = {
            "batch": args.batch,
            "predictions_per_seq": num_mlm_predictions(seq_len),
            "skipped": skipped,
            "variants": {v.name: summarise(timed[v.name], v, args.batch, seq_len, peak) for v in variants},
        }
        if args.max_batch:
            run["max_batch"] = {}
            for variant in variants:
                try:
                    run["max_batch"][variant.name] = largest_batch(variant, args, seq_len, device, peak)
                except Exception as err:
                    run["max_batch"][variant.name] = failure(err, "in the batch search")
        runs[str(seq_len)] = run

    results = {
        "benchmark": "perf/bench_train.py",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        **versions(),
        "git": git_commit(),
        "arguments": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "precision": f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, fused AdamW",
        "model": {
            key: value
            for key, value in dataclasses.asdict(base).items()
            if key in PRESETS[args.preset] or key == "vocab_size"
        },
        "matmul_peak": peak,
        "flop_model": "tokdrop.flops.training_flops (attention 4*H*D*Lq*Lk fwd, x2.5 bwd; linear x2 bwd)",
        "roofline": f"perf/roofline.py at {roofline.spec_for(device_name(device)).name}'s datasheet: "
        "FLOP model / peak + selection, gather and scatter bytes / bandwidth (roofline_ms)",
        "peak_memory": "torch.cuda.max_memory_allocated of the step, less what the other resident variants held",
        "runs": runs,
        "targets": target_checks(runs, device.type),
    }
    print(tables(results))
    path = args.json or REPO / "perf" / "results" / f"bench_train_{device.type}.json"
    write_atomically(path, lambda p: Path(p).write_text(json.dumps(results, indent=2) + "\n"))
    print(f"wrote {path}")
    return results


def tables(results: dict) -> str:
    peak = results["matmul_peak"]
    out = [
        f"{results['device']}, torch {results['torch']}, {results['precision']}, "
        f"{peak['dtype']} matmul peak {peak['tflops']:.2f} TFLOP/s"
    ]
    for seq, run in results["runs"].items():
        rows = []
        for name, v in run["variants"].items():
            if "median_step_s" not in v:
                rows.append((name, "-", "-", "-", "-", "-", "-", v["error"][:60]))
                continue
            memory = "-" if v["peak_memory_bytes"] is None else f"{v['peak_memory_bytes'] / 2**30:.2f}"
            rows.append(
                (
                    name,
                    f"{v['median_step_s'] * 1e3:.1f}",
                    "-" if v.get("roofline_ms") is None else f"{v['roofline_ms']:.3g}",
                    f"{v['tokens_per_s']:.0f}",
                    f"{v['tflops']:.3g}",
                    f"{v['mfu']:.1%}",
                    memory,
                    "",
                )
            )
        rows += [(name, "-", "-", "-", "-", "-", "-", f"skipped: {why[:50]}") for name, why in run["skipped"].items()]
        out.append(
            f"\nseq {seq}, batch {run['batch']}\n"
            + format_table(
                ("variant", "median ms", "roofline ms", "tokens/s", "TFLOP/s", "MFU", "peak GiB", "note"), rows
            )
        )
    checks = [
        (
            f"{c['name']} @ {c['seq_len']}",
            "-" if c["measured"] is None else f"{c['measured']:.3f}",
            "-" if c["flop_model"] is None else f"{c['flop_model']:.3f}",
            "-" if c["target"] is None else f"{c['direction']} {c['target']}",
            {True: "pass", False: "MISS", None: "n/a"}[c["met"]],
        )
        for c in results["targets"]
    ]
    out.append("\n" + format_table(("target", "measured", "FLOP model", "target", "result"), checks))
    return "\n".join(out)


if __name__ == "__main__":
    main()
