"""Roofline predictions at an H200's (and an H100's) limits: the attention kernels and
BERT masked-LM training steps per mode, beside which perf/bench_attention.py and
perf/bench_train.py print their measurements.

    python perf/roofline.py                    # both tables, H200 SXM and H100 SXM
    python perf/roofline.py --device h200 --head-dims 64

A kernel's predicted time is max(FLOPs / peak, bytes / bandwidth): a lower bound that assumes full
use of the tensor cores and of HBM, and that each kernel moves only its compulsory traffic (every
input read once, every output written once; tiles re-read from L2 are free). Attention FLOPs are
4*H*D*sum(Lq*Lk) forward (two products) and 2.5x that backward (five products, one recomputed). A
training step is the package's FLOP model (tokdrop.flops.training_flops) at the matmul peak, plus
the memory-bound passes that token dropping adds: the selection (the importance look-up or random
scores, a sort and the index packing of tokdrop.layers.select_tokens), the gather (drop_tokens) and
the scatter (restore_tokens), forward and backward. Elementwise work that every mode shares
(LayerNorm, GELU, softmax, dropout, the optimizer) is left out, as the FLOP model leaves it out.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Iterable


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    tflops: float  # dense bf16/fp16 tensor-core peak, TFLOP/s (no 2:4 sparsity)
    tb_per_s: float  # HBM bandwidth, TB/s


# H200: what the lent H200 machines reach, an 8192^3 bf16 matmul at 769-798 TFLOP/s and a
# device-to-device copy at 4.3 TB/s (read plus written), below the datasheet's 989 dense and
# 4.8 TB/s; predictions at reachable ceilings are the ones a measurement can approach. H100 SXM:
# its datasheet (989 TFLOP/s dense bf16, 3.35 TB/s), never measured here.
DEVICES = {
    "h200": Spec("H200 SXM", 790.0, 4.3),
    "h100": Spec("H100 SXM", 989.4, 3.35),
}
ATTENTION_BACKWARD = 2.5  # the backward's five products (one recomputing P) against the forward's two
ELEMENT = 2  # bytes of a bf16/fp16 attention element
FLOAT = 4  # bytes of the float32 lse and delta
# Under bf16 autocast the residual stream leaves each LayerNorm in float32: the rows that
# drop_tokens and restore_tokens move.
HIDDEN_ELEMENT = 4
INDEX = 8  # int64 positions


def spec_for(device_name: str | None) -> Spec:
    """The spec of a measured device by its name: an H100's, else the H200's."""
    return DEVICES["h100"] if device_name and "H100" in device_name else DEVICES["h200"]


@dataclasses.dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def seconds(self, spec: Spec) -> float:
        return max(self.flops / (spec.tflops * 1e12), self.bytes / (spec.tb_per_s * 1e12))

    def bound(self, spec: Spec) -> str:
        return "flops" if self.flops / (spec.tflops * 1e12) >= self.bytes / (spec.tb_per_s * 1e12) else "bytes"


# ----------------------------------------------------------------------------------------- attention


def attention_fwd(q_lens: Iterable[int], k_lens: Iterable[int], heads: int, head_dim: int) -> Cost:
    """The forward kernel: read Q, K, V, write O and lse, over the real tokens."""
    q_lens, k_lens = list(q_lens), list(k_lens)
    tq, tk = sum(q_lens), sum(k_lens)
    row = heads * head_dim * ELEMENT
    flops = 4 * heads * head_dim * sum(q * k for q, k in zip(q_lens, k_lens, strict=True))
    return Cost(flops, tq * row * 2 + tk * row * 2 + tq * heads * FLOAT)


def attention_bwd(q_lens: Iterable[int], k_lens: Iterable[int], heads: int, head_dim: int) -> Cost:
    """The three backward kernels: preprocess (O, dO -> delta), dK/dV (Q, dO, K, V, lse, delta ->
    dK, dV) and dQ (Q, dO, K, V, lse, delta -> dQ)."""
    q_lens, k_lens = list(q_lens), list(k_lens)
    tq, tk = sum(q_lens), sum(k_lens)
    row, stat = heads * head_dim * ELEMENT, heads * FLOAT
    preprocess = tq * (2 * row + stat)
    dkdv = tq * (2 * row + 2 * stat) + tk * 4 * row
    dq = tq * (3 * row + 2 * stat) + tk * 2 * row
    forward = attention_fwd(q_lens, k_lens, heads, head_dim)
    return Cost(ATTENTION_BACKWARD * forward.flops, preprocess + dkdv + dq)


def attention_fwd_bwd(q_lens, k_lens, heads: int, head_dim: int) -> Cost:
    q_lens, k_lens = list(q_lens), list(k_lens)
    return attention_fwd(q_lens, k_lens, heads, head_dim) + attention_bwd(q_lens, k_lens, heads, head_dim)


def attention_case(batch: int, seq_len: int, fraction: float, keys: str) -> tuple[list[int], list[int]]:
    """Per-sequence (query, key) lengths of full-length sequences: ceil(fraction * S) queries over
    the same tokens ("kept") or over all S ("full")."""
    lq = math.ceil(fraction * seq_len)
    return [lq] * batch, [lq if keys == "kept" else seq_len] * batch


# -------------------------------------------------------------------------------------- token moves


def selection_bytes(batch: int, seq_len: int, kept: int) -> float:
    """tokdrop.layers.select_tokens and its scores, as separate memory-bound passes over [B, S]:
    the scores (an importance look-up by token id, or random numbers: ids read, scores written),
    the padding mask (scores read, written), a stable sort (float keys and int64 indices read and
    written), the rank scatter (indices read, ranks written), the kept mask, and the packing of the
    kept positions (an order key and a second sort), then the [B, K] index written."""
    n = batch * seq_len
    scores = n * (INDEX + FLOAT)
    mask = n * 2 * FLOAT
    sort = 2 * n * (FLOAT + INDEX)
    rank = n * 2 * INDEX
    kept_mask = n * (INDEX + 1)
    pack = n * (1 + INDEX) + 2 * n * 2 * INDEX + batch * kept * INDEX
    return scores + mask + sort + rank + kept_mask + pack


def gather_bytes(batch: int, seq_len: int, rows: int, hidden: int, backward: bool = True) -> float:
    """drop_tokens of `rows` rows per sequence: forward reads the index and the rows and writes
    them; backward builds the inverse index [B, S] and writes the full-size gradient."""
    width = hidden * HIDDEN_ELEMENT
    forward = batch * rows * (INDEX + 2 * width)
    if not backward:
        return forward
    inverse = batch * (seq_len * FLOAT + rows * INDEX)
    return forward + inverse + batch * (rows * width + seq_len * width)


def scatter_bytes(batch: int, seq_len: int, rows: int, hidden: int, backward: bool = True) -> float:
    """restore_tokens of `rows` kept rows per sequence: forward builds the inverse index and writes
    every row once, reading each from kept or saved; backward zeroes the restored rows of the
    gradient (read the others, write all) and gathers the kept rows' gradient."""
    width = hidden * HIDDEN_ELEMENT
    inverse = batch * (seq_len * FLOAT + rows * INDEX)
    forward = inverse + batch * seq_len * 2 * width
    if not backward:
        return forward
    d_saved = inverse + batch * ((seq_len - rows) * width + seq_len * width)
    d_kept = batch * rows * (INDEX + 2 * width)
    return forward + d_saved + d_kept


