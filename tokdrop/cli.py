"""The ``tokdrop`` command. Each subcommand is an entry point of the group ``tokdrop.commands``
(see pyproject.toml): a function that adds its parser to the subparsers, with a ``run`` default that
does the work and returns the exit status. Entry points let `export`, which builds on tokdrop, add
its command without tokdrop importing it.

Also the argparse pieces the commands and benchmarks share. This module imports no torch, so that
`--help` stays fast."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import entry_points

COMMAND_GROUP = "tokdrop.commands"


def format_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned, a rule under the header."""
    lines = [tuple(header), *(tuple(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def render(line: Sequence[str]) -> str:
        cells = [line[0].ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)
        ]
        return "  ".join(cells)

    rendered = [render(line) for line in lines]
    return "\n".join([rendered[0], "-" * len(rendered[0]), *rendered[1:]])


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the line breaks of a module docstring used as description; shows each flag's default."""


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def add_model_arguments(
    parser: argparse.ArgumentParser,
    *,
    layers: int,
    hidden: int,
    heads: int,
    intermediate: int,
    dropout: float = 0.1,
) -> None:
    """Flags for the base model and the two cheap modes, with the given defaults."""
    group = parser.add_argument_group("model")
    group.add_argument("--layers", type=positive_int, default=layers, help="encoder layers")
    group.add_argument("--hidden", type=positive_int, default=hidden, help="hidden size")
    group.add_argument("--heads", type=positive_int, default=heads, help="attention heads")
    group.add_argument(
        "--intermediate",
        type=positive_int,
        default=intermediate,
        help="feed-forward inner size",
    )
    group.add_argument(
        "--dropout",
        type=float,
        default=dropout,
        help="hidden and attention-probability dropout",
    )
    group.add_argument(
        "--keep",
        type=float,
        default=0.5,
        help="token dropping: fraction of each sequence kept in the middle layers",
    )
    group.add_argument(
        "--full-layers",
        type=int,
        default=2,
        help="NarrowBERT: full layers before the narrow ones",
    )


def add_subcommand(
    subcommands: argparse._SubParsersAction,
    name: str,
    *,
    help: str,
    description: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    """A subcommand's parser with the shared formatter, its flags, and `run` as what it does."""
    parser = subcommands.add_parser(name, help=help, description=description, formatter_class=HelpFormatter)
    add_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokdrop", description="Token dropping and NarrowBERT for BERT-style encoders."
    )
    subcommands = parser.add_subparsers(title="commands", dest="command", required=True)
    for command in sorted(entry_points(group=COMMAND_GROUP), key=lambda ep: ep.name):
        command.load()(subcommands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as err:  # bad input that only the library can judge, e.g. --heads vs --hidden
        parser.exit(2, f"tokdrop {args.command}: error: {err}\n")


if __name__ == "__main__":
    raise SystemExit(main())
