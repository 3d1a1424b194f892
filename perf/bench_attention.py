"""Time our Triton attention against SDPA with a padding mask, varlen_attn (FA2), FlexAttention with a
length mask and xformers (when installed), side by side in one run, in bfloat16.

    python perf/bench_attention.py                       # CUDA: the whole grid, JSON in perf/results/
    python perf/bench_attention.py --head-dims 64 --seq-lens 512
    python perf/bench_attention.py --device cpu --smoke   # tiny shapes under the Triton interpreter

Grid: head_dim x padded length S x query fraction x keys. Sequence b has a random real length in
[S/2, S] (or S with --full-lengths); its queries are ceil(fraction x length) tokens (kept or masked
tokens); its keys are those same tokens ("kept": token-drop middle layers) or the whole sequence
("full": the cross layer, NarrowBERT). Each case times forward and forward+backward.
FLOPs = 4 x NH x D x sum_b(Lq_b x Lk_b) forward, x2.5 more for the backward pass.

Implementations: triton (padded layout), triton_packed (packed layout), and for keys "full" with a
fraction < 1 the fused query gather (triton_gather) against gathering first (gather_then_triton);
sdpa (the dispatcher's padded path), varlen (torch.nn.attention.varlen, packed), flex (compiled,
block mask built outside the timing), xformers (packed, BlockDiagonalMask). Packing, masks and
index tensors are built once, outside the timed region. Every output is checked against sdpa.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import roofline
import torch
from provenance import git_commit  # perf/ is the script's folder, hence on sys.path

REPO = Path(__file__).resolve().parent.parent
FA3_H100_FWD_BWD_TFLOPS = 290.0  # FlashAttention-3 paper, head_dim 64, seqlen 512, non-causal
BASELINES = ("sdpa", "varlen", "flex", "xformers")
# (baseline, minimum fwd+bwd speedup of `triton`) at query fraction <= 0.5, the regime of token
# dropping and NarrowBERT: a subset kernel earns its place only if it at least matches FA2's varlen
# and clearly beats the baselines that compute every padded query.
TARGETS = (("varlen", 1.0), ("flex", 1.5), ("sdpa", 1.5))


class Unavailable(Exception):
    """An implementation that cannot run here; the message says why."""


@dataclass(frozen=True)
class Case:
    head_dim: int
    seq_len: int
    fraction: float
    keys: str  # "kept" or "full"
    full_lengths: bool = False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the code path, times nothing useful")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=768, help="heads = hidden // head_dim")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.15])
    parser.add_argument("--impls", nargs="+", default=None, help="only these implementations")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: perf/results/, smoke: a temp dir)")
    parser.add_argument(
        "--deadline", type=float, default=None, help="seconds: start no case after this, and write what was measured"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.hidden, args.head_dims, args.seq_lens, args.fractions = 2, 128, [64], [40], [0.5]
    return args


class Inputs:
    """One case's tensors in every layout, built once; every float tensor is a leaf with grad."""

    def __init__(self, case: Case, batch: int, heads: int, device: str, seed: int = 0) -> None:
        gen = torch.Generator(device=device).manual_seed(seed)
        s, d = case.seq_len, case.head_dim
        low = s if case.full_lengths else s // 2
        self.lengths = torch.randint(low, s + 1, (batch,), device=device, generator=gen)
        self.q_lens = torch.ceil(self.lengths * case.fraction).int().clamp(min=1)
        self.k_lens = self.q_lens if case.keys == "kept" else self.lengths.int()
        self.lq, self.lk = math.ceil(s * case.fraction), (math.ceil(s * case.fraction) if case.keys == "kept" else s)

        def leaf(*shape: int) -> torch.Tensor:
            x = torch.randn(*shape, heads, d, device=device, generator=gen, dtype=torch.bfloat16)
            return x.requires_grad_()

        # The queries sit at random real positions of the full states (read there by the fused gather).
        self.q_full = leaf(batch, s)
        positions = torch.arange(s, device=device)
        order_key = torch.rand(batch, s, device=device, generator=gen) + (positions >= self.lengths[:, None]) * 2
        self.q_index = order_key.argsort(1)[:, : self.lq]
        gathered = self.q_full.detach().gather(1, self.q_index[:, :, None, None].expand(-1, -1, heads, d))
        self.q, self.k, self.v = gathered.requires_grad_(), leaf(batch, self.lk), leaf(batch, self.lk)
        self.q_valid = torch.arange(self.lq, device=device) < self.q_lens[:, None]
        k_valid = torch.arange(self.lk, device=device) < self.k_lens[:, None]
        self.qp, self.kp, self.vp = (
            x.detach()[m].requires_grad_() for x, m in ((self.q, self.q_valid), (self.k, k_valid), (self.v, k_valid))
        )
        self.cu_q, self.cu_k = (torch.nn.functional.pad(n.cumsum(0), (1, 0)).int() for n in (self.q_lens, self.k_lens))
        self.fwd_flops = 4 * heads * d * int((self.q_lens.long() * self.k_lens.long()).sum())

    def leaves(self) -> list[torch.Tensor]:
        return [self.q, self.k, self.v, self.qp, self.kp, self.vp, self.q_full]

    def as_packed(self, out: torch.Tensor) -> torch.Tensor:
        """Any implementation's output as packed [Tq, NH, D], for the comparisons."""
        return out if out.dim() == 3 else out[self.q_valid]


