"""Data-parallel scaling of `tokdrop pretrain`: training tokens/s of 1 and 2 processes on CPU
(torchrun, gloo, one thread each) and, when a GPU is present, of 1 GPU.

    python perf/bench_scaling.py                      # writes perf/results/bench_scaling_<device>.json

Weak scaling: every process takes --batch-size sequences per step, so 2 processes do twice the work
of 1 per step; scaling efficiency = tokens/s(2 processes) / (2 x tokens/s(1 process)). For
reference, 1 process with 2 threads uses the same 2 cores without data parallelism. Each
configuration runs --repeats times, alternating, and the best median is kept: CPU machines are
shared and noisy. The corpus is the training split of tokdrop.corpus.load_corpus (Python's documentation
and an English dictionary), tokenised once into a shard directory under --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from provenance import device_name, git_commit  # perf/ is the script's folder, hence on sys.path

from tokdrop.cli import HelpFormatter, format_table, positive_int
from tokdrop.corpus import load_corpus
from tokdrop.files import write_atomically

REPO = Path(__file__).resolve().parent.parent
# Run outside the checkout: `python -m` puts the current directory on sys.path, and the checkout's
# tokdrop/ folder would shadow an installed (non-editable) tokdrop.
PRETRAIN = [sys.executable, "-m", "tokdrop.pretrain"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="for shards and runs (default: a temp dir)")
    parser.add_argument(
        "--json", type=Path, default=None, help="results file (default: perf/results/bench_scaling_<cpu|gpu>.json)"
    )
    parser.add_argument("--steps", type=positive_int, default=30, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the median")
    parser.add_argument("--repeats", type=positive_int, default=2, help="runs per configuration")
    parser.add_argument("--seq-len", type=positive_int, default=128, help="tokens per sequence")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="sequences per process per step")
    parser.add_argument("--gpu-batch-size", type=positive_int, default=64, help="sequences per step on the GPU")
    parser.add_argument("--mode", default="token_drop", help="tokdrop pretrain --mode")
    parser.add_argument(
        "--model", nargs="*", default=["--preset", "tiny", "--layers", "4"], help="model flags of tokdrop pretrain"
    )
    args = parser.parse_args(argv)
    if args.warmup >= args.steps:
        parser.error(f"--warmup {args.warmup} leaves no timed step of --steps {args.steps}")
    return args


def prepare_shards(workdir: Path) -> Path:
    corpus = workdir / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("\n".join(load_corpus().train) + "\n")
    subprocess.run(
        [*PRETRAIN, "--data", str(corpus), "--vocab-size", "8192", "--out", str(workdir), "--prepare-only"],
        check=True,
        cwd=workdir,
    )
    return workdir / "shards"


def timed_run(command: list[str], out: Path, threads: int, warmup: int) -> dict:
    """Run one training job and return its per-step tokens/s (global, all processes together)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([*command, "--out", str(out)], env=env, cwd=out.parent, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [line["tokens_per_s"] for line in lines[warmup:]]
    return {"median_tokens_per_s": statistics.median(rates), "tokens_per_s": rates}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    load_before = os.getloadavg()  # other work on the machine skews CPU figures; recorded with them
    with tempfile.TemporaryDirectory() as temp:
        workdir = (args.workdir or Path(temp)).resolve()  # the runs start in it
        workdir.mkdir(parents=True, exist_ok=True)
        shards = prepare_shards(workdir)
        common = [
            "--data",
            str(shards),
            "--mode",
            args.mode,
            *args.model,
            "--seq-len",
            str(args.seq_len),
            "--steps",
            str(args.steps),
            "--warmup-steps",
            "1",
            "--log-every",
            "1",
            "--save-every",
            str(args.steps),
            "--keep-last",
            "1",
            "--num-workers",
            "0",
        ]
        cpu = [*common, "--batch-size", str(args.batch_size)]
        # name -> (command, threads per process, processes)
        configs = {
            "cpu_1proc_1thread": ([*PRETRAIN, *cpu], 1, 1),
            "cpu_2proc_1thread": ([*TORCHRUN, "2", "-m", "tokdrop.pretrain", *cpu], 1, 2),
            "cpu_1proc_2threads": ([*PRETRAIN, *cpu], 2, 1),
        }
        if torch.cuda.is_available():
            configs["gpu_1"] = ([*PRETRAIN, *common, "--batch-size", str(args.gpu_batch_size)], 1, 1)
        runs: dict[str, list[dict]] = {name: [] for name in configs}
        for repeat in range(args.repeats):
            for name, (command, threads, _) in configs.items():
                print(f"repeat {repeat + 1}/{args.repeats}: {name}", file=sys.stderr)
                runs[name].append(timed_run(command, workdir / f"{name}-{repeat}", threads, args.warmup))

    best = {name: max(r["median_tokens_per_s"] for r in results) for name, results in runs.items()}
    results = {
        "benchmark": "perf/bench_scaling.py",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(torch.device("cpu")).rsplit(",", 1)[0],
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git": git_commit(),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "processes": {name: processes for name, (_, _, processes) in configs.items()},
        "best_median_tokens_per_s": best,
        "scaling_efficiency_2proc": best["cpu_2proc_1thread"] / (2 * best["cpu_1proc_1thread"]),
        "speedup_2proc_vs_1proc_2threads": best["cpu_2proc_1thread"] / best["cpu_1proc_2threads"],
        "runs": runs,
    }
    print(
        format_table(
            ("configuration", "processes", "tokens/s"),
            [(name, str(results["processes"][name]), f"{rate:.0f}") for name, rate in best.items()],
        )
    )
    print(f"scaling efficiency, 2 processes vs 1 (1 thread each): {results['scaling_efficiency_2proc']:.2f}")
    target = args.json or REPO / "perf" / "results" / f"bench_scaling_{'gpu' if results['gpu'] else 'cpu'}.json"
    write_atomically(target, lambda p: Path(p).write_text(json.dumps(results, indent=2) + "\n"))
    print(f"wrote {target}")
    return results


if __name__ == "__main__":
    main()
