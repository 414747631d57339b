"""The deployer's command line: `python -m site_sync COMMAND`."""

from __future__ import annotations

import argparse
import sys
from enum import IntEnum
from typing import TextIO

from site_sync.handoff import HandoffError, parse_handoff


class ExitStatus(IntEnum):
    """Process exit codes; PARTIAL means some nodes took the release and some did not."""

    OK = 0
    ERROR = 1
    BAD_INPUT = 2
    PARTIAL = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m site_sync", description="Push a site release to edgecdn nodes.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a handoff document and print what it describes")
    check.add_argument("--handoff", required=True, choices=["-"], help="read the document from standard input")
    return parser


def main(
    argv: list[str] | None = None, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr
) -> ExitStatus:
    """Run one command; never prints a secret."""
    args = _parser().parse_args(argv)
    if args.command == "check":
        try:
            handoff = parse_handoff(stdin.read())
        except HandoffError as exc:
            print(f"site_sync: {exc}", file=stderr)
            return ExitStatus.BAD_INPUT
        count = len(handoff.nodes)
        print(
            f"release {handoff.release_id} of {handoff.domain} for {count} node{'s' * (count != 1)}: "
            + ", ".join(f"{n.name} ({n.address})" for n in handoff.nodes),
            file=stdout,
        )
        return ExitStatus.OK
    return ExitStatus.ERROR
