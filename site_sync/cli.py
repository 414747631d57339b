"""The deployer's command line: `python -m site_sync COMMAND --handoff -`.

Every command reads the handoff document (which holds the deploy key) on standard input,
never from argv or the environment; `pulumi up` pipes it in, and a user pipes in the stack's
secret output: `pulumi stack output --show-secrets handoff | python -m site_sync status --handoff -`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import IntEnum
from pathlib import Path
from typing import TextIO

from edgecdn.contract import RELEASE_ID
from site_sync.deploy import DeployError, DeployOptions, FleetStatus, Report, deploy, fleet_status, rollback
from site_sync.handoff import Handoff, HandoffError, parse_handoff
from site_sync.progress import PlainProgress, Progress, progress_for
from site_sync.release import SiteError


class ExitStatus(IntEnum):
    """Process exit codes (documented in the README)."""

    OK = 0  # done; or, for status, every node serves one intact release
    FAILED = 1  # failed, and every node serves what it served before
    BAD_INPUT = 2  # the handoff, the site or an option is wrong; nothing was touched
    PARTIAL = 3  # some nodes changed and some did not; or, for status, the nodes disagree
    BUSY = 4  # another deploy holds the nodes; nothing was changed


def _release_id(text: str) -> str:
    if not RELEASE_ID.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a release id (20 lower-case hex digits)")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m site_sync", description="Deploy a site to edgecdn nodes.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str, wait: float) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--handoff", required=True, choices=["-"], help="read the handoff document from standard input")
        p.add_argument("--json", action="store_true", help="print one JSON report on stdout (progress goes to stderr)")
        p.add_argument(
            "--wait", type=float, default=wait, help=f"seconds to wait for a booting node (default {wait:.0f})"
        )
        return p

    check = sub.add_parser("check", help="validate a handoff document and print what it describes")
    check.add_argument("--handoff", required=True, choices=["-"], help="read the document from standard input")
    for name, help_text, wait in (
        ("deploy", "push the release and certificate to every node, then switch them together", 600.0),
        ("seed", "deploy only to nodes that serve nothing yet (a new node, before it takes its address)", 900.0),
    ):
        p = command(name, help_text, wait)
        p.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
        p.add_argument("--min-nodes", type=int, help="switch when at least this many nodes staged (default: all)")
        p.add_argument(
            "--follow-external-symlinks",
            action="store_true",
            help="publish what symbolic links outside the site point at (default: refuse them)",
        )
    back = command("rollback", "every node back to the previous (or --to) release; no upload", 60.0)
    back.add_argument("--to", type=_release_id, help="the release to go back to (default: the previous one)")
    back.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    command("status", "what each node serves and holds; exit 3 when the nodes disagree", 30.0)
    return parser


@contextmanager
def _ca_file(handoff: Handoff) -> Iterator[str | None]:
    """The handoff's private CA (the lab's) as a file the HTTPS checks trust."""
    if not handoff.ca_pem:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="edgecdn-ca-") as tmp:
        path = Path(tmp) / "ca.pem"
        path.write_text(handoff.ca_pem)
        yield str(path)


def main(
    argv: list[str] | None = None,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
    stderr: TextIO = sys.stderr,
    progress_factory: Callable[[TextIO], Progress] = progress_for,
) -> ExitStatus:
    """Run one command; never prints a secret."""
    args = _parser().parse_args(argv)
    try:
        handoff = parse_handoff(stdin.read())
    except (HandoffError, ValueError) as exc:
        print(f"site_sync: {exc}", file=stderr)
        return ExitStatus.BAD_INPUT
    if args.command == "check":
        count = len(handoff.nodes)
        print(
            f"release {handoff.release_id} of {handoff.domain} for {count} node{'s' * (count != 1)}: "
            + ", ".join(f"{n.name} ({n.address})" for n in handoff.nodes),
            file=stdout,
        )
        return ExitStatus.OK
    progress = PlainProgress(stderr) if args.json else progress_factory(stdout)
    try:
        with _ca_file(handoff) as ca_file:
            return _run(args, handoff, ca_file, progress, stdout, stderr)
    finally:
        progress.close()


def _run(
    args: argparse.Namespace, handoff: Handoff, ca_file: str | None, progress: Progress, stdout: TextIO, stderr: TextIO
) -> ExitStatus:
    if args.command == "status":
        status = fleet_status(handoff, args.wait, progress)
        _print_status(status, args.json, stdout)
        return ExitStatus.OK if status.agree else ExitStatus.PARTIAL
    options = DeployOptions(
        wait_seconds=args.wait,
        ca_file=ca_file,
        seed=args.command == "seed",
        dry_run=args.dry_run,
        min_nodes=getattr(args, "min_nodes", None),
        follow_external_symlinks=getattr(args, "follow_external_symlinks", False) or handoff.follow_external_symlinks,
    )
    try:
        if args.command == "rollback":
            report = rollback(handoff, args.to, options, progress)
        else:
            site_dir = Path(handoff.site_dir)  # relative to the working directory (the Pulumi project's)
            report = deploy(handoff, site_dir, options, progress)
    except DeployError as exc:
        print(f"site_sync: {exc}", file=stderr)
        if args.json:
            print(json.dumps({"command": args.command, "outcome": "failed", "error": str(exc)}), file=stdout)
        if exc.busy:
            return ExitStatus.BUSY
        return ExitStatus.PARTIAL if exc.changed else ExitStatus.FAILED
    except SiteError as exc:
        print(f"site_sync: {exc}", file=stderr)
        return ExitStatus.BAD_INPUT
    _print_report(report, args.json, stdout)
    return ExitStatus.PARTIAL if report.outcome == "partial" else ExitStatus.OK


def _print_report(report: Report, as_json: bool, stdout: TextIO) -> None:
    if as_json:
        print(json.dumps(report.as_json(), indent=1), file=stdout)
        return
    for node in sorted(report.nodes.values(), key=lambda n: n.name):
        sent = f", sent {node.files_sent} files ({node.bytes_sent} bytes)" if node.files_sent else ""
        problem = f"  ({node.error})" if node.error else ""
        print(f"{node.name}: {node.before or 'nothing'} -> {node.after or 'nothing'}{sent}{problem}", file=stdout)


def _print_status(status: FleetStatus, as_json: bool, stdout: TextIO) -> None:
    rows = status.rows()
    if as_json:
        print(json.dumps({"agree": status.agree, "nodes": rows}, indent=1), file=stdout)
        return
    for row in rows:
        if "error" in row:
            print(f"{row['node']}: unreachable: {row['error']}", file=stdout)
            continue
        intact = {True: "intact", False: "ALTERED", None: "-"}[row["intact"]]
        print(
            f"{row['node']}: active {row['active'] or 'none'} ({intact}), previous {row['previous'] or 'none'}, "
            f"{len(row['releases'])} kept, certificate until {row['certificate_expires'] or 'none'}",
            file=stdout,
        )
    print("all nodes agree" if status.agree else "the nodes DISAGREE (or one is altered or unreachable)", file=stdout)
