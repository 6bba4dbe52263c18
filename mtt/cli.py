"""`python -m mtt <command>`: headless runs of every stage.

Each command is a pair: `add_<command>(subparsers)` declares its flags and sets
`run=<handler>`; the handler calls the package and returns a JSON-able dict, which
`--json` prints as the last line of stdout (progress bars go to stderr).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

Handler = Callable[[argparse.Namespace], dict[str, Any]]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N, mps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line of stdout")


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def command(add: Callable[[argparse._SubParsersAction], None]):
    """Register a command's parser builder (decorator)."""
    COMMANDS.append(add)
    return add


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtt", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    args = parser.parse_args(argv)
    try:
        result = args.run(args)
    except (ValueError, OSError) as err:
        # Bad input and known failure modes end with one readable line, not a stack trace.
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    return 0