def implementations(x: Inputs, case: Case) -> dict[str, Callable[[], Callable[[], torch.Tensor]]]:
    """name -> builder of a zero-argument forward function (builders raise Unavailable)."""
    from tokdrop.kernels import backends as dispatch
    from tokdrop.kernels import subset_attention as ta

    # The inputs are valid by construction: no value checks (device syncs) inside the timed calls.
    unchecked = dict(validate=False)

    def triton():
        return lambda: ta.triton_attention(x.q, x.k, x.v, x.q_lens, x.k_lens, **unchecked)[0]

    def triton_packed():
        return lambda: ta.triton_attention_varlen(x.qp, x.kp, x.vp, x.cu_q, x.cu_k, x.lq, x.lk, **unchecked)[0]

    def check_gather_applies():
        if case.keys != "full" or case.fraction == 1.0:
            raise Unavailable("the query gather applies to keys 'full' with a query fraction < 1")

    def triton_gather():
        check_gather_applies()
        return lambda: ta.triton_attention(x.q_full, x.k, x.v, x.q_lens, x.k_lens, q_index=x.q_index, **unchecked)[0]

    def gather_then_triton():
        check_gather_applies()
        index = x.q_index[:, :, None, None].expand(-1, -1, *x.q_full.shape[2:])
        return lambda: ta.triton_attention(x.q_full.gather(1, index), x.k, x.v, x.q_lens, x.k_lens, **unchecked)[0]

    def sdpa():
        return lambda: dispatch.attention(x.q, x.k, x.v, x.q_lens, x.k_lens, backend="sdpa", **unchecked)

    def varlen():
        try:
            dispatch.resolve_backend("varlen", x.q.device.type)
        except ValueError as err:
            raise Unavailable(str(err)) from None
        from torch.nn.attention.varlen import varlen_attn

        return lambda: varlen_attn(x.qp, x.kp, x.vp, x.cu_q, x.cu_k, x.lq, x.lk)

    def flex():
        if not x.q.is_cuda:
            raise Unavailable("FlexAttention has no backward pass on CPU")
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def length_mask(b, h, q_idx, kv_idx):
            return (q_idx < x.q_lens[b]) & (kv_idx < x.k_lens[b])

        block_mask = create_block_mask(length_mask, x.q.shape[0], None, x.lq, x.lk, device=x.q.device)
        torch._dynamo.reset()  # one compilation per case, never the recompile limit
        fn = torch.compile(flex_attention, dynamic=False)
        return lambda: fn(
            x.q.transpose(1, 2), x.k.transpose(1, 2), x.v.transpose(1, 2), block_mask=block_mask
        ).transpose(1, 2)

    def xformers():
        try:
            from xformers.ops import fmha
        except ImportError as err:
            raise Unavailable(f"xformers is not installed ({err})") from err
        if not x.q.is_cuda:
            raise Unavailable("xformers kernels need CUDA")
        bias = fmha.BlockDiagonalMask.from_seqlens(x.q_lens.tolist(), x.k_lens.tolist())
        return lambda: fmha.memory_efficient_attention(x.qp[None], x.kp[None], x.vp[None], attn_bias=bias)[0]

    return {
        f.__name__: f
        for f in (
            triton,
            triton_packed,
            triton_gather,
            gather_then_triton,
            *({"sdpa": sdpa, "varlen": varlen, "flex": flex, "xformers": xformers}[b] for b in BASELINES),
        )
    }


