"""Turn the benchmarks' JSON under perf/results/ into perf/REPORT.md and its PNG plots.

    python perf/report.py                          # reads perf/results/, writes perf/REPORT.md + perf/report_*.png
    python perf/report.py --results DIR --out DIR

Reads whichever of bench_quality*, bench_train*, bench_step*, bench_attention*, bench_unpad*,
bench_inference*, bench_scaling* and static_sm90* exist. Every table and plot names its source file, device,
versions and commit; what no file covers yet is listed under "Not measured yet". Nothing here is
typed by hand: only the files' figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

PERF = Path(__file__).resolve().parent
KINDS = (
    "bench_quality",
    "bench_train",
    "bench_step",
    "bench_attention",
    "bench_unpad",
    "bench_inference",
    "bench_scaling",
)


def load(results_dir: Path) -> dict[str, list[tuple[Path, dict]]]:
    """Results files by benchmark kind; unreadable files are reported and skipped."""
    found: dict[str, list[tuple[Path, dict]]] = {kind: [] for kind in KINDS}
    for path in sorted(results_dir.glob("*.json")):
        kind = next((k for k in KINDS if path.name.startswith(k)), None)
        if kind is None:
            continue
        try:
            found[kind].append((path, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as err:
            print(f"report: skipping {path}: {err}", file=sys.stderr)
    return found


def provenance(path: Path, data: dict) -> str:
    """One line naming a figure's source: file, device, versions, commit (and whether it was dirty)."""
    git = data.get("git") or {}
    commit = (git.get("commit") or "unknown")[:10] + (" (uncommitted changes)" if git.get("dirty") else "")
    versions = ", ".join(f"{name} {data[name]}" for name in ("torch", "triton", "transformers") if data.get(name))
    return (
        f"Source: `perf/results/{path.name}`; device {data.get('device', 'unknown')}; {versions}; "
        f"commit {commit}; {data.get('date', 'undated')}."
    )


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def number(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def bar_plot(out: Path, title: str, ylabel: str, panels: list[tuple[str, dict[str, dict[str, float]]]]) -> None:
    """Grouped bars, one panel per source: groups are keys (sequence lengths), bars are variants."""
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (subtitle, groups) in zip(axes[0], panels, strict=True):
        names = sorted({name for bars in groups.values() for name in bars})
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            xs = [g + i * width for g, bars in enumerate(groups.values()) if name in bars]
            ax.bar(xs, [bars[name] for bars in groups.values() if name in bars], width, label=name)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], list(groups))
        ax.set_title(subtitle, fontsize=9)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------- sections


def quality_section(files: list[tuple[Path, dict]], out: Path, missing: list[str]) -> list[str]:
    lines = ["## Quality at equal cost (perf/bench_quality.py)"]
    for path, data in files:
        minutes = data["arguments"]["minutes"]
        lines += [
            "",
            provenance(path, data),
            "",
            f"{minutes:g} minutes of training per variant, steps interleaved; held-out masked-LM loss (nats) "
            f"over {data['data']['held_out_predictions']} predictions; unigram (no context) "
            f"{data['unigram_loss']:.3f}.",
            "",
            table(
                ["variant", "steps", "final loss", "accuracy", "loss @ equal time", "loss @ equal FLOPs",
                 "time to dense's loss", "goal"],
                [
                    [
                        name,
                        str(v["steps"]),
                        number(v["final_held_out_loss"], ".3f"),
                        number(v["final_held_out_accuracy"], ".3f"),
                        number(v["held_out_loss_at_equal_time"], ".3f"),
                        number(v["held_out_loss_at_equal_flops"], ".3f"),
                        "not reached" if v["time_to_dense_final_loss_vs_dense"] is None
                        else f"{v['time_to_dense_final_loss_vs_dense']:.2f}x",
                        "-" if v["goal_vs_dense"] is None
                        else f"<= {v['goal_vs_dense']}: {'met' if v['meets_goal'] else 'missed'}",
                    ]
                    for name, v in data["variants"].items()
                ],
            ),
        ]  # fmt: skip
        plot = path.with_suffix(".png")
        if plot.is_file():
            lines += ["", f"![held-out loss against time and FLOPs](results/{plot.name})"]
        if "finetune" in data:
            tasks = sorted({task for per in data["finetune"].values() for task in per})
            lines += [
                "",
                "Fine-tuned on the downstream tasks (test accuracy, mean +- half the range over seeds):",
                "",
                table(
                    ["variant", *tasks],
                    [
                        [name, *(f"{per[t]['mean']:.3f} +- {per[t]['spread']:.3f}" for t in tasks)]
                        for name, per in data["finetune"].items()
                    ],
                ),
            ]
    if not files:
        missing.append("Quality at equal cost (`perf/bench_quality.py`).")
        lines += ["", "No results yet."]
    return lines