# ------------------------------------------------------------------------------------ training step


def token_moves(config, seq_len: int, batch: int, predictions: int) -> dict[str, float]:
    """Bytes of the selection, gather and scatter passes of one training step, from the config's
    layer plan: token dropping selects, drops and restores once; random-LTD in every LTD layer;
    NarrowBERT packs its query positions and gathers them once; dense moves nothing."""
    from tokdrop.layers import CROSS, LTD, NARROW, max_kept
    from tokdrop.model import layer_plan

    plan = layer_plan(config)
    hidden = config.hidden_size
    mode = config.token_drop or config.random_ltd
    kept = seq_len if mode is None else max_kept(seq_len, mode.keep)
    events = plan.count(LTD) + plan.count(CROSS)
    moves = {
        "selection": events * selection_bytes(batch, seq_len, kept),
        "gather": events * gather_bytes(batch, seq_len, kept, hidden),
        "scatter": events * scatter_bytes(batch, seq_len, kept, hidden),
    }
    if NARROW in plan:
        moves["selection"] += selection_bytes(batch, seq_len, predictions)
        moves["gather"] += gather_bytes(batch, seq_len, predictions, hidden)
    return moves


def training_step(
    config, seq_len: int, batch: int, predictions: int, spec: Spec, *, decode_every_position: bool = False
) -> dict[str, float]:
    """Predicted seconds of one training step: the FLOP model at the peak plus the token moves at
    the bandwidth (sequential passes, so their times add)."""
    from tokdrop.flops import training_flops

    flops = batch * training_flops(config, seq_len, predictions, decode_every_position=decode_every_position)
    moves = token_moves(config, seq_len, batch, predictions)
    matmul_s = flops / (spec.tflops * 1e12)
    moves_s = sum(moves.values()) / (spec.tb_per_s * 1e12)
    return {"flops": flops, "move_bytes": sum(moves.values()), **moves, "matmul_s": matmul_s, "moves_s": moves_s,
            "seconds": matmul_s + moves_s}  # fmt: skip