def timer(device: str) -> Callable[[Callable[[], object], list[torch.Tensor]], float]:
    """Median milliseconds of fn: CUDA events through triton.testing.do_bench; wall clock on CPU."""
    if device == "cuda":
        import triton.testing

        return lambda fn, leaves: triton.testing.do_bench(fn, grad_to_none=leaves, return_mode="median")

    def wall(fn, leaves):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return wall


def run_case(case: Case, args: argparse.Namespace, heads: int, time_ms) -> dict[str, object]:
    x = Inputs(case, args.batch, heads, args.device)
    results: dict[str, dict[str, object]] = {}
    outputs: dict[str, torch.Tensor] = {}
    for name, build in implementations(x, case).items():
        if args.impls and name not in args.impls:
            continue
        try:
            forward = build()
        except Unavailable as err:
            results[name] = {"unavailable": str(err)}
            continue
        out = forward()
        outputs[name] = x.as_packed(out).float()
        grad = torch.randn_like(out)

        def forward_backward(forward=forward, grad=grad):
            forward().backward(grad)

        entry = {"fwd_ms": time_ms(forward, x.leaves()), "fwd_bwd_ms": time_ms(forward_backward, x.leaves())}
        entry["fwd_tflops"] = x.fwd_flops / (entry["fwd_ms"] * 1e-3) / 1e12
        entry["fwd_bwd_tflops"] = 3.5 * x.fwd_flops / (entry["fwd_bwd_ms"] * 1e-3) / 1e12
        results[name] = entry
    if "sdpa" in outputs:
        for name, out in outputs.items():
            results[name]["max_abs_diff_vs_sdpa"] = (out - outputs["sdpa"]).abs().max().item()
    ratios = {}
    for key in ("fwd", "fwd_bwd"):
        ours = results.get("triton", {}).get(f"{key}_ms")
        for name, entry in results.items():
            if ours and name != "triton" and f"{key}_ms" in entry:
                ratios[f"{key}_speedup_vs_{name}"] = entry[f"{key}_ms"] / ours
    q_lens, k_lens = x.q_lens.tolist(), x.k_lens.tolist()
    spec = roofline.spec_for(torch.cuda.get_device_name() if args.device == "cuda" else None)
    fwd, both = (f(q_lens, k_lens, heads, case.head_dim) for f in (roofline.attention_fwd, roofline.attention_fwd_bwd))
    predicted = {
        "roofline_device": spec.name,
        "roofline_fwd_ms": fwd.seconds(spec) * 1e3,
        "roofline_fwd_bwd_ms": both.seconds(spec) * 1e3,
        "roofline_bound": {"fwd": fwd.bound(spec), "fwd_bwd": both.bound(spec)},
    }
    for entry in results.values():  # each measured row carries the prediction beside it
        if "fwd_ms" in entry:
            entry["roofline_ms"] = {"fwd": predicted["roofline_fwd_ms"], "fwd_bwd": predicted["roofline_fwd_bwd_ms"]}
    return {
        **asdict(case), "heads": heads, "fwd_flops": x.fwd_flops, **predicted, "results": results, "ratios": ratios,
    }  # fmt: skip


def target_checks(cases: list[dict[str, object]]) -> list[dict[str, object]]:
    checks = []
    for case in cases:
        if case["fraction"] > 0.5:
            continue
        for baseline, minimum in TARGETS:
            speedup = case["ratios"].get(f"fwd_bwd_speedup_vs_{baseline}")
            if speedup is not None:
                checks.append(
                    {
                        "case": {k: case[k] for k in ("head_dim", "seq_len", "fraction", "keys")},
                        "baseline": baseline,
                        "target": minimum,
                        "speedup": speedup,
                        "met": speedup >= minimum,
                    }
                )
    return checks


def gather_comparison(cases: list[dict[str, object]]) -> dict[str, object] | None:
    """Fused query gather against gathering first, fwd+bwd, over the cases that time both."""
    speedups = [
        c["results"]["gather_then_triton"]["fwd_bwd_ms"] / c["results"]["triton_gather"]["fwd_bwd_ms"]
        for c in cases
        if "fwd_bwd_ms" in c["results"].get("triton_gather", {})
        and "fwd_bwd_ms" in c["results"].get("gather_then_triton", {})
    ]
    if not speedups:
        return None
    geomean = math.exp(statistics.fmean(math.log(x) for x in speedups))
    return {
        "cases": len(speedups),
        "fused_faster_in": sum(x > 1.0 for x in speedups),
        "geomean_fwd_bwd_speedup_of_fused": geomean,
        "faster": "fused" if geomean > 1.0 else "gather_then_kernel",
    }


