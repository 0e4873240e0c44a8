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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparrow", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