def train_section(files: list[tuple[Path, dict]], out: Path, missing: list[str]) -> list[str]:
    lines = ["## Training step (perf/bench_train.py)"]
    step_panels, token_panels, memory_panels = [], [], []
    for path, data in files:
        peak = data["matmul_peak"]
        lines += [
            "",
            f"### {data['device']} ({data['precision']})",
            "",
            provenance(path, data),
            "",
            f"Matmul peak measured in the same run: {peak['tflops']:.3g} TFLOP/s ({peak['dtype']}, "
            f"{peak['size']}x{peak['size']}); MFU is against it.",
        ]
        steps, tokens, memory = {}, {}, {}
        for seq, run in data["runs"].items():
            group = f"seq {seq}"
            rows = []
            for name, v in run["variants"].items():
                if "median_step_s" not in v:
                    rows.append([name, "-", "-", "-", "-", "-", v.get("error", "")[:80]])
                    continue
                memory_gib = None if v["peak_memory_bytes"] is None else v["peak_memory_bytes"] / 2**30
                rows.append(
                    [
                        name,
                        number(v["median_step_s"] * 1e3, ".1f"),
                        number(v["tokens_per_s"], ".0f"),
                        number(v["tflops"]),
                        number(v["mfu"], ".1%"),
                        number(memory_gib),
                        "",
                    ]
                )
                steps.setdefault(group, {})[name] = v["median_step_s"] * 1e3
                tokens.setdefault(group, {})[name] = v["tokens_per_s"]
                if memory_gib is not None:
                    memory.setdefault(group, {})[name] = memory_gib
            rows += [[name, "-", "-", "-", "-", "-", f"skipped: {why}"] for name, why in run["skipped"].items()]
            lines += [
                "",
                f"Sequence length {seq}, batch {run['batch']}:",
                "",
                table(["variant", "median step (ms)", "tokens/s", "TFLOP/s", "MFU", "peak GiB", "note"], rows),
            ]
            if "max_batch" in run:
                lines += [
                    "",
                    f"Largest batch that fits, sequence length {seq}:",
                    "",
                    table(
                        ["variant", "batch", "tokens/s", "MFU", "note"],
                        [
                            [
                                name,
                                str(v.get("largest_batch", "-")),
                                number(v.get("tokens_per_s"), ".0f"),
                                number(v.get("mfu"), ".1%"),
                                v.get("error", v.get("note", ""))[:80],
                            ]
                            for name, v in run["max_batch"].items()
                        ],
                    ),
                ]
        lines += [
            "",
            "Targets (each model at its fastest compile mode; pass/miss only on a GPU):",
            "",
            table(
                ["target", "seq", "measured", "FLOP model", "target", "result"],
                [
                    [
                        c["name"],
                        str(c["seq_len"]),
                        number(c["measured"]),
                        number(c["flop_model"]),
                        "-" if c["target"] is None else f"{c['direction']} {c['target']}",
                        {True: "pass", False: "**miss**", None: "n/a"}[c["met"]],
                    ]
                    for c in data["targets"]
                ],
            ),
        ]
        subtitle = f"{path.name}: {data['device']}\ncommit {(data['git'].get('commit') or '?')[:10]}"
        step_panels.append((subtitle, steps))
        token_panels.append((subtitle, tokens))
        if memory:
            memory_panels.append((subtitle, memory))
    if not files:
        missing.append("Training step times, tokens/s and MFU (`perf/bench_train.py`): no results file.")
        return lines + ["", "No results yet."]
    if not any(data["device_type"] == "cuda" for _, data in files):
        missing.append(
            "GPU training figures (`python perf/bench_train.py` on CUDA): step time, tokens/s, "
            "MFU against the bf16 peak, peak memory, largest batch, and every target's pass/miss."
        )
    bar_plot(out / "report_step_time.png", "Median training step time", "ms", step_panels)
    bar_plot(out / "report_tokens_per_s.png", "Training throughput", "tokens/s", token_panels)
    lines += ["", "![step time](report_step_time.png)", "", "![tokens/s](report_tokens_per_s.png)"]
    if memory_panels:
        bar_plot(out / "report_memory.png", "Peak memory of a training step", "GiB", memory_panels)
        lines += ["", "![memory](report_memory.png)"]
    else:
        missing.append("Peak memory per variant: measured on CUDA only.")
    lines += ["", "Plot panels are titled with their source file, device and commit; versions as above."]
    return lines