def mode_config(mode: str, preset: str = "base", vocab_size: int = 30522):
    """A BERT config of the preset in one of tokdrop's training modes (tokdrop.config.with_mode)."""
    from tokdrop.config import BertConfig, with_mode
    from tokdrop.presets import PRESETS

    base = BertConfig(**PRESETS[preset], vocab_size=vocab_size, max_position_embeddings=512)
    return with_mode(base, mode, allow_ids=(0, 1, 2, 3))


# --------------------------------------------------------------------------------------------- table


ATTENTION_CASES = ((1.0, "full"), (0.5, "full"), (0.15, "full"), (0.5, "kept"), (0.15, "kept"))


def attention_rows(spec: Spec, batch: int, heads: int, head_dims, seq_lens) -> list[list[str]]:
    rows = []
    for d in head_dims:
        for s in seq_lens:
            for fraction, keys in ATTENTION_CASES:
                q_lens, k_lens = attention_case(batch, s, fraction, keys)
                fwd, both = attention_fwd(q_lens, k_lens, heads, d), attention_fwd_bwd(q_lens, k_lens, heads, d)
                rows.append([
                    f"D={d} S={s} q={fraction} keys={keys}", f"{fwd.flops / 1e9:.1f}", f"{fwd.bytes / 1e6:.1f}",
                    f"{fwd.seconds(spec) * 1e3:.4f}", fwd.bound(spec), f"{both.seconds(spec) * 1e3:.4f}",
                    both.bound(spec),
                ])  # fmt: skip
    return rows


def step_rows(spec: Spec, batch: int, seq_lens) -> list[list[str]]:
    from tokdrop.config import MODES
    from tokdrop.data import num_mlm_predictions

    rows = []
    for s in seq_lens:
        predictions = num_mlm_predictions(s)
        dense = training_step(mode_config("dense"), s, batch, predictions, spec)["seconds"]
        for mode in MODES:
            step = training_step(mode_config(mode), s, batch, predictions, spec)
            rows.append([
                f"seq {s} {mode}", f"{step['flops'] / 1e12:.2f}", f"{step['move_bytes'] / 1e6:.1f}",
                f"{step['matmul_s'] * 1e3:.2f}", f"{step['moves_s'] * 1e3:.3f}", f"{step['seconds'] * 1e3:.2f}",
                f"{step['seconds'] / dense:.3f}",
            ])  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", nargs="+", choices=tuple(DEVICES), default=list(DEVICES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512, 1024], help="attention lengths")
    parser.add_argument("--step-seq-lens", type=int, nargs="+", default=[128, 512], help="training-step lengths")
    args = parser.parse_args(argv)
    from tokdrop.cli import format_table

    for name in args.device:
        spec = DEVICES[name]
        print(f"\n{spec.name}: {spec.tflops} TFLOP/s bf16 dense, {spec.tb_per_s} TB/s; B={args.batch} H={args.heads}")
        header = ["attention case", "fwd GFLOP", "fwd MB", "fwd ms", "fwd bound", "fwd+bwd ms", "f+b bound"]
        print(format_table(header, attention_rows(spec, args.batch, args.heads, args.head_dims, args.seq_lens)))
        print(f"\nBERT-base training step, batch {args.batch} (FLOP model + selection/gather/scatter bytes)")
        header = ["step", "TFLOP", "moves MB", "matmul ms", "moves ms", "step ms", "/ dense"]
        print(format_table(header, step_rows(spec, args.batch, args.step_seq_lens)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
