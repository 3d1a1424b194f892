"""perf/bench_step.py with tiny settings: it runs every variant (BERT's and RoBERTa's) and writes the
promised JSON."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "perf" / "bench_step.py"


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCH.parent))  # like a script: its siblings are importable
        yield importlib.import_module("bench_step")


def test_bench_writes_medians_ratios_and_provenance(bench, tmp_path, capsys):
    out = tmp_path / "results" / "bench.json"
    tiny = [
        "--device", "cpu", "--json", str(out), "--layers", "4", "--hidden", "32", "--heads", "2",
        "--intermediate", "64", "--vocab-size", "200", "--seq-len", "32", "--batch-size", "2",
        "--predictions", "5", "--warmup", "1", "--reps", "2",
    ]  # fmt: skip
    bench.main(tiny)
    results = json.loads(out.read_text())

    assert set(results["median_step_s"]) == {
        "transformers", "dense_full_last", "dense", "token_drop", "narrow", "random_ltd", "roberta",
        "roberta_token_drop",
    }  # fmt: skip
    assert all(len(times) == 2 for times in results["step_s"].values())
    assert all(math.isfinite(s) and s > 0 for s in results["median_step_s"].values())
    assert all(results["min_step_s"][name] <= s for name, s in results["median_step_s"].items())
    assert set(results["ratios"]) == {
        "token_drop/dense", "roberta_token_drop/roberta", "narrow/dense", "random_ltd/dense",
        "dense/dense_full_last", "dense/transformers",
    }  # fmt: skip
    assert results["ratios"]["dense/dense_full_last"]["target"] == pytest.approx(1 - 0.6 / 4)
    roberta, bert = results["ratios"]["roberta_token_drop/roberta"], results["ratios"]["token_drop/dense"]
    assert roberta["target"] == bert["target"]
    assert roberta["flop_model"] == pytest.approx(bert["flop_model"])  # the same sizes, the same FLOPs
    for ratio in results["ratios"].values():
        assert math.isfinite(ratio["measured"]) and math.isfinite(ratio["measured_fastest"])
        assert 0 < ratio["flop_model"] < 1
        assert isinstance(ratio["meets_target"], bool) or ratio["target"] is ratio["meets_target"] is None
    assert results["device"] and results["torch"] and results["date"]
    assert set(results["git"]) == {"commit", "dirty"}
    assert results["arguments"]["predictions"] == 5
    printed = capsys.readouterr().out
    assert "token_drop/dense" in printed and "FLOP model" in printed
    assert "roberta_token_drop/roberta" in printed


def test_roberta_variants_are_roberta_models_on_roberta_batches(bench):
    """RoBERTa's rows train RobertaForMaskedLM on batches with its special ids: padding id 1 (never
    in a full row), <s> and </s> at the ends, position embeddings for --seq-len tokens after the
    offset of 2; the words and masked positions are those of the BERT batch."""
    from tokdrop.config import RobertaConfig
    from tokdrop.model import RobertaForMaskedLM
    from tokdrop.training import build_model, config_from_arguments

    args = bench.parse_args(["--device", "cpu", "--vocab-size", "200", "--seq-len", "16", "--predictions", "3"])
    config = config_from_arguments(
        args, vocab_size=200, seq_len=16, max_predictions_per_seq=3, pad_token_id=1, config_class=RobertaConfig
    )
    assert isinstance(config, RobertaConfig) and config.max_position_embeddings == 18
    assert config.max_sequence_length == 16 and config.type_vocab_size == 1
    assert isinstance(build_model(config, seed=0), RobertaForMaskedLM)
    bert, roberta = bench.random_batch(args), bench.random_batch(args, bench.ROBERTA_SPECIALS)
    assert (roberta["input_ids"][:, 0] == 0).all() and (roberta["input_ids"][:, -1] == 2).all()
    assert (roberta["attention_mask"] == 1).all() and (roberta["token_type_ids"] == 0).all()
    assert (roberta["labels"] == bert["labels"]).all()
    assert (roberta["input_ids"][:, 1:-1] == bert["input_ids"][:, 1:-1]).all()


def test_flop_model_ratios_of_the_default_config(bench):
    """Forward FLOPs alone give 0.77, 0.51 and 0.59 with the full last layer; with the backward pass
    at 2x the forward for matrix products and 2.5x for attention, the training-step model gives 0.76,
    0.51 and 0.60."""
    from tokdrop.config import with_mode
    from tokdrop.flops import training_flops
    from tokdrop.training import config_from_arguments

    args = bench.parse_args([])
    base = config_from_arguments(args, vocab_size=args.vocab_size, seq_len=512, max_predictions_per_seq=77)
    base = dataclasses.replace(base, last_layer_subset=False)
    flops = {
        name: training_flops(c, 512, 77)
        for name, c in ((m, with_mode(base, m)) for m in ("dense", "token_drop", "narrow"))
    }
    transformers = training_flops(base, 512, 77, decode_every_position=True)
    assert flops["token_drop"] / flops["dense"] == pytest.approx(0.763, abs=5e-3)
    assert flops["narrow"] / flops["dense"] == pytest.approx(0.506, abs=5e-3)
    assert flops["dense"] / transformers == pytest.approx(0.597, abs=5e-3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--predictions", "40", "--seq-len", "32"], "--predictions 40 exceeds"),
        (["--warmup", "-1"], "--warmup"),
    ],
)
def test_bench_rejects_inconsistent_flags(bench, argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err
