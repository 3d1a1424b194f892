"""`tokdrop demo` end to end with tiny settings, and its command line."""

from __future__ import annotations

import json
import math

import pytest
import transformers

from tokdrop import cli
from tokdrop.demo import VARIANTS

TINY = [
    "--steps", "2", "--seq-len", "32", "--batch-size", "4", "--evals", "1", "--eval-rows", "8",
    "--vocab-size", "500", "--layers", "3", "--hidden", "32", "--heads", "2", "--intermediate", "64",
    "--train-words", "20000",
]  # fmt: skip


def test_demo_writes_table_plot_and_results_with_finite_losses(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", *TINY, "--out", str(out)]) == 0

    printed = capsys.readouterr().out
    assert all(name in printed for name in VARIANTS) and "time to dense's loss" in printed and "unigram" in printed
    assert (out / "table.txt").read_text().splitlines()[0].startswith("variant")
    assert (out / "heldout_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "tokenizer.json").is_file()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]

    results = json.loads((out / "results.json").read_text())
    assert list(results["variants"]) == list(VARIANTS)
    assert results["arguments"]["steps"] == 2 and results["data"]["predictions_per_sequence"] == 5
    for summary in results["variants"].values():
        assert [point["step"] for point in summary["curve"]] == [0, 2]
        assert all(math.isfinite(point["held_out_loss"]) for point in summary["curve"])
        assert len(summary["train_losses"]) == 2 and all(map(math.isfinite, summary["train_losses"]))
        assert summary["median_step_s"] > 0 and summary["tokens_per_s"] > 0
    assert results["variants"]["dense"]["speedup_vs_dense"] == 1.0
    assert 0 < results["unigram_loss"] < math.log(500)
    for name, summary in results["variants"].items():
        assert 0 <= summary["held_out_accuracy"] <= 1
        reached = summary["time_to_dense_loss_s"]
        assert reached is None or 0 <= reached <= summary["train_seconds"]
        # The saved models load in transformers and in tokdrop, with their tokenizer beside them.
        directory = out / "models" / name
        assert summary["model_dir"] == str(directory) and (directory / "tokenizer.json").is_file()
        transformers.AutoModelForMaskedLM.from_pretrained(directory)
    assert results["variants"]["dense"]["time_to_dense_loss_s"] == results["variants"]["dense"]["train_seconds"]


def test_demo_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--steps", "--seq-len", "--out", "--batch-size", "--seed", "--layers", "--hidden", "--keep"):
        assert flag in text
    assert "(default: 256)" in text  # every flag shows its default


@pytest.mark.parametrize(("flag", "value"), [("--steps", "0"), ("--seq-len", "-4"), ("--batch-size", "two")])
def test_demo_rejects_bad_flag_values_naming_them(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", flag, value])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert flag in error and value in error


def test_tokdrop_without_a_command_shows_usage(capsys):
    with pytest.raises(SystemExit):
        cli.main([])
    assert "demo" in capsys.readouterr().err
