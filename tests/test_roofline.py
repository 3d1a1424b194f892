"""perf/roofline.py: the roofline at the H200's published limits, against hand computations and the
orderings it must keep (flop-bound long attention, byte-bound token moves, cheaper dropping modes)."""

import importlib
import math
import pathlib

import pytest

PERF = pathlib.Path(__file__).resolve().parents[1] / "perf"


@pytest.fixture(scope="module")
def roofline():
    import sys

    sys.path.insert(0, str(PERF))
    try:
        yield importlib.import_module("roofline")
    finally:
        sys.path.remove(str(PERF))


def test_attention_forward_by_hand(roofline):
    # One sequence of 128 queries and keys, 12 heads of 64: 4*H*D*Lq*Lk FLOPs; Q, K, V and O in
    # bf16 plus the float32 lse.
    cost = roofline.attention_fwd([128], [128], 12, 64)
    assert cost.flops == 4 * 12 * 64 * 128 * 128 == 50_331_648
    assert cost.bytes == 4 * 128 * 12 * 64 * 2 + 128 * 12 * 4 == 792_576
    h200 = roofline.DEVICES["h200"]
    assert cost.seconds(h200) == pytest.approx(792_576 / 4.3e12)
    assert cost.bound(h200) == "bytes"


def test_backward_costs_two_and_a_half_forwards(roofline):
    fwd = roofline.attention_fwd([512] * 4, [512] * 4, 12, 64)
    both = roofline.attention_fwd_bwd([512] * 4, [512] * 4, 12, 64)
    assert both.flops == pytest.approx(3.5 * fwd.flops)
    assert both.bytes > 3 * fwd.bytes  # three backward kernels re-read the inputs


def test_long_attention_is_flop_bound_and_short_subsets_byte_bound(roofline):
    h200 = roofline.DEVICES["h200"]
    long = roofline.attention_fwd_bwd(*roofline.attention_case(32, 1024, 1.0, "full"), 12, 64)
    assert long.bound(h200) == "flops"
    assert long.seconds(h200) == pytest.approx(long.flops / 790e12)
    short = roofline.attention_fwd_bwd(*roofline.attention_case(32, 128, 0.15, "full"), 12, 64)
    assert short.bound(h200) == "bytes"
    # The H100's datasheet has less bandwidth and more peak than the H200's measured ceilings:
    # byte-bound cases scale with the one, flop-bound ones with the other.
    h100 = roofline.DEVICES["h100"]
    assert short.seconds(h100) == pytest.approx(short.seconds(h200) * 4.3 / 3.35)
    assert long.seconds(h100) == pytest.approx(long.seconds(h200) * 790 / 989.4)


def test_gather_and_scatter_by_hand(roofline):
    # 2 rows of 8 float32 features out of 4 positions: the index and each row read and written.
    assert roofline.gather_bytes(1, 4, 2, 8, backward=False) == 2 * (8 + 2 * 8 * 4)
    # restore: the inverse index [S] int32 + slots, every row read once and written once.
    assert roofline.scatter_bytes(1, 4, 2, 8, backward=False) == 4 * 4 + 2 * 8 + 4 * 2 * 8 * 4
    assert roofline.gather_bytes(1, 4, 2, 8) > roofline.gather_bytes(1, 4, 2, 8, backward=False)


def test_training_step_orderings(roofline):
    from tokdrop.data import num_mlm_predictions
    from tokdrop.flops import training_flops

    h200 = roofline.DEVICES["h200"]
    for seq in (128, 512):
        p = num_mlm_predictions(seq)
        steps = {m: roofline.training_step(roofline.mode_config(m), seq, 32, p, h200) for m in roofline_modes()}
        dense = steps["dense"]
        # The FLOP term is the package's FLOP model at the peak.
        flops = 32 * training_flops(roofline.mode_config("dense"), seq, p)
        assert dense["matmul_s"] == pytest.approx(flops / 790e12)
        assert steps["narrow"]["seconds"] < steps["token_drop"]["seconds"] < dense["seconds"]
        assert steps["random_ltd"]["seconds"] < dense["seconds"]
        # Token dropping moves its tokens once: under 3% of its step; random-LTD moves them in 10
        # layers and pays several times more for it.
        drop = steps["token_drop"]
        assert 0 < drop["moves_s"] < 0.03 * drop["seconds"]
        assert steps["random_ltd"]["moves_s"] > 5 * drop["moves_s"]
        assert all(math.isfinite(s["seconds"]) for s in steps.values())


def roofline_modes():
    from tokdrop.config import MODES

    return MODES


def test_prints_the_tables(roofline, capsys):
    assert roofline.main(["--device", "h200", "--head-dims", "64", "--seq-lens", "128"]) == 0
    out = capsys.readouterr().out
    assert "H200 SXM" in out and "D=64 S=128 q=0.15 keys=full" in out and "seq 512 token_drop" in out
