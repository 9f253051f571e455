"""The ``hrmedseg`` command line.

Core subcommands live in this package; other parts of the distribution (the training
subpackage) add theirs through the ``hrmedseg.commands`` entry-point group, so the core never
imports them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from importlib.metadata import entry_points

from ..errors import HRMedSegError

CORE_COMMANDS = ("weights", "segment", "export_onnx", "info", "batch", "interchange", "cache")
ENTRY_POINT_GROUP = "hrmedseg.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hrmedseg", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in CORE_COMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            continue
        module.add_parser(sub)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    ours = set(logging.root.handlers)
    logging.basicConfig(level=level, format="%(message)s")
    # On the handler too: libraries whose loggers set their own level (Dask's distributed logs
    # every worker start and stop at INFO) propagate past the root logger's level to its handler.
    for handler in set(logging.root.handlers) - ours:
        handler.setLevel(level)
    try:
        return int(args.func(args) or 0)
    except HRMedSegError as err:
        print(f"hrmedseg {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hrmedseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
