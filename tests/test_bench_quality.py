"""perf/bench_quality.py --quick end to end: every curve, the comparisons at equal time and FLOPs,
the fine-tuning of the pretrained variants, the JSON and the plot, and perf/report.py's section."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

PERF = Path(__file__).resolve().parent.parent / "perf"


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(PERF))
        yield importlib.import_module("bench_quality")


def test_quick_run_writes_curves_comparisons_and_finetuning(bench, tmp_path, capsys):
    out = tmp_path / "results" / "bench_quality_cpu.json"
    out.parent.mkdir()
    argv = [
        "--quick",
        "--minutes",
        "0.3",
        "--variants",
        "dense",
        "token_drop",
        "sctd",
        "--finetune",
        "--json",
        str(out),
    ]
    bench.main(argv)
    results = json.loads(out.read_text())
    assert {"device", "torch", "git", "date", "unigram_loss", "variants", "finetune"} <= results.keys()
    assert set(results["variants"]) == {"dense", "token_drop", "sctd"}
    for name, v in results["variants"].items():
        assert v["train_seconds"] >= 0.3 * 60 and v["steps"] > 0, name
        times = [p["train_seconds"] for p in v["curve"]]
        assert times == sorted(times) and len(times) >= 3 and times[0] == 0
        assert all(math.isfinite(p["held_out_loss"]) and 0 <= p["held_out_accuracy"] <= 1 for p in v["curve"])
        assert math.isfinite(v["held_out_loss_at_equal_time"]) and math.isfinite(v["held_out_loss_at_equal_flops"])
    dense, drop = results["variants"]["dense"], results["variants"]["token_drop"]
    assert dense["time_to_dense_final_loss_vs_dense"] == 1.0
    assert drop["flops_per_step"] < dense["flops_per_step"]
    # A ScTD step is a token-dropping step, and every tenth step also runs the full pass.
    assert results["variants"]["sctd"]["flops_per_step"] == pytest.approx(
        drop["flops_per_step"] + dense["flops_per_step"] / 10
    )
    assert isinstance(drop["meets_goal"], bool) and drop["goal_vs_dense"] == 0.85
    for per_task in results["finetune"].values():
        assert set(per_task) == {"topic", "next_sentence"}
        assert all(0 <= r["mean"] <= 1 and len(r["accuracies"]) == 1 for r in per_task.values())
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "to dense's loss" in printed and "unigram" in printed and "topic accuracy" in printed

    importlib.import_module("report").main(["--results", str(out.parent), "--out", str(tmp_path)])
    report = (tmp_path / "REPORT.md").read_text()
    section = report.split("## Quality at equal cost (perf/bench_quality.py)")[1].split("\n## ")[0]
    assert f"unigram (no context) {results['unigram_loss']:.3f}" in section
    for name, v in results["variants"].items():
        assert f"| {name} | {v['steps']} | {v['final_held_out_loss']:.3f} |" in section
    assert "| variant | next_sentence | topic |" in section and "results/bench_quality_cpu.png" in section
