"""The operator's command line: `python -m edgecdn verify` and `python -m edgecdn report`.

Both read the stack outputs (`pulumi stack output --json --show-secrets`) from a file or stdin,
and use the AWS credentials of the environment (boto3's usual chain: a profile, SSO, an OIDC
role in CI). Exit codes: 0 all good, 1 a problem found, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from enum import IntEnum
from pathlib import Path
from typing import Any, TextIO

from edgecdn import verify as checks
from edgecdn.verify import FAIL, WARN, Finding, StackError, read_stack


class ExitStatus(IntEnum):
    """Process exit codes (documented in the README)."""

    OK = 0
    PROBLEM = 1
    BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m edgecdn", description="Operate a deployed edgecdn stack.")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check DNS routing, health, firewalls, every node over HTTPS, and releases")
    r = sub.add_parser("report", help="time to first byte per node and checker region, from Route53's checks")
    for p in (v, r):
        p.add_argument("--outputs", required=True, help="the stack outputs as JSON: a file, or - for stdin")
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    v.add_argument("--ca-file", help="trust this CA for the HTTPS checks (a lab); default: the system's")
    v.add_argument("--https-port", type=int, default=443, help="the nodes' HTTPS port (443)")
    v.add_argument("--probes", help="client subnets to ask Route53 for, as JSON [{place, subnet, lat, lon}]")
    v.add_argument("--skip", action="append", default=[], choices=["dns", "health", "firewall", "https", "release"])
    r.add_argument("--hours", type=float, default=24, help="the window, ending now (24)")
    r.add_argument("--png", default="edgecdn-latency.png", help="where to write the chart")
    r.add_argument("--html", help="also write one self-contained HTML page (table and chart) here")
    return parser


def _read_outputs(source: str, stdin: TextIO) -> dict[str, Any]:
    text = stdin.read() if source == "-" else Path(source).read_text()
    outputs = json.loads(text)
    if not isinstance(outputs, dict):
        raise ValueError("the stack outputs are a JSON object")
    return outputs


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], stdout: TextIO) -> None:
    """A table: rich on a terminal, aligned plain text elsewhere (logs, CI)."""
    if stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(*columns, title=title)
        for row in rows:
            table.add_row(*row)
        Console(file=stdout).print(table)
        return
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    print(title, file=stdout)
    for row in [list(columns), *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip(), file=stdout)


def run_verify(args: argparse.Namespace, outputs: dict[str, Any], stdout: TextIO) -> ExitStatus:
    """Every check against AWS and the nodes; the table, and the exit status."""
    import boto3

    from site_sync.deploy import fleet_status
    from site_sync.handoff import parse_handoff
    from site_sync.probe import fetch
    from site_sync.progress import PlainProgress

    stack = read_stack(outputs)
    probes: tuple[checks.Probe, ...] = checks.PROBES
    if args.probes:
        probes = tuple(
            checks.Probe(p["place"], p["subnet"], (p["lat"], p["lon"]))
            for p in json.loads(Path(args.probes).read_text())
        )
    route53 = boto3.client("route53", region_name="us-east-1")  # Route53 is global; its API lives in us-east-1
    findings: list[Finding] = []
    if "dns" not in args.skip:
        findings += checks.check_dns(route53, stack, probes)
    if "health" not in args.skip:
        findings += checks.check_health(route53, stack)
    if "firewall" not in args.skip:
        findings += checks.check_firewalls(lambda service, region: boto3.client(service, region_name=region), stack)
    if "https" not in args.skip:
        findings += checks.check_https(
            stack,
            lambda address, name, path: fetch(address, name, path, args.https_port, args.ca_file),
            lambda address, name: checks.peer_certificate(address, name, args.https_port, args.ca_file),
        )
    if "release" not in args.skip:
        if stack.handoff is None:
            findings.append(Finding("release", "all nodes", WARN, "no handoff in the outputs: pass --show-secrets"))
        else:
            status = fleet_status(parse_handoff(stack.handoff), 30, PlainProgress(sys.stderr))
            findings += checks.check_release(status.statuses, status.unreachable)
    if args.json:
        print(checks.as_json(findings), file=stdout)
    else:
        rows = [(f.check, f.subject, f.level, f.detail) for f in findings]
        print_table(f"edgecdn verify: {stack.domain}", ("check", "subject", "result", "detail"), rows, stdout)
    return ExitStatus.PROBLEM if any(f.level == FAIL for f in findings) else ExitStatus.OK


def main(argv: list[str] | None = None, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> ExitStatus:
    """Run one command."""
    from botocore.exceptions import BotoCoreError, ClientError

    args = _parser().parse_args(argv)
    try:
        outputs = _read_outputs(args.outputs, stdin)
    except (ValueError, OSError) as exc:
        print(f"edgecdn: cannot read the stack outputs: {exc}", file=sys.stderr)
        return ExitStatus.BAD_INPUT
    try:
        if args.command == "verify":
            return run_verify(args, outputs, stdout)
        from edgecdn import report

        return ExitStatus(report.run(args, outputs, stdout, print_table))
    except (StackError, ValueError) as exc:
        print(f"edgecdn: {exc}", file=sys.stderr)
        return ExitStatus.BAD_INPUT
    except (BotoCoreError, ClientError) as exc:
        print(
            f"edgecdn: AWS answered: {exc}; check the credentials (`aws sts get-caller-identity`) and that "
            "the role may read Route53, CloudWatch, Lightsail and EC2",
            file=sys.stderr,
        )
        return ExitStatus.PROBLEM
