"""perf/gpu_suite.py --dry-run: the whole GPU plan at toy size on the CPU, so that it cannot rot
between GPU runs."""

from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

PERF = Path(__file__).resolve().parent.parent / "perf"


def test_dry_run_runs_every_stage_and_keeps_to_the_limits(tmp_path):
    out = tmp_path / "suite"
    done = subprocess.run(
        [sys.executable, str(PERF / "gpu_suite.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    suite = json.loads((out / "suite.json").read_text())
    stages = {record["stage"]: record for record in suite["stages"]}
    assert list(stages) == ["kernel_tests", "sanitizer", "bench_attention", "bench_train", "bench_unpad", "report"]
    assert all(record["status"] == "ok" for record in stages.values()), {k: v["status"] for k, v in stages.items()}
    assert sum(stage["budget_s"] for stage in suite["plan"]) <= 540
    written = sorted(p.name for p in out.iterdir())
    assert len(written) <= 8 and set(written) == {n for r in stages.values() for n in r["outputs"]} | {"suite.json"}
    train = json.loads((out / "bench_train.json").read_text())
    assert {"dense[none]", "token_drop[none]", "narrow[none]", "random_ltd[none]"} <= set(
        train["runs"]["16"]["variants"]
    )
    assert json.loads((out / "bench_attention.json").read_text())["cases"]
    assert "tokdrop performance report" in (out / "REPORT.md").read_text()


def test_the_plan_refuses_more_files_or_time_than_a_gpu_run_has(monkeypatch):
    monkeypatch.syspath_prepend(str(PERF))
    gpu_suite = importlib.import_module("gpu_suite")
    plan = gpu_suite.stages(sys.executable)
    gpu_suite.check_plan(plan)
    with pytest.raises(ValueError, match="budgets add up to"):
        gpu_suite.check_plan([*plan, dataclasses.replace(plan[0], name="extra", budget_s=100, outputs=("x.json",))])
    many = [dataclasses.replace(plan[0], name=f"s{i}", budget_s=1, outputs=(f"{i}.json",)) for i in range(8)]
    with pytest.raises(ValueError, match="at most 8 distinct files"):
        gpu_suite.check_plan(many)
