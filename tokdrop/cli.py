"""The ``tokdrop`` command. Each subcommand is an entry point of the group ``tokdrop.commands``
(see pyproject.toml): a function that adds its parser to the subparsers, with a ``run`` default that
does the work and returns the exit status. Entry points let `export`, which builds on tokdrop, add
its command without tokdrop importing it."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from importlib.metadata import entry_points

COMMAND_GROUP = "tokdrop.commands"


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
