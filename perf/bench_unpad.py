"""Unpadded against padded encoders on real length distributions, side by side in one run:
a fine-tuning step (forward, backward, AdamW) of BertForSequenceClassification and an inference
forward of BertModel, each with BertConfig(unpad=False) and unpad=True.

    python perf/bench_unpad.py                     # CPU; --device cuda on a GPU
    python perf/bench_unpad.py --json perf/results/bench_unpad_cpu.json

Lengths are those of real sentences: the paragraphs of Python's documentation (shipped with
Python, so also on a bare GPU machine) split into sentences and tokenised with a WordPiece tokenizer
trained on them, capped at --max-len; each batch draws --batch sentences and is padded to its
longest. The goal: time(unpadded) / time(padded) within 10% of the batch's real-token fraction
(linear layers scale with the real tokens; attention with each sequence's length squared).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import platform
import statistics
from datetime import datetime, timezone
from pathlib import Path

import torch
from provenance import device_name, git_commit  # perf/ is the script's folder, hence on sys.path
from timing import interleaved, medians

import tokdrop
from tokdrop.cli import format_table, positive_int
from tokdrop.files import write_atomically
from tokdrop.presets import PRESETS
from tokdrop.training import make_optimizer

GOAL = 0.10  # |ratio / real fraction - 1|


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="minilm-l6", help="model size")
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[32, 8], help="sequences per batch")
    parser.add_argument("--max-len", type=positive_int, default=128, help="longest sequence (truncation)")
    parser.add_argument("--batches", type=positive_int, default=4, help="distinct batches, cycled")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    parser.add_argument("--reps", type=positive_int, default=8, help="timed rounds")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser.parse_args(argv)


def sentence_lengths(max_len: int) -> list[int]:
    """Token counts ([CLS] and [SEP] included) of the sentences of Python's documentation."""
    from tokdrop.corpus import load_corpus
    from tokdrop.data import train_tokenizer
    from tokdrop.downstream import split_sentences

    corpus = load_corpus(sources=("pydoc_topics", "docstrings"))
    tokenizer = train_tokenizer(corpus.train, vocab_size=8192)
    sentences = [s for p in corpus.held_out for s in split_sentences(p) if len(s.split()) >= 3]
    return [min(len(e.ids), max_len) for e in tokenizer.encode_batch(sentences)]


def batches(lengths: list[int], size: int, count: int, vocab: int, device: str) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(size)
    out = []
    for _ in range(count):
        chosen = torch.tensor(lengths)[torch.randint(len(lengths), (size,), generator=generator)]
        seq = int(chosen.max())
        mask = (torch.arange(seq) < chosen[:, None]).long()
        ids = torch.randint(1000, vocab, (size, seq), generator=generator) * mask
        labels = torch.randint(0, 2, (size,), generator=generator)
        out.append({"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)})
    return out


def finetune_step(model: torch.nn.Module, data: list[dict], device: torch.device):
    """A call that runs one fine-tuning step on the next batch of `data`."""
    model = model.to(device).train()
    optimizer = make_optimizer(model, lr=1e-5)
    batches = itertools.cycle(data)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**next(batches)).loss.backward()
        optimizer.step()

    return step


def inference(model: torch.nn.Module, data: list[dict], device: torch.device):
    """A call that encodes the next batch of `data`."""
    model = model.to(device).eval()
    batches = itertools.cycle(data)

    @torch.no_grad()
    def forward() -> None:
        batch = next(batches)
        model(batch["input_ids"], batch["attention_mask"])

    return forward


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    base = tokdrop.BertConfig(
        **PRESETS[args.preset], vocab_size=30522, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    lengths = sentence_lengths(args.max_len)
    runs = {}
    for size in args.batch:
        data = batches(lengths, size, args.batches, base.vocab_size, device.type)
        fraction = statistics.mean(float(b["attention_mask"].float().mean()) for b in data)
        fns = {}
        for unpad in (False, True):
            name = "unpadded" if unpad else "padded"
            config = dataclasses.replace(base, unpad=unpad)
            torch.manual_seed(0)
            fns[f"finetune_step/{name}"] = finetune_step(tokdrop.BertForSequenceClassification(config), data, device)
            fns[f"inference/{name}"] = inference(tokdrop.BertModel(config), data, device)
        times = interleaved(fns, args.reps, args.warmup, device)
        median = medians(times)
        runs[str(size)] = {
            "real_token_fraction": fraction,
            "median_s": median,
            "times_s": times,
            "ratios": {
                kind: {
                    "unpadded_over_padded": median[f"{kind}/unpadded"] / median[f"{kind}/padded"],
                    "over_real_fraction": median[f"{kind}/unpadded"] / median[f"{kind}/padded"] / fraction,
                    "within_goal": abs(median[f"{kind}/unpadded"] / median[f"{kind}/padded"] / fraction - 1) <= GOAL,
                }
                for kind in ("finetune_step", "inference")
            },
        }
    results = {
        "benchmark": "perf/bench_unpad.py",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git": git_commit(),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": {"preset": args.preset, **PRESETS[args.preset]},
        "sentences": len(lengths),
        "mean_sentence_tokens": statistics.mean(lengths),
        "goal": f"unpadded/padded within {GOAL:.0%} of the real-token fraction",
        "runs": runs,
    }
    print(_table(results))
    if args.json is not None:
        write_atomically(args.json, lambda p: Path(p).write_text(json.dumps(results, indent=2) + "\n"))
        print(f"wrote {args.json}")
    return results


def _table(results: dict) -> str:
    rows = []
    for size, run in results["runs"].items():
        for kind, ratio in run["ratios"].items():
            rows.append((
                f"batch {size} {kind}",
                f"{run['median_s'][f'{kind}/padded'] * 1e3:.1f}",
                f"{run['median_s'][f'{kind}/unpadded'] * 1e3:.1f}",
                f"{ratio['unpadded_over_padded']:.3f}",
                f"{run['real_token_fraction']:.3f}",
                "yes" if ratio["within_goal"] else "NO",
            ))  # fmt: skip
    header = ("case", "padded ms", "unpadded ms", "ratio", "real fraction", "within 10%")
    return f"{results['device']}, torch {results['torch']}\n\n" + format_table(header, rows)


if __name__ == "__main__":
    main()
