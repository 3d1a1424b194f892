"""perf/bench_train.py and perf/bench_unpad.py on tiny CPU runs write the promised JSON; perf/report.py
turns results into REPORT.md and PNGs."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest

PERF = Path(__file__).resolve().parent.parent / "perf"


@pytest.fixture
def perf_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(PERF))  # bench_train imports bench_step as a sibling, like a script
    return importlib.import_module("bench_train"), importlib.import_module("report")


def test_bench_train_json_and_report(perf_modules, tmp_path):
    bench_train, report = perf_modules
    results_dir = tmp_path / "results"
    out = results_dir / "bench_train_cpu.json"
    bench_train.main(
        [
            "--preset",
            "mini",
            "--vocab-size",
            "1000",
            "--device",
            "cpu",
            "--seq-len",
            "16",
            "--batch",
            "2",
            "--warmup",
            "0",
            "--reps",
            "1",
            "--compile",
            "none",
            "--peak-size",
            "64",
            "--json",
            str(out),
        ]
    )
    results = json.loads(out.read_text())

    for key in ("device", "device_type", "torch", "triton", "transformers", "git", "date", "matmul_peak", "targets"):
        assert key in results
    assert results["matmul_peak"]["dtype"] == "float32" and results["matmul_peak"]["tflops"] > 0
    run = results["runs"]["16"]
    assert set(run["variants"]) == {
        f"{m}[none]" for m in ("dense", "token_drop", "narrow", "random_ltd", "transformers")
    }
    assert "varlen[none]" in run["skipped"]  # varlen_attn needs CUDA
    for variant in run["variants"].values():
        assert len(variant["step_s"]) == 1 and variant["median_step_s"] > 0
        assert variant["tokens_per_s"] > 0 and 0 < variant["mfu"] and variant["peak_memory_bytes"] is None
        assert 0 < variant["roofline_ms"] < variant["median_step_s"] * 1e3  # perf/roofline.py beside it
    variants = run["variants"]
    assert variants["token_drop[none]"]["roofline_ms"] < variants["dense[none]"]["roofline_ms"]
    time_check = next(c for c in results["targets"] if c["name"] == "time token_drop/dense")
    assert 0 < time_check["flop_model"] < 1 and time_check["measured"] > 0
    assert all(c["met"] is None for c in results["targets"])  # GPU targets: no verdict on a CPU

    unpad_args = ["--preset", "mini", "--batch", "2", "--max-len", "16", "--batches", "1", "--warmup", "0"]
    importlib.import_module("bench_unpad").main(
        [*unpad_args, "--reps", "1", "--json", str(results_dir / "bench_unpad_cpu.json")]
    )
    for existing in sorted([*(PERF / "results").glob("bench_*.json"), *(PERF / "results").glob("static_sm90*.json")]):
        if not (results_dir / existing.name).exists():
            shutil.copy(existing, results_dir)
    report.main(["--results", str(results_dir), "--out", str(tmp_path)])
    text = (tmp_path / "REPORT.md").read_text()
    assert "Source: `perf/results/bench_unpad_cpu.json`" in text and "| batch 2 finetune_step |" in text
    assert "Source: `perf/results/static_sm90.json`" in text and "| _attn_fwd_kernel |" in text
    assert "Source: `perf/results/bench_train_cpu.json`" in text
    assert "## Not measured yet" in text and "GPU training figures" in text
    for png in ("report_step_time.png", "report_tokens_per_s.png"):
        assert (tmp_path / png).read_bytes().startswith(b"\x89PNG")
