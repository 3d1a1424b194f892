"""Masked-LM pretraining of a BERT encoder: dense, with token dropping, as NarrowBERT or with
random-LTD; on one process or on many through torchrun (DDP or FSDP2).

    tokdrop pretrain --config run.toml
    torchrun --nproc-per-node 8 -m tokdrop.pretrain --config run.toml --parallel fsdp2

Settings: the defaults, then the --preset model size, then the --config file (TOML; YAML with
PyYAML installed), then the flags; later wins. A config file names settings as the flags do
(dashes or underscores), at top level or in tables of any name ([model], [data], ...); paths in it
are relative to the file.

Data: text files, or directories of them, are tokenised once into memory-mapped shards under
--shard-dir (default OUT/shards), which later runs over the same files reuse; --data can also name
a shard directory. Empty and non-UTF-8 files are skipped with a warning and counted. Rows are
packed to --seq-len, visited in an order fixed by --seed, and split by rank: a step takes
--batch-size x --grad-accum x world-size sequences.

Output in --out: metrics.jsonl (every --log-every steps), checkpoints/step-N (every --save-every
steps, at the end, and on SIGTERM/SIGINT), model/ (save_pretrained + tokenizer.json) at the end.
--resume continues from the newest checkpoint exactly: the same batches, masks, dropout and
importance table as a run that was never stopped.

random_ltd changes the kept length from step to step. The length is a Python value
baked into each compiled graph, so with --compile every distinct length compiles once: at most
(seq_len - start) / --ltd-granularity + 2 graphs. Eager mode pays nothing. ScTD's consistency steps
(--consistency-every) are one more graph.

Under torchrun no rank waits forever: when a rank stops answering (stopped, hung, killed) for
--collective-timeout seconds, the others stop and one of them names it.

Exit status: 0 done; 1 stopped by --max-bad-steps non-finite losses in a row, by a failed write (a
full disk: a checkpoint save that fails leaves no partial checkpoint; the newest intact one is
named) or by a rank that stopped answering; 2 bad settings or data; 128+N stopped by signal N
after writing a checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tokdrop.pretrain.settings import add_arguments, settings_from_arguments


def add_command(subcommands: argparse._SubParsersAction) -> None:
    """Add the `pretrain` subcommand to the `tokdrop` command."""
    parser = subcommands.add_parser(
        "pretrain",
        help="pretrain a BERT encoder (dense, token dropping, NarrowBERT, random-LTD)",
        description=__doc__,
        # Each flag's help states its default: argparse's own defaults are suppressed, so that only
        # the flags given override a config file.
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the parsed `tokdrop pretrain` command on this rank; returns the exit status."""
    settings = settings_from_arguments(args)
    # Imported here, not above: the trainer needs torch, and building the parser must not load it.
    from tokdrop.pretrain.trainer import pretrain

    return pretrain(settings, resume=args.resume, prepare_only=args.prepare_only)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tokdrop.pretrain ...`, the entry point for `torchrun -m`: `tokdrop pretrain ...`."""
    parser = argparse.ArgumentParser(prog="tokdrop")
    add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["pretrain", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.run(args)
    except ValueError as err:
        parser.exit(2, f"tokdrop pretrain: error: {err}\n")


__all__ = ["add_command", "main", "run"]