def step_section(files: list[tuple[Path, dict]], out: Path, missing: list[str]) -> list[str]:
    lines = ["## Step benchmark, small model (perf/bench_step.py)"]
    for path, data in files:
        tokens = data["tokens_per_step"]
        lines += [
            "",
            provenance(path, data),
            "",
            table(
                ["variant", "median step (ms)", "tokens/s"],
                [
                    [name, number(s * 1e3, ".1f"), number(tokens / s, ".0f")]
                    for name, s in data["median_step_s"].items()
                ],
            ),
            "",
            table(
                ["ratio", "measured", "FLOP model", "target", "met"],
                [
                    [
                        name,
                        number(r["measured"]),
                        number(r["flop_model"]),
                        "-" if r["target"] is None else f"<= {r['target']}",
                        "-" if r["target"] is None else "yes" if r["meets_target"] else "no",
                    ]
                    for name, r in data["ratios"].items()
                ],
            ),
        ]
    if not files:
        missing.append("Small-model step ratios (`perf/bench_step.py --json perf/results/bench_step_cpu.json`).")
        lines += ["", "No results yet."]
    return lines


def attention_section(
    files: list[tuple[Path, dict]], out: Path, missing: list[str], peaks: dict[str, float]
) -> list[str]:
    lines = ["## Attention kernels (perf/bench_attention.py)"]
    panels = []
    for path, data in files:
        rows, bars = [], {}
        for case in data["cases"]:
            label = f"D{case['head_dim']} S{case['seq_len']} q{case['fraction']} {case['keys']}"
            for name, entry in case["results"].items():
                rows.append(
                    [
                        label,
                        name,
                        number(entry.get("fwd_tflops")),
                        number(entry.get("fwd_bwd_tflops")),
                        entry.get("unavailable", "")[:60],
                    ]
                )
                if "fwd_bwd_tflops" in entry:
                    bars.setdefault(label, {})[name] = entry["fwd_bwd_tflops"]
        lines += [
            "",
            provenance(path, data),
            "",
            table(["case", "implementation", "fwd TFLOP/s", "fwd+bwd TFLOP/s", "note"], rows),
        ]
        panels.append((path.name, data["device"], bars))
    if not files:
        missing.append("Attention kernel TFLOP/s (`perf/bench_attention.py` on CUDA).")
        return lines + ["", "No results yet."]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 4.5 * len(panels)), squeeze=False)
    for ax, (name, device, bars) in zip(axes[:, 0], panels, strict=True):
        impls = sorted({i for b in bars.values() for i in b})
        width = 0.8 / max(1, len(impls))
        for i, impl in enumerate(impls):
            xs = [g + i * width for g, b in enumerate(bars.values()) if impl in b]
            ax.bar(xs, [b[impl] for b in bars.values() if impl in b], width, label=impl)
        ax.set_xticks(range(len(bars)), list(bars), rotation=45, ha="right", fontsize=7)
        if device in peaks:  # a peak measured on the same device by bench_train
            ax.axhline(peaks[device], color="black", linestyle="--", label="bf16 matmul peak (bench_train)")
        ax.set_title(f"{name}: {device}", fontsize=9)
        ax.set_ylabel("fwd+bwd TFLOP/s")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "report_kernel_tflops.png", dpi=110)
    plt.close(fig)
    if not any(data["device"] in peaks for _, data in files):
        missing.append("The bf16 matmul peak on the attention benchmark's device (from a CUDA bench_train run).")
    return lines + ["", "![kernel TFLOP/s](report_kernel_tflops.png)"]


def static_section(results_dir: Path, missing: list[str]) -> list[str]:
    """perf/static_sm90.py's reports: per kernel, the worst of its shipped configurations."""
    lines = ["## Static sm_90 report (perf/static_sm90.py, compiled without a GPU)"]
    paths = sorted(results_dir.glob("static_sm90*.json"))
    for path in paths:
        data = json.loads(path.read_text())
        if data.get("candidates"):
            continue  # a tile sweep, not what ships
        by_kernel: dict[str, list[dict]] = {}
        for config in data["configs"]:
            by_kernel.setdefault(config["kernel"], []).append(config)
        summary = data["summary"]
        lines += [
            "",
            f"Source: `perf/results/{path.name}`; triton {data['triton']}, {data['target']}; {data['date']}. "
            f"{summary['configs']} configurations: {summary['spilling']} spill, {summary['not_fitting']} do not "
            "fit one SM.",
            "",
            table(
                [
                    "kernel",
                    "configurations",
                    "most registers",
                    "most spill bytes",
                    "most shared KiB",
                    "least occupancy",
                ],
                [
                    [
                        name,
                        str(len(configs)),
                        str(max(c["registers"] for c in configs)),
                        str(max(c["spill_stores"] + c["spill_loads"] for c in configs)),
                        number(max(c["shared_bytes"] for c in configs) / 1024, ".0f"),
                        number(min(c["occupancy"] for c in configs), ".3f"),
                    ]
                    for name, configs in by_kernel.items()
                ],
            ),
        ]
    if not paths:
        missing.append("Static sm_90 report (`perf/static_sm90.py`).")
        lines += ["", "No results yet."]
    return lines


