"""A monthly cost estimate from a small price table (us-east-1 list prices, USD).

Left out: data transfer beyond what Lightsail bundles include (EC2 pays per GB out), the hosted
zone itself, DNS queries, SNS email, and regional price differences (some regions cost up to
~30% more). It is an estimate to compare choices, not a bill.
"""

from __future__ import annotations

from typing import Any

from edgecdn.config import EdgeConfig
from edgecdn.regions import EC2, LIGHTSAIL

HOURS_PER_MONTH = 730
LIGHTSAIL_BUNDLE_MONTH = {"nano_3_0": 5.0, "micro_3_0": 7.0, "small_3_0": 12.0, "medium_3_0": 24.0, "large_3_0": 44.0}
EC2_HOURLY = {"t4g.nano": 0.0042, "t4g.micro": 0.0084, "t4g.small": 0.0168, "t4g.medium": 0.0336, "t4g.large": 0.0672}
PUBLIC_IPV4_HOURLY = 0.005  # EC2 charges every public IPv4; Lightsail bundles include one
GP3_GB_MONTH = 0.08
ROOT_VOLUME_GB = 8
# An AWS-endpoint health check plus its HTTPS, string-match and latency-measurement options.
HEALTH_CHECK_MONTH = 0.50 + 3 * 1.00
ALARM_MONTH = 0.10
EXCLUDED = (
    "data transfer beyond the Lightsail allowance and all EC2 data transfer out, the hosted "
    "zone, DNS queries, SNS, and regional price differences"
)


def estimate_monthly_cost(config: EdgeConfig) -> dict[str, Any]:
    """Line items and a total in USD per month; unknown sizes are listed, not guessed."""
    items: list[dict[str, Any]] = []
    unknown: list[str] = []
    for node in config.nodes:
        if node.backend == LIGHTSAIL:
            price = LIGHTSAIL_BUNDLE_MONTH.get(node.size)
        else:
            hourly = EC2_HOURLY.get(node.size)
            price = None if hourly is None else hourly * HOURS_PER_MONTH
        if price is None:
            unknown.append(f"{node.name} ({node.backend} {node.size})")
            continue
        items.append({"item": f"{node.name}: {node.backend} {node.size}", "usd": round(price, 2)})
        if node.backend == EC2:
            items.append(
                {"item": f"{node.name}: public IPv4 address", "usd": round(PUBLIC_IPV4_HOURLY * HOURS_PER_MONTH, 2)}
            )
            items.append(
                {"item": f"{node.name}: {ROOT_VOLUME_GB} GB gp3 volume", "usd": round(GP3_GB_MONTH * ROOT_VOLUME_GB, 2)}
            )
        # A dual-stack (Lightsail) node has a health check and an alarm per address family.
        families = 2 if node.backend == LIGHTSAIL else 1
        items.append({"item": f"{node.name}: {families} health check(s)", "usd": families * HEALTH_CHECK_MONTH})
        items.append({"item": f"{node.name}: {families} alarm(s)", "usd": round(families * ALARM_MONTH, 2)})
    return {
        "totalUsd": round(sum(i["usd"] for i in items), 2),
        "items": items,
        "notPriced": unknown,
        "excludes": EXCLUDED,
    }
