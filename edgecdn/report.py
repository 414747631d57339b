"""`python -m edgecdn report`: time to first byte per node and checker region, as the article showed.

The stack's health checks measure latency, so Route53's checkers publish `TimeToFirstByte` per
checker region to CloudWatch (namespace AWS/Route53, in us-east-1, where Route53's metrics
live). This prints a node by checker-region table of the median and 90th percentile over a
window, writes a PNG chart, and with --html one self-contained page with both. Metrics that
are missing (a check younger than the window, a region that has not reported) are listed.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import io
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

# Route53's health checker regions (HealthCheckRegion in the Route53 API).
CHECKER_REGIONS = (
    "us-east-1", "us-west-1", "us-west-2", "eu-west-1", "ap-southeast-1", "ap-southeast-2", "ap-northeast-1",
    "sa-east-1",
)  # fmt: skip
METRIC = "TimeToFirstByte"
PERIOD = 60


@dataclass(frozen=True)
class Cell:
    """One node seen from one checker region."""

    check: str
    region: str
    median_ms: float | None
    p90_ms: float | None
    samples: int


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of some values."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1))]


def collect(cloudwatch: Any, checks: Mapping[str, str], start: dt.datetime, end: dt.datetime) -> list[Cell]:
    """Per health check and checker region: median and p90 of the per-minute averages in the window."""
    queries = [
        {
            "Id": f"m{i}",
            "Label": f"{name}|{region}",
            "MetricStat": {
                "Metric": {
                    "Namespace": "AWS/Route53",
                    "MetricName": METRIC,
                    "Dimensions": [{"Name": "HealthCheckId", "Value": check_id}, {"Name": "Region", "Value": region}],
                },
                "Period": PERIOD,
                "Stat": "Average",
            },
        }
        for i, (name, check_id, region) in enumerate(
            (name, check_id, region) for name, check_id in sorted(checks.items()) for region in CHECKER_REGIONS
        )
    ]
    labels: dict[str, str] = {str(q["Id"]): str(q["Label"]) for q in queries}
    values: dict[str, list[float]] = {label: [] for label in labels.values()}
    for batch in range(0, len(queries), 500):  # GetMetricData takes 500 queries a call
        token: str | None = None
        while True:
            extra = {"NextToken": token} if token else {}
            page = cloudwatch.get_metric_data(
                MetricDataQueries=queries[batch : batch + 500], StartTime=start, EndTime=end, **extra
            )
            for result in page["MetricDataResults"]:
                values[labels[result["Id"]]] += list(result.get("Values", []))
            token = page.get("NextToken")
            if not token:
                break
    cells = []
    for label, samples in values.items():
        name, region = label.split("|")
        if samples:
            cells.append(Cell(name, region, statistics.median(samples), percentile(samples, 0.9), len(samples)))
        else:
            cells.append(Cell(name, region, None, None, 0))
    return cells


def table_rows(cells: Sequence[Cell]) -> tuple[list[str], list[list[str]]]:
    """Columns (checker regions) and rows (health checks): 'median / p90' in ms, '-' when missing."""
    checks = sorted({c.check for c in cells})
    by = {(c.check, c.region): c for c in cells}
    rows = []
    for check in checks:
        row = [check]
        for region in CHECKER_REGIONS:
            cell = by.get((check, region))
            row.append("-" if cell is None or cell.median_ms is None else f"{cell.median_ms:.0f} / {cell.p90_ms:.0f}")
        rows.append(row)
    return ["node (median / p90 ms)", *CHECKER_REGIONS], rows


def chart_png(cells: Sequence[Cell], title: str) -> bytes:
    """A grouped bar chart of the medians, with the p90 as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    checks = sorted({c.check for c in cells})
    by = {(c.check, c.region): c for c in cells}
    fig, ax = plt.subplots(figsize=(11, 5), dpi=100)
    width = 0.8 / max(len(checks), 1)
    for i, check in enumerate(checks):
        medians = [(by[(check, r)].median_ms or 0.0) if (check, r) in by else 0.0 for r in CHECKER_REGIONS]
        p90s = [(by[(check, r)].p90_ms or 0.0) if (check, r) in by else 0.0 for r in CHECKER_REGIONS]
        positions = [x + i * width for x in range(len(CHECKER_REGIONS))]
        errors = [max(0.0, p - m) for p, m in zip(p90s, medians, strict=True)]
        ax.bar(positions, medians, width, yerr=[[0.0] * len(errors), errors], label=check, capsize=2)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(CHECKER_REGIONS))], CHECKER_REGIONS, rotation=30)
    ax.set_ylabel("time to first byte, ms (bar: median, whisker: p90)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def html_page(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], png: bytes, missing: list[str]) -> str:
    """One self-contained page: the table, the chart inline, and what was missing."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows)
    gaps = "".join(f"<li>{html.escape(m)}</li>" for m in missing) or "<li>none</li>"
    image = base64.b64encode(png).decode()
    return (
        f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
        "<style>body{font:14px system-ui;margin:2em}td,th{padding:.2em .6em;text-align:right}</style>"
        f"<h1>{html.escape(title)}</h1><table><tr>{head}</tr>{body}</table>"
        f'<img alt="chart" src="data:image/png;base64,{image}"><h2>Missing metrics</h2><ul>{gaps}</ul>\n'
    )


def run(
    args: argparse.Namespace,
    outputs: Mapping[str, Any],
    stdout: TextIO,
    print_table: Callable[[str, Sequence[str], Sequence[Sequence[str]], TextIO], None],
    cloudwatch: Any = None,
    now: dt.datetime | None = None,
) -> int:
    """The report from the stack outputs; 0, or 1 when no metric at all was found."""
    import json

    if "healthCheckIds" not in outputs:
        raise ValueError("the stack outputs lack healthCheckIds; run `pulumi up` with this edgecdn version")
    if cloudwatch is None:
        import boto3

        cloudwatch = boto3.client("cloudwatch", region_name="us-east-1")  # Route53's metrics live in us-east-1
    end = now or dt.datetime.now(dt.UTC)
    cells = collect(cloudwatch, outputs["healthCheckIds"], end - dt.timedelta(hours=args.hours), end)
    missing = [f"{c.check} from {c.region}" for c in cells if c.median_ms is None]
    title = f"edgecdn {outputs.get('domain', '')}: time to first byte, last {args.hours:g} h"
    columns, rows = table_rows(cells)
    png = chart_png(cells, title)
    Path(args.png).write_bytes(png)
    if args.html:
        Path(args.html).write_text(html_page(title, columns, rows, png, missing))
    if args.json:
        print(json.dumps({"cells": [vars(c) for c in cells], "missing": missing}), file=stdout)
    else:
        print_table(title, columns, rows, stdout)
        print(f"missing ({len(missing)}): {', '.join(missing) or 'none'}", file=stdout)
        print(f"chart: {args.png}" + (f", page: {args.html}" if args.html else ""), file=stdout)
    return 1 if len(missing) == len(cells) else 0