def unpad_section(files: list[tuple[Path, dict]], out: Path, missing: list[str]) -> list[str]:
    lines = ["## Unpadded encoder (perf/bench_unpad.py)"]
    for path, data in files:
        rows = [
            [
                f"batch {size} {kind}",
                number(run["median_s"][f"{kind}/padded"] * 1e3, ".1f"),
                number(run["median_s"][f"{kind}/unpadded"] * 1e3, ".1f"),
                number(ratio["unpadded_over_padded"]),
                number(run["real_token_fraction"]),
                "yes" if ratio["within_goal"] else "no",
            ]
            for size, run in data["runs"].items()
            for kind, ratio in run["ratios"].items()
        ]
        lines += [
            "",
            provenance(path, data),
            "",
            f"Model preset {data['model']['preset']}; batches of real sentence lengths; goal: {data['goal']}.",
            "",
            table(["case", "padded ms", "unpadded ms", "unpadded / padded", "real-token fraction", "goal met"], rows),
        ]
    if not files:
        missing.append("Unpadded against padded steps (`perf/bench_unpad.py`).")
        lines += ["", "No results yet."]
    return lines


def inference_section(files: list[tuple[Path, dict]], out: Path, missing: list[str]) -> list[str]:
    lines = ["## Inference (perf/bench_inference.py)"]
    for path, data in files:
        model = data.get("model", {})
        lines += [
            "",
            provenance(path, data),
            "",
            f"Model: {model.get('size', '?')} ({model.get('weights', '?')} weights).",
        ]
        for section in ("encoder", "classifier"):
            rows = [
                [
                    shape,
                    name,
                    number(entry["median_ms"], ".1f"),
                    number(entry["sequences_per_s"]),
                    number(entry["latency_vs_eager"]),
                ]
                for shape, impls in data.get(section, {}).items()
                for name, entry in impls.items()
            ]
            if rows:
                lines += [
                    "",
                    f"{section}:",
                    "",
                    table(["batch x seq", "implementation", "median ms", "sequences/s", "vs eager"], rows),
                ]
        lines += [f"- skipped {name}: {why}" for name, why in data.get("skipped", {}).items()]
    if not files:
        missing.append("Inference latency (`perf/bench_inference.py`).")
        lines += ["", "No results yet."]
    return lines


def scaling_section(files: list[tuple[Path, dict]], out: Path, missing: list[str]) -> list[str]:
    lines = ["## Data-parallel scaling (perf/bench_scaling.py)"]
    for path, data in files:
        lines += [
            "",
            provenance(path, data),
            "",
            table(
                ["configuration", "processes", "best median tokens/s"],
                [
                    [name, str(data["processes"][name]), number(rate, ".0f")]
                    for name, rate in data["best_median_tokens_per_s"].items()
                ],
            ),
            "",
            f"Scaling efficiency, 2 processes vs 1: {number(data.get('scaling_efficiency_2proc'))}.",
        ]
    if not any(data.get("gpu") for _, data in files):
        missing.append("Multi-GPU scaling (`perf/bench_scaling.py` with GPUs).")
    if not files:
        lines += ["", "No results yet."]
    return lines


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=PERF / "results", help="directory of results JSON")
    parser.add_argument("--out", type=Path, default=PERF, help="where REPORT.md and the PNGs go")
    args = parser.parse_args(argv)
    found = load(args.results)
    for stale in args.out.glob("report_*.png"):  # a plot whose results are gone must not linger
        stale.unlink()
    peaks = {
        data["device"]: data["matmul_peak"]["tflops"]
        for _, data in found["bench_train"]
        if data.get("device_type") == "cuda"
    }
    missing: list[str] = []
    sections: list[Callable[[], list[str]]] = [
        lambda: quality_section(found["bench_quality"], args.out, missing),
        lambda: train_section(found["bench_train"], args.out, missing),
        lambda: step_section(found["bench_step"], args.out, missing),
        lambda: attention_section(found["bench_attention"], args.out, missing, peaks),
        lambda: static_section(args.results, missing),
        lambda: unpad_section(found["bench_unpad"], args.out, missing),
        lambda: inference_section(found["bench_inference"], args.out, missing),
        lambda: scaling_section(found["bench_scaling"], args.out, missing),
    ]
    body = [line for section in sections for line in ["", *section()]]
    lines = [
        "# tokdrop performance report",
        "",
        "Generated by `perf/report.py` from the JSON the benchmarks wrote under `perf/results/`; "
        "CPU figures come from a shared, loaded machine and are smoke checks, not performance claims.",
        *body,
        "",
        "## Not measured yet",
        "",
        *[f"- {item}" for item in missing or ["Nothing."]],
    ]
    report = args.out / "REPORT.md"
    report.write_text("\n".join(lines) + "\n")
    print(f"wrote {report}")
    return report


if __name__ == "__main__":
    main()
