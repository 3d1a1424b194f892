"""The ``tokdrop`` command. Each subcommand is an entry point of the group ``tokdrop.commands``
(see pyproject.toml): a function that adds its parser to the subparsers, with a ``run`` default that
does the work and returns the exit status. Entry points let `export`, which builds on tokdrop, add
its command without tokdrop importing it.

Also the argparse pieces the commands and benchmarks share. This module imports no torch, so that
`--help` stays fast."""

from __future__ import annotations

import argparse
import sys
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
    """Keeps the line breaks of a module docstring used as description; shows each flag's default,
    but for required flags, switches (off unless given) and flags defaulting to None, whose help
    says what happens without them."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)


def add_subcommand(
    subcommands: argparse._SubParsersAction,
    name: str,
    summary: str,
    description: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    """Add the subcommand `name` (a module's docstring as `description`, its flags from
    `add_arguments`, `run(args)` doing the work) to the `tokdrop` command."""
    parser = subcommands.add_parser(name, help=summary, description=description, formatter_class=HelpFormatter)
    add_arguments(parser)
    parser.set_defaults(run=run)
    return parser


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
    full_layers: int = 2,
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
        default=full_layers,
        help="NarrowBERT: full layers before the narrow ones",
    )


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser of `tokdrop`. When `argv` starts with a command's name, only that command's
    module is imported: its parser is the only one needed, and the others may import torch."""
    parser = argparse.ArgumentParser(
        prog="tokdrop", description="Token dropping and NarrowBERT for BERT-style encoders."
    )
    subcommands = parser.add_subparsers(title="commands", dest="command", required=True)
    commands = sorted(entry_points(group=COMMAND_GROUP), key=lambda ep: ep.name)
    named = [command for command in commands if argv and command.name == argv[0]]
    for command in named or commands:
        command.load()(subcommands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as err:  # bad input that only the library can judge, e.g. --heads vs --hidden
        parser.exit(2, f"tokdrop {args.command}: error: {err}\n")


if __name__ == "__main__":
    raise SystemExit(main())