def print_table(cases: list[dict[str, object]]) -> None:
    from tokdrop.cli import format_table

    rows = []
    for case in cases:
        label = f"D={case['head_dim']} S={case['seq_len']} q={case['fraction']} keys={case['keys']}"
        for name, entry in case["results"].items():
            cells = [f"{entry[k]:.3f}" if k in entry else "-" for k in ("fwd_ms", "fwd_bwd_ms")]
            cells += [
                f"{case[k]:.3g}" if "fwd_ms" in entry else "-" for k in ("roofline_fwd_ms", "roofline_fwd_bwd_ms")
            ]
            cells += [f"{entry[k]:.1f}" if k in entry else "-" for k in ("fwd_tflops", "fwd_bwd_tflops")]
            note = entry.get("unavailable", "")[:60]
            rows.append([f"{label} {name}", *cells, note])
    header = ["case / implementation", "fwd ms", "fwd+bwd ms", "roofline fwd", "roofline f+b", "fwd TF/s", "f+b TF/s"]
    print(format_table([*header, "note"], rows))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        if not args.smoke:
            print(
                "bench_attention: CPU timings mean nothing here; use --device cpu --smoke to check the code path",
                file=sys.stderr,
            )
            return 2
        # Must precede the first import of triton (through tokdrop.kernels).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU (or --device cpu --smoke to check the code path)", file=sys.stderr)
        return 2

    import triton

    from tokdrop.files import write_atomically

    time_ms = timer(args.device)
    cases = []
    grid = [
        Case(d, s, f, keys)
        for d in args.head_dims
        for s in args.seq_lens
        for f in args.fractions
        for keys in ("kept", "full")
        if not (keys == "full" and f == 1.0)
    ]  # identical at fraction 1
    if not args.smoke and 64 in args.head_dims:
        grid.append(Case(64, 512, 1.0, "kept", full_lengths=True))  # FA3's published setting
    started = time.monotonic()
    not_run = []
    for case in grid:
        if args.deadline is not None and time.monotonic() - started > args.deadline:
            not_run.append(asdict(case))
            continue
        cases.append(run_case(case, args, args.hidden // case.head_dim, time_ms))
        print(f"done: {case}", flush=True)
    print_table(cases)

    try:
        import xformers

        xformers_version = xformers.__version__
    except ImportError:
        xformers_version = None
    fa3 = [c for c in cases if c["full_lengths"]]
    payload = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter, smoke)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "xformers": xformers_version,
        "git": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dtype": "bfloat16",
        "batch": args.batch,
        "hidden": args.hidden,
        "flops": "fwd = 4*NH*D*sum_b(Lq_b*Lk_b); fwd+bwd = 3.5 x fwd",
        "roofline": "perf/roofline.py: max(FLOPs / peak, compulsory bytes / bandwidth) at the device's ceilings",
        "cases": cases,
        "not_run_past_the_deadline": not_run,
        "targets": target_checks(cases),
        "query_gather": gather_comparison(cases),
        "fa3_comparison": None
        if not fa3
        else {
            "published_h100_fwd_bwd_tflops": FA3_H100_FWD_BWD_TFLOPS,
            "ours_fwd_bwd_tflops": fa3[0]["results"].get("triton", {}).get("fwd_bwd_tflops"),
            "case": "head_dim 64, every sequence 512 tokens, all queries and keys",
        },
    }
    slug = "".join(ch if ch.isalnum() else "_" for ch in payload["device"].lower()).strip("_")
    out = args.out or (
        Path(tempfile.gettempdir()) / "bench_attention_smoke.json"
        if args.smoke
        else REPO / "perf" / "results" / f"bench_attention_{slug}.json"
    )
    for check in payload["targets"]:
        print(
            f"target {'met' if check['met'] else 'MISSED'}: {check['case']} fwd+bwd {check['speedup']:.2f}x "
            f"{check['baseline']} (>= {check['target']})"
        )
    print(f"query gather, fused vs gather first: {payload['query_gather']}")
    write_atomically(out, lambda path: Path(path).write_text(json.dumps(payload, indent=2) + "\n"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
