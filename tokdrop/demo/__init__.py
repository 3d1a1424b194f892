"""Pretrain a small BERT three ways from the same weights on the same batches: dense, with token
dropping and as NarrowBERT; offline, in under five minutes on two CPU cores.

The text is English prose that ships with Python and with tokdrop's set-up: Python's documentation
and the GNU Collaborative International Dictionary of English (tokdrop.corpus), split into training
and held-out text by document. A WordPiece tokenizer is trained on a slice of the training
documents (--train-words); no training sequence is seen more than twice.

The three models train with their steps interleaved (dense, token_drop, narrow, dense, ...), so that
machine noise hits them alike, and are evaluated on the same held-out masked tokens. The reference
is the unigram loss: predicting each masked token by its frequency in the training text, which is
what a model that learnt nothing about context can reach. "time to dense's loss" is the training
time (evaluation excluded) at which a variant's held-out loss first reaches dense's final loss: the
honest form of the speed-up.

Writes into --out: results.json, table.txt, heldout_loss.png, tokenizer.json, and each trained model
in the Hugging Face layout under models/<variant>/ (with its tokenizer), ready for
`tokdrop export --model OUT/models/token_drop ...` or transformers' AutoModelForMaskedLM.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokdrop.cli import add_model_arguments, add_subcommand, positive_int

VARIANTS = ("dense", "token_drop", "narrow")


def add_command(subcommands: argparse._SubParsersAction) -> None:
    """Add the `demo` subcommand to the `tokdrop` command."""
    add_subcommand(
        subcommands,
        "demo",
        summary="pretrain a small BERT dense, with token dropping and as NarrowBERT; compare quality and speed",
        description=__doc__,
        add_arguments=add_arguments,
        run=run,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=positive_int, default=1700, help="training steps per model")
    parser.add_argument("--seq-len", type=positive_int, default=64, help="tokens per sequence")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="sequences per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (warm-up, linear decay)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, data order and masking")
    parser.add_argument("--evals", type=positive_int, default=10, help="held-out evaluations, plus one before training")
    parser.add_argument("--eval-rows", type=positive_int, default=256, help="held-out sequences per evaluation")
    parser.add_argument(
        "--vocab-size", type=positive_int, default=8192, help="WordPiece vocabulary trained on the text"
    )
    parser.add_argument(
        "--train-words", type=positive_int, default=1_200_000, help="words of training text (whole documents)"
    )
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="use this tokenizer.json / vocab.txt instead of training one"
    )
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory")
    # No dropout by default: no training sequence is seen more than twice, so there is little to
    # regularise, and dropout would only slow the loss down. Within five minutes for three models,
    # many small steps of a shallow model learn most: probes of dense alone at equal time reached
    # 0.58 nat below the unigram loss with 4 layers and batch 16, 0.60 with batch 8, 0.43 with
    # batch 32, and 0.86 with 2 layers (where NarrowBERT's one narrow layer is dense's last-layer
    # subset); 3 layers keep a layer for each to act on. At 3 layers and 2,000 steps of dense alone,
    # the learning rate peaked near 1e-3 (0.59 nat at 6e-4 and 2e-3, 0.72 at 1e-3), and a vocabulary
    # of 8,192 beat 4,096 and 2,048 (0.82, 0.72, 0.58 nat below their unigram losses); 1,700 steps
    # of the three models then fit in about four minutes.
    add_model_arguments(parser, layers=3, hidden=128, heads=2, intermediate=512, dropout=0.0, full_layers=1)


def run(args: argparse.Namespace) -> int:
    from tokdrop.demo.comparison import run_demo

    return run_demo(args)
