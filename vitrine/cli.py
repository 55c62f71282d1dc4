"""The `vitrine` command. Each part registers its own subcommands from its own `cli` module, so the
code of a job lives beside the package it drives and this file only dispatches."""

from __future__ import annotations

import argparse
import importlib
import sys

from vitrine.errors import UserError

# (module, function) pairs; each `register(subparsers)` adds one or more subcommands whose parsers
# set `func` to the callable that runs them.
_PARTS = [
    "pipeline.cli",
    "image_service.cli",
    "trainer.cli",
    "vitrine.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitrine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in _PARTS:
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as exc:
        print(f"vitrine {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
