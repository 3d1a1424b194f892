"""Every GPU figure of tokdrop in one run of at most nine minutes, in priority order, each stage with
its own time budget, all files in one output folder (at most eight).

    python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . && \\
        PYTHONUNBUFFERED=1 python3 perf/gpu_suite.py --out "$OUT"          # on the GPU machine
    python perf/gpu_suite.py --dry-run --out /tmp/suite                   # on CPU: the whole plan, toy sizes

Stages:
  1 kernel_tests      the GPU tests of the kernels at real sizes (B=32, L up to 1024, H=12, D=64 and
                      128, fp16/bf16/fp32, dropout), opcheck, inductor, the model on the Triton kernels
                      -> kernel_tests.json
  2 sanitizer         compute-sanitizer memcheck on one small case of each kernel (where present)
                      -> sanitizer.json
  3 bench_attention   forward and forward+backward TFLOP/s against varlen_attn (FA2), FlexAttention,
                      SDPA with a padding mask and xformers -> bench_attention.json
  4 bench_train       BERT-base at seq 512 and 128: dense, token_drop, narrow, random_ltd and
                      Hugging Face, bf16, torch.compile default; step time, tokens/s, MFU against a
                      matmul peak measured in the same run, peak memory -> bench_train.json
  5 bench_unpad       the unpadded encoder against the padded one on real lengths -> bench_unpad.json
  6 report            perf/report.py over the files above -> REPORT.md
and suite.json: each stage's status, seconds and the tail of its output.

A stage runs as a subprocess under its budget; benchmarks get a --deadline a little inside it so
that they stop starting new cases and write what they measured. A stage that still overruns is
killed, and the suite goes on with the next. With --dry-run each stage runs at toy size on the CPU
(the kernels through the Triton interpreter), so the plan cannot rot between GPU runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

PERF = Path(__file__).resolve().parent
REPO = PERF.parent
TOTAL_BUDGET_S = 540.0  # of the device tool's 10-minute command limit: a margin for start-up and copying
MAX_FILES = 8
SUITE_FILE = "suite.json"


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: float
    outputs: tuple[str, ...]  # files the stage leaves in the output folder
    command: tuple[str, ...]  # run with the output folder as {out}; benchmarks get {deadline}
    dry_command: tuple[str, ...]  # the same at toy size, on the CPU


def stages(python: str) -> list[Stage]:
    pytest = (python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=")

    def script(name: str, *arguments: str) -> tuple[str, ...]:
        return (python, str(PERF / name), *arguments)

    kernel_tests = ("tests/test_kernels_attention.py", "tests/test_kernels_rows.py", "tests/test_compile.py")
    return [
        Stage(
            "kernel_tests",
            150,
            ("kernel_tests.json",),
            (*pytest, "-m", "needs_cuda", *kernel_tests),
            (*pytest, *kernel_tests[:2], "-k", "strided_views or opcheck or head_dim_128"),
        ),
        Stage(
            "sanitizer",
            45,
            ("sanitizer.json",),
            ("compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "99",
             *script("gpu_suite.py", "--kernel-cases")),
            script("gpu_suite.py", "--kernel-cases", "--device", "cpu"),
        ),
        Stage(
            "bench_attention",
            120,
            ("bench_attention.json",),
            script("bench_attention.py", "--out", "{out}/bench_attention.json", "--deadline", "{deadline}"),
            script("bench_attention.py", "--device", "cpu", "--smoke", "--out", "{out}/bench_attention.json"),
        ),
        Stage(
            "bench_train",
            180,
            ("bench_train.json",),
            script(
                "bench_train.py", "--seq-len", "512", "128", "--compile", "default",
                "--models", "dense", "token_drop", "narrow", "transformers", "random_ltd",
                "--warmup", "2", "--reps", "10", "--json", "{out}/bench_train.json", "--deadline", "{deadline}",
            ),
            script(
                "bench_train.py", "--device", "cpu", "--preset", "mini", "--vocab-size", "1000",
                "--seq-len", "16", "--batch", "2", "--warmup", "0", "--reps", "1", "--compile", "none",
                "--models", "dense", "token_drop", "narrow", "random_ltd", "--json", "{out}/bench_train.json",
            ),
        ),
        Stage(
            "bench_unpad",
            30,
            ("bench_unpad.json",),
            script("bench_unpad.py", "--preset", "base", "--reps", "5", "--json", "{out}/bench_unpad.json"),
            script(
                "bench_unpad.py", "--device", "cpu", "--preset", "tiny", "--batch", "4",
                "--batches", "1", "--reps", "1", "--warmup", "0", "--json", "{out}/bench_unpad.json",
            ),
        ),
        Stage(
            "report",
            15,
            ("REPORT.md",),
            script("report.py", "--results", "{out}", "--out", "{out}"),
            script("report.py", "--results", "{out}", "--out", "{out}"),
        ),
    ]  # fmt: skip


def check_plan(plan: list[Stage]) -> None:
    """The promises of the module docstring: budgets within the total, at most MAX_FILES files."""
    total = sum(stage.budget_s for stage in plan)
    if total > TOTAL_BUDGET_S:
        raise ValueError(f"the stages' budgets add up to {total} s, more than {TOTAL_BUDGET_S} s")
    names = [name for stage in plan for name in stage.outputs] + [SUITE_FILE]
    if len(names) > MAX_FILES or len(set(names)) != len(names):
        raise ValueError(f"the suite would write {names}: at most {MAX_FILES} distinct files")
    for stage in plan:
        script = next((Path(part) for part in stage.command if part.endswith(".py")), None)
        if script is not None and not script.is_file():
            raise ValueError(f"stage {stage.name}: {script} does not exist")


def run_stage(stage: Stage, out: Path, dry_run: bool, remaining_s: float) -> dict:
    budget = min(stage.budget_s, remaining_s)
    record = {"stage": stage.name, "budget_s": budget, "outputs": list(stage.outputs)}
    template = stage.dry_command if dry_run else stage.command
    if shutil.which(template[0]) is None:
        return record | {"status": "skipped", "reason": f"{template[0]} is not installed"}
    if budget <= 5:
        return record | {"status": "skipped", "reason": "the suite's time is used up"}
    deadline = f"{max(budget - 25.0, budget / 2):.0f}"
    command = [part.replace("{out}", str(out)).replace("{deadline}", deadline) for part in template]
    env = {**os.environ, "TOKDROP_GPU_RESULTS": str(out / ".gpu_tests"), "PYTHONUNBUFFERED": "1"}
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
    started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=budget)
        status = "ok" if process.returncode == 0 else f"failed (exit {process.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
        status = "timed out"
    record |= {"status": status, "seconds": time.monotonic() - started, "command": command, "tail": output[-3000:]}
    if stage.name == "kernel_tests":
        record["summary"] = _collect_gpu_tests(out)
    if stage.name == "sanitizer":
        _write(out / "sanitizer.json", {"status": status, "command": command, "output": output[-20000:]})
    if stage.name == "report":  # the plots come back from the JSON with perf/report.py on any machine
        for plot in out.glob("report_*.png"):
            plot.unlink()
    return record


def _collect_gpu_tests(out: Path) -> dict:
    """The GPU tests' per-module summaries (tests/conftest.py's gpu_summary) as one file."""
    merged = {p.stem: json.loads(p.read_text()) for p in sorted((out / ".gpu_tests").glob("*.json"))}
    _write(out / "kernel_tests.json", merged)
    shutil.rmtree(out / ".gpu_tests", ignore_errors=True)
    return {name: {"passed": m["passed"], "failed": m["failed"]} for name, m in merged.items()}


def _write(path: Path, payload: object) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")


def kernel_cases(device: str) -> int:
    """One small forward and backward of each kernel (padded, gathered, packed, dropout, drop and
    restore), for compute-sanitizer to watch."""
    import torch

    from tokdrop.kernels import rows
    from tokdrop.kernels import subset_attention as sa

    generator = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def tensors(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype).requires_grad_()

    q, k, v = tensors(2, 40, 2, 64), tensors(2, 48, 2, 64), tensors(2, 48, 2, 64)
    q_lens, k_lens = torch.tensor([40, 7], device=device), torch.tensor([48, 9], device=device)
    for dropout_p in (0.0, 0.1):
        sa.triton_attention(q, k, v, q_lens, k_lens, dropout_p=dropout_p)[0].float().sum().backward()
    index = torch.stack([torch.randperm(40, generator=generator)[:20] for _ in range(2)]).to(device)
    sa.triton_attention(q, k, v, torch.tensor([20, 5], device=device), k_lens, q_index=index)[
        0
    ].float().sum().backward()
    cu = torch.tensor([0, 40, 47], device=device, dtype=torch.int32)
    packed = tensors(47, 2, 64)
    sa.triton_attention_varlen(packed, packed, packed, cu, cu, 40, 40)[0].float().sum().backward()
    hidden = tensors(2, 40, 64)
    with_rows = rows.drop_tokens_op(hidden, index) * 2
    rows.restore_tokens_op(hidden, with_rows, index, torch.tensor([20, 5], device=device)).float().sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    print("kernel cases ran")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=PERF / "results" / "gpu_suite", help="output folder")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: checks the whole plan")
    parser.add_argument("--only", nargs="+", default=None, help="run only these stages")
    parser.add_argument("--kernel-cases", action="store_true", help=argparse.SUPPRESS)  # the sanitizer's target
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.kernel_cases:
        if args.device == "cpu":
            os.environ.setdefault("TRITON_INTERPRET", "1")
        return kernel_cases(args.device)

    plan = stages(sys.executable)
    check_plan(plan)
    if args.only:
        unknown = set(args.only) - {stage.name for stage in plan}
        if unknown:
            parser.error(f"unknown stages {sorted(unknown)}; the stages are {[s.name for s in plan]}")
        plan = [stage for stage in plan if stage.name in args.only]
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA GPU here: run with --dry-run to check the plan on the CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    records = []
    for stage in plan:
        remaining = TOTAL_BUDGET_S - (time.monotonic() - started)
        print(
            f"[{time.monotonic() - started:5.0f} s] stage {stage.name} (budget {min(stage.budget_s, remaining):.0f} s)"
        )
        record = run_stage(stage, args.out, args.dry_run, remaining)
        print(f"          {record['status']}" + (f": {record['reason']}" if "reason" in record else ""))
        records.append(record)
        _write(args.out / SUITE_FILE, _suite(records, args, started))
    written = sorted(p.name for p in args.out.iterdir())
    if len(written) > MAX_FILES:
        print(f"gpu_suite: wrote {len(written)} files, more than {MAX_FILES}: {written}", file=sys.stderr)
        return 1
    print(f"wrote {written} to {args.out} in {time.monotonic() - started:.0f} s")
    return 0


def _suite(records: list[dict], args: argparse.Namespace, started: float) -> dict:
    import platform

    return {
        "suite": "perf/gpu_suite.py",
        "dry_run": args.dry_run,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "seconds": time.monotonic() - started,
        "plan": [asdict(stage) for stage in stages(sys.executable)],
        "stages": records,
    }


if __name__ == "__main__":
    sys.exit(main())
