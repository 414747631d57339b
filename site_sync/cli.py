"""The deployer's command line: `python -m site_sync COMMAND`."""

from __future__ import annotations

import argparse
import sys
import tempfile
from enum import IntEnum
from pathlib import Path
from typing import TextIO

from site_sync.deploy import DeployError, deploy
from site_sync.handoff import HandoffError, parse_handoff
from site_sync.release import SiteError


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
    push = sub.add_parser("deploy", help="push the release and certificate to every node, then switch them together")
    push.add_argument("--handoff", required=True, choices=["-"], help="read the handoff document from standard input")
    push.add_argument("--wait", type=float, default=600, help="seconds to wait for a booting node (default 600)")
    seed = sub.add_parser(
        "seed", help="deploy only to nodes that serve nothing yet (a new node, before it takes its address)"
    )
    seed.add_argument("--handoff", required=True, choices=["-"], help="read the handoff document from standard input")
    seed.add_argument("--wait", type=float, default=900, help="seconds to wait for a booting node (default 900)")
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
    return _deploy(args, stdin, stdout, stderr)


def _deploy(args: argparse.Namespace, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    ca_file = None
    try:
        handoff = parse_handoff(stdin.read())
        site_dir = Path(handoff.site_dir)
    except (HandoffError, OSError, ValueError) as exc:
        print(f"site_sync: cannot start the deploy: {exc}", file=stderr)
        return ExitStatus.BAD_INPUT
    try:
        with tempfile.TemporaryDirectory(prefix="edgecdn-ca-") as tmp:
            if handoff.ca_pem:
                ca_file = str(Path(tmp) / "ca.pem")
                Path(ca_file).write_text(handoff.ca_pem)
            deploy(
                handoff,
                site_dir,
                wait_seconds=args.wait,
                ca_file=ca_file,
                log=lambda line: print(line, file=stdout, flush=True),
                seed=args.command == "seed",
            )
    except DeployError as exc:
        print(f"site_sync: {exc}", file=stderr)
        return ExitStatus.PARTIAL if exc.partial else ExitStatus.ERROR
    except SiteError as exc:
        print(f"site_sync: {exc}", file=stderr)
        return ExitStatus.BAD_INPUT
    return ExitStatus.OK
