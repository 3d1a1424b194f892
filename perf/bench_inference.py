"""Encoder inference latency and throughput of the serving paths, measured side by side in one run:
PyTorch eager (padded, and unpadded: BertConfig(unpad=True)), torch.compile, ONNX Runtime (plain
and ORT-fused graph), the AOTInductor package (the .pt2 that tokdrop-serve runs, timed through
torch's loader), TensorRT where present, and the NarrowBERT [CLS]-only classifier against the
full-encoder classifier.

    python perf/bench_inference.py                       # CPU, writes perf/results/bench_inference_cpu.json

The model is random-weight BERT of a named size (default `minilm-l12`: 12 layers, hidden 384,
12 heads, FFN 1536, vocab 30522, 512 positions, i.e. all-MiniLM-L12-v2's shape; NarrowBERT with 2
full layers). Batches are right-padded with a spread of lengths (the longest is the full length).
Every timed repetition runs each variant once, in a rotating order, so machine noise hits them
alike; medians and ratios to eager are reported next to the targets:

  ONNX Runtime and AOTInductor latency <= 0.9x PyTorch eager at (1, 128)
  NarrowBERT [CLS]-only classification throughput >= 2.5x the full encoder's at (32, 512)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from provenance import cpu_name, git_commit  # perf/ is the script's folder, hence on sys.path

import tokdrop
from tokdrop.export import make_inputs, make_session, to_aoti, to_onnx
from tokdrop.export.heads import EncoderHead
from tokdrop.export.onnx_export import run_session
from tokdrop.files import write_atomically

REPO = Path(__file__).resolve().parent.parent
SIZES = {
    "minilm-l12": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1536),
    "minilm-l6": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
ENCODER_SHAPES = ((1, 128), (32, 128), (8, 512))
NARROW_SHAPES = ((1, 128), (32, 128), (8, 512), (32, 512))
ENCODER_VARIANTS = ("eager", "eager_unpadded", "compile", "onnx", "onnx_fused", "aoti", "tensorrt")
CLASSIFIER_VARIANTS = ("cls_full_eager", "cls_narrow_eager", "cls_full_onnx", "cls_narrow_onnx")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=tuple(SIZES), default="minilm-l12", help="model shape")
    parser.add_argument("--full-layers", type=int, default=2, help="NarrowBERT full layers")
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions per shape")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads (torch and ORT)")
    parser.add_argument("--skip", default="", help="comma-separated variants to leave out")
    parser.add_argument(
        "--json", type=Path, default=None, help="results file (default perf/results/bench_inference_<device>.json)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where exports go (default: a temp dir)")
    parser.add_argument("--reuse", action="store_true", help="reuse exports already in --workdir")
    parser.add_argument(
        "--gap",
        type=float,
        default=0.05,
        help="seconds of idle between timed calls, so that one variant's spinning worker "
        "threads (ONNX Runtime, OpenMP) do not steal the cores of the next",
    )
    return parser.parse_args(argv)


def batch(config: tokdrop.BertConfig, size: int, seq: int) -> tuple[torch.Tensor, ...]:
    """Right-padded batch: lengths spread between seq/2 and seq, the first row full."""
    lengths = [seq] + [max(1, seq // 2 + (i * 37) % max(1, seq // 2)) for i in range(1, size)]
    return make_inputs(config, lengths, seq, seed=size * 1000 + seq)


def time_variants(
    fns: dict[str, Callable[[], object]], repeat: int, warmup: int, gap: float = 0.0
) -> dict[str, list[float]]:
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeat):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            time.sleep(gap)
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def summarise(times: list[float], size: int) -> dict[str, float]:
    median = statistics.median(times)
    return {
        "median_ms": 1e3 * median,
        "min_ms": 1e3 * min(times),
        "max_ms": 1e3 * max(times),
        "sequences_per_s": size / median,
        "repeats": len(times),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - {*ENCODER_VARIANTS, *CLASSIFIER_VARIANTS}
    if unknown:
        raise SystemExit(
            f"--skip names unknown variants {sorted(unknown)}; known: {ENCODER_VARIANTS + CLASSIFIER_VARIANTS}"
        )
    torch.set_num_threads(args.threads)
    device = "cpu"
    base = tokdrop.BertConfig(
        **SIZES[args.size],
        vocab_size=30522,
        max_position_embeddings=512,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_backend="sdpa",
    )
    max_batch = max(b for b, _ in NARROW_SHAPES)
    max_seq = max(s for _, s in NARROW_SHAPES)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tokdrop_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "benchmark": "bench_inference",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": cpu_name(),
        "device_type": device,
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git": git_commit(),
        "note": "ONNX Runtime sessions run with spinning off and calls are spaced by --gap, so that idle "
        "worker threads do not take the cores of the next variant; exports are not re-validated here "
        "(tests/test_export_*.py validate them); AOTInductor is timed through torch's package loader, "
        "the same compiled .so that tokdrop-serve runs",
        "model": {
            "size": args.size,
            **SIZES[args.size],
            "vocab_size": 30522,
            "weights": "random",
            "narrow_full_layers": args.full_layers,
        },
        "encoder": {},
        "classifier": {},
        "skipped": {},
        "export_seconds": {},
        "load_average_start": os.getloadavg(),
    }
    try:
        import onnxruntime

        results["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        skip |= {"onnx", "onnx_fused", "cls_full_onnx", "cls_narrow_onnx"}
        results["skipped"]["onnx"] = "onnxruntime is not installed"

    torch.manual_seed(0)
    encoder = tokdrop.BertModel(base).eval()
    unpadded = tokdrop.BertModel(dataclasses.replace(base, unpad=True)).eval()
    unpadded.load_state_dict(encoder.state_dict())
    dense_cls = tokdrop.BertForSequenceClassification(base).eval()
    narrow_cls = tokdrop.BertForSequenceClassification(
        dataclasses.replace(base, narrow=tokdrop.NarrowConfig(full_layers=args.full_layers))
    ).eval()
    narrow_cls.load_state_dict(dense_cls.state_dict())  # same weights: only the queries differ

    def export(name: str, fn: Callable[[], object], target: str) -> bool:
        if name in skip:
            return False
        if args.reuse and (workdir / target).is_file():
            print(f"reusing {workdir / target}", flush=True)
            return True
        print(f"exporting {name} ...", flush=True)
        start = time.perf_counter()
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - a failed variant is recorded, the rest still run
            results["skipped"][name] = f"{type(err).__name__}: {err}"
            print(f"  {name} skipped: {err}", flush=True)
            return False
        results["export_seconds"][name] = round(time.perf_counter() - start, 1)
        return True

    fns_encoder: dict[str, Callable[[tuple], object]] = {}
    with torch.inference_mode():
        fns_encoder["eager"] = lambda x: encoder(*x)
        fns_encoder["eager_unpadded"] = lambda x: unpadded(*x)
    if "compile" not in skip:
        compiled = torch.compile(EncoderHead(encoder), dynamic=True)
        fns_encoder["compile"] = lambda x: compiled(*x)
    sessions = {}

    def add_onnx(fns: dict, name: str, model, file: str, **options) -> None:
        path = workdir / file
        common = dict(max_batch=max_batch, max_seq_len=max_seq, validate_export=False)
        if export(name, lambda: to_onnx(model, path, **common, **options), file):
            sessions[name] = make_session(path, threads=args.threads, spin=False)
            fns[name] = lambda x: run_session(sessions[name], *x)

    add_onnx(fns_encoder, "onnx", encoder, "encoder.onnx")
    add_onnx(fns_encoder, "onnx_fused", encoder, "encoder_fused.onnx", optimize=True)
    if export(
        "aoti",
        lambda: to_aoti(
            encoder, workdir / "encoder.pt2", max_batch=max_batch, max_seq_len=max_seq, validate_export=False
        ),
        "encoder.pt2",
    ):
        package = torch._inductor.aoti_load_package(str(workdir / "encoder.pt2"))
        fns_encoder["aoti"] = lambda x: package(*x)
    if "tensorrt" not in skip:
        results["skipped"]["tensorrt"] = (
            "needs torch-tensorrt and an NVIDIA GPU; this run is on the CPU (no TensorRT here)"
        )
    fns_cls: dict[str, Callable[[tuple], object]] = {
        "cls_full_eager": lambda x: dense_cls(*x).logits,
        "cls_narrow_eager": lambda x: narrow_cls(*x).logits,
    }
    add_onnx(fns_cls, "cls_full_onnx", dense_cls, "cls_full.onnx")
    add_onnx(fns_cls, "cls_narrow_onnx", narrow_cls, "cls_narrow.onnx", head="narrow-cls")
    fns_cls = {k: v for k, v in fns_cls.items() if k not in skip}
    fns_encoder = {k: v for k, v in fns_encoder.items() if k not in skip}

    with torch.inference_mode():
        for section, shapes, fns in (("encoder", ENCODER_SHAPES, fns_encoder), ("classifier", NARROW_SHAPES, fns_cls)):
            for size, seq in shapes:
                inputs = batch(base, size, seq)
                # big shapes: fewer repetitions (each call takes seconds on a CPU)
                scale = max(1, (size * seq) // 4096)
                repeat = args.repeat * 4 if size * seq <= 512 else max(2, args.repeat // scale)
                warmup = 1 if scale > 1 else args.warmup
                print(f"{section} batch {size} x seq {seq}: {', '.join(fns)} ({repeat} repeats)", flush=True)
                times = time_variants(
                    {k: (lambda f=f, x=inputs: f(x)) for k, f in fns.items()}, repeat, warmup, args.gap
                )
                row = {k: summarise(v, size) for k, v in times.items()}
                ref = "eager" if section == "encoder" else "cls_full_eager"
                for k in row:
                    row[k]["latency_vs_eager"] = row[k]["median_ms"] / row[ref]["median_ms"]
                    row[k]["min_latency_vs_eager"] = row[k]["min_ms"] / row[ref]["min_ms"]
                results[section][f"{size}x{seq}"] = row

    results["load_average_end"] = os.getloadavg()
    if max(results["load_average_start"][0], results["load_average_end"][0]) > args.threads:
        results["warning"] = (
            f"the machine was busy (load average {results['load_average_start'][0]:.1f} at the "
            f"start, {results['load_average_end'][0]:.1f} at the end, {args.threads} threads): "
            f"absolute times are inflated; ratios of interleaved runs are the figures"
        )
    enc = results["encoder"].get("1x128", {})
    cls = results["classifier"].get("32x512", {})
    results["targets"] = {
        "onnx_latency_vs_eager_at_1x128 <= 0.9": _target(enc, "onnx", "latency_vs_eager", 0.9, "<="),
        "onnx_fused_latency_vs_eager_at_1x128 <= 0.9": _target(enc, "onnx_fused", "latency_vs_eager", 0.9, "<="),
        "aoti_latency_vs_eager_at_1x128 <= 0.9": _target(enc, "aoti", "latency_vs_eager", 0.9, "<="),
        "narrow_cls_throughput_vs_full_at_32x512 >= 2.5": _ratio(cls, "cls_narrow_eager", "cls_full_eager"),
        "narrow_cls_onnx_throughput_vs_full_onnx_at_32x512 >= 2.5": _ratio(cls, "cls_narrow_onnx", "cls_full_onnx"),
    }
    path = args.json or REPO / "perf" / "results" / f"bench_inference_{device}.json"
    write_atomically(path, lambda p: Path(p).write_text(json.dumps(results, indent=2) + "\n"))
    print(_table(results))
    print(f"wrote {path}")
    return results


def _target(row: dict, name: str, key: str, bound: float, op: str) -> dict | None:
    if name not in row:
        return None
    value, best = row[name][key], row[name]["min_" + key]
    return {
        "value": round(value, 3),
        "met": value <= bound if op == "<=" else value >= bound,
        "value_from_min_times": round(best, 3),
    }


def _ratio(row: dict, num: str, den: str) -> dict | None:
    if num not in row or den not in row:
        return None
    value = row[num]["sequences_per_s"] / row[den]["sequences_per_s"]
    best = row[den]["min_ms"] / row[num]["min_ms"]
    return {"value": round(value, 3), "met": value >= 2.5, "value_from_min_times": round(best, 3)}


def _table(results: dict) -> str:
    lines = [f"{results['model']['size']} ({results['device']}, {results['threads']} threads)"]
    for section in ("encoder", "classifier"):
        for shape, row in results[section].items():
            cells = ", ".join(f"{k} {v['median_ms']:.1f} ms ({v['latency_vs_eager']:.2f}x)" for k, v in row.items())
            lines.append(f"  {section} {shape}: {cells}")
    for name, value in results["targets"].items():
        lines.append(f"  target {name}: {value}")
    if "warning" in results:
        lines.append(f"  WARNING: {results['warning']}")
    for name, why in results["skipped"].items():
        lines.append(f"  skipped {name}: {why}")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
