"""Time masked-LM training steps (forward + backward + AdamW step) side by side in one run:
Hugging Face transformers BertForMaskedLM (sdpa); tokdrop dense with the full last layer
(`dense_full_last`) and with the last layer at the predicted positions only (`dense`, the default);
token dropping, NarrowBERT and random-LTD, each with the last-layer subset on; and tokdrop's
RoBERTa, dense (`roberta`) and with token dropping (`roberta_token_drop`), at the same sizes with
RoBERTa's special ids (padding id 1, positions offset by 2, one token type).

    python perf/bench_step.py --device cpu --json perf/results/bench_step_cpu.json

The variants run interleaved, one step each per repetition in a rotating order, so that machine
noise hits all of them alike; ratios of median step times are the result (the ratio of the fastest
steps is reported beside it). Each ratio is printed next to the FLOP model's figure
(tokdrop.flops.training_flops) and its target.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from provenance import device_name, git_commit  # perf/ is the script's folder, hence on sys.path

from tokdrop.cli import HelpFormatter, add_model_arguments, format_table, positive_int
from tokdrop.config import BertConfig, RobertaConfig, with_mode
from tokdrop.data import MaskingCollator
from tokdrop.files import write_atomically
from tokdrop.flops import training_flops
from tokdrop.training import build_model, config_from_arguments, make_optimizer, train_step
from tokdrop.vocabulary import SpecialTokenIds

REPO = Path(__file__).resolve().parent.parent
SPECIALS = SpecialTokenIds(pad=0, unk=1, cls=2, sep=3, mask=4)
# RoBERTa's order (<s>, <pad>, </s>, <unk>) with <mask> on the same id as BERT's [MASK]: the batches
# of the two families then differ only in the ids of their first and last tokens.
ROBERTA_SPECIALS = SpecialTokenIds(pad=1, unk=3, cls=0, sep=2, mask=4)
BERT_MODES = ("dense", "token_drop", "narrow", "random_ltd")
ROBERTA_MODES = {"roberta": "dense", "roberta_token_drop": "token_drop"}
VARIANTS = ("transformers", "dense_full_last", *BERT_MODES, *ROBERTA_MODES)


def ratio_targets(layers: int) -> tuple[tuple[str, str, float | None], ...]:
    """(numerator, denominator, target): the measured step-time ratio should be at most the target
    (None: reported only). The last-layer subset should save at least 0.6 of one layer's cost."""
    return (
        ("token_drop", "dense", 0.80),
        ("roberta_token_drop", "roberta", 0.80),
        ("narrow", "dense", 0.55),
        ("random_ltd", "dense", None),
        ("dense", "dense_full_last", 1 - 0.6 / layers),
        ("dense", "transformers", 0.70),
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    parser.add_argument("--vocab-size", type=positive_int, default=30522, help="vocabulary size")
    parser.add_argument("--seq-len", type=positive_int, default=512, help="tokens per sequence")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="sequences per step")
    parser.add_argument("--predictions", type=positive_int, default=77, help="masked-LM predictions per sequence (P)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    parser.add_argument("--reps", type=positive_int, default=10, help="timed repetitions")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data")
    add_model_arguments(parser, layers=8, hidden=256, heads=4, intermediate=1024)
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.seq_len < 3:
        parser.error(f"--seq-len must be >= 3 ([CLS], a token, [SEP]), got {args.seq_len}")
    if args.predictions > args.seq_len - 2:
        parser.error(f"--predictions {args.predictions} exceeds the {args.seq_len - 2} maskable tokens per sequence")
    return args


def transformers_model(config: BertConfig, seed: int, device: str) -> torch.nn.Module:
    """Hugging Face's BertForMaskedLM with the same sizes, using PyTorch's SDPA attention."""
    torch.manual_seed(seed)
    hf_config = transformers.BertConfig.from_dict(config.to_dict(), attn_implementation="sdpa")
    return transformers.BertForMaskedLM(hf_config).to(device).train()


