"""`sparrow` console script: one subcommand module per capability, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys

from sparrow_megatron.errors import UserError

# Each module defines `register(subparsers)`, which adds its parser and sets `func(args) -> int`.
COMMAND_MODULES = [
    "sparrow_megatron.cli.overview",
    "sparrow_megatron.cli.tail",
    "sparrow_megatron.cli.schedule",
    "sparrow_megatron.cli.cost",
    "sparrow_megatron.cli.plan",
    "sparrow_megatron.cli.train",
    "sparrow_megatron.cli.reward",
    "sparrow_megatron.cli.submit",
    "sparrow_megatron.cli.serve",
    "sparrow_megatron.cli.calibrate",
    "sparrow_megatron.cli.ui",
]


class CommandParser(argparse.ArgumentParser):
    """A command's parser: options and positionals (key=value overrides) mix in any order.

    Plain argparse stops filling `nargs="*"` positionals at the first option, so
    `sparrow submit RECIPE --dry-run key=value` would be refused; the intermixed parse takes the
    options out first. A parser with its own subcommands (`schedule show`) parses as usual: argparse
    cannot intermix those, and its subcommands get this class too.
    """

    _mixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._mixing or any(isinstance(a, argparse._SubParsersAction) for a in self._actions):
            return super().parse_known_args(args, namespace)
        self._mixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._mixing = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparrow", description=__doc__)
    subparsers = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=CommandParser
    )
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"sparrow {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sparrow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