def random_batch(args: argparse.Namespace, specials: SpecialTokenIds = SPECIALS) -> dict[str, torch.Tensor]:
    """Full rows [CLS] w ... w [SEP] (RoBERTa: <s> w ... w </s>) of random ids, masked with exactly
    `--predictions` per row; the same words and masked positions for either family's `specials`."""
    generator = torch.Generator().manual_seed(args.seed)
    first_word_id = max(specials.as_tuple()) + 1
    rows = torch.randint(first_word_id, args.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    rows[:, 0], rows[:, -1] = specials.cls, specials.sep
    collator = MaskingCollator(
        vocab_size=args.vocab_size,
        pad_token_id=specials.pad,
        mask_token_id=specials.mask,
        special_token_ids=specials.as_tuple(),
        predictions_per_seq=args.predictions,
        seed=args.seed,
    )
    return {name: tensor.to(args.device) for name, tensor in collator(rows).items()}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    base = config_from_arguments(
        args,
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        max_predictions_per_seq=args.predictions,
        pad_token_id=SPECIALS.pad,
    )
    roberta_base = config_from_arguments(
        args,
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        max_predictions_per_seq=args.predictions,
        pad_token_id=ROBERTA_SPECIALS.pad,
        config_class=RobertaConfig,
    )
    modes = dict(keep=args.keep, full_layers=args.full_layers)
    configs = {"dense_full_last": dataclasses.replace(base, last_layer_subset=False)}
    configs |= {name: with_mode(base, name, **modes, allow_ids=SPECIALS.always_kept()) for name in BERT_MODES}
    configs |= {
        name: with_mode(roberta_base, mode, **modes, allow_ids=ROBERTA_SPECIALS.always_kept())
        for name, mode in ROBERTA_MODES.items()
    }
    models = {"transformers": transformers_model(base, args.seed, args.device)}
    models |= {name: build_model(config, args.seed, device) for name, config in configs.items()}
    optimizers = {name: make_optimizer(model, lr=1e-4) for name, model in models.items()}
    bert_batch, roberta_batch = random_batch(args), random_batch(args, ROBERTA_SPECIALS)
    batches = {name: roberta_batch if name in ROBERTA_MODES else bert_batch for name in VARIANTS}

    step_seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for rep in range(args.warmup + args.reps):
        shift = rep % len(VARIANTS)
        for name in VARIANTS[shift:] + VARIANTS[:shift]:
            seconds = train_step(models[name], optimizers[name], batches[name]).seconds
            if rep >= args.warmup:
                step_seconds[name].append(seconds)
        print(
            f"repetition {rep + 1}/{args.warmup + args.reps}",
            "(warm-up)" if rep < args.warmup else "",
            file=sys.stderr,
        )

    median = {name: statistics.median(times) for name, times in step_seconds.items()}
    fastest = {name: min(times) for name, times in step_seconds.items()}
    flops = {name: training_flops(config, args.seq_len, args.predictions) for name, config in configs.items()}
    flops["transformers"] = training_flops(base, args.seq_len, args.predictions, decode_every_position=True)
    ratios = {
        f"{num}/{den}": {
            "measured": median[num] / median[den],
            # Bursts of load from other processes can cover half of a variant's steps on a shared
            # machine; the ratio of the fastest steps is the steadier estimate of the compute cost.
            "measured_fastest": fastest[num] / fastest[den],
            "flop_model": flops[num] / flops[den],
            "target": target,
            "meets_target": None if target is None else median[num] / median[den] <= target,
        }
        for num, den, target in ratio_targets(args.layers)
    }
    results = {
        "benchmark": "perf/bench_step.py",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git": git_commit(),
        "arguments": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "tokens_per_step": args.batch_size * args.seq_len,
        "median_step_s": median,
        "min_step_s": fastest,
        "step_s": step_seconds,
        "training_flops_per_step": {name: flops[name] * args.batch_size for name in VARIANTS},
        "ratios": ratios,
    }
    print(_tables(results))
    if args.json is not None:
        write_atomically(args.json, lambda p: Path(p).write_text(json.dumps(results, indent=2) + "\n"))
        print(f"wrote {args.json}")
    return results


def _tables(results: dict) -> str:
    median, tokens = results["median_step_s"], results["tokens_per_step"]
    fastest = results["min_step_s"]
    steps = format_table(
        ("variant", "median step (ms)", "fastest (ms)", "tokens/s", "vs dense"),
        [
            (name, f"{s * 1e3:.1f}", f"{fastest[name] * 1e3:.1f}", f"{tokens / s:.0f}", f"{s / median['dense']:.2f}")
            for name, s in median.items()
        ],
    )
    ratios = format_table(
        ("ratio", "measured (medians)", "fastest steps", "FLOP model", "target", "met"),
        [
            (
                name,
                f"{r['measured']:.3f}",
                f"{r['measured_fastest']:.3f}",
                f"{r['flop_model']:.3f}",
                "-" if r["target"] is None else f"<= {r['target']:.3f}",
                {None: "-", True: "yes", False: "NO"}[r["meets_target"]],
            )
            for name, r in results["ratios"].items()
        ],
    )
    return f"{results['device']}, torch {results['torch']}\n\n{steps}\n\n{ratios}"


if __name__ == "__main__":
    main()
