"""LatencyDNS: Route53 sends each visitor to the nearest healthy node."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from edgecdn.contract import HEALTH_MARKER, HEALTH_PATH

TTL = 60
HEALTH_INTERVAL = 30
HEALTH_FAILURE_THRESHOLD = 3


@dataclass(frozen=True)
class LatencyTarget:
    """One node as DNS sees it."""

    name: str
    region: str
    ipv4: pulumi.Input[str]
    ipv6: pulumi.Input[str | None] | None = None


@dataclass(frozen=True)
class LatencyDNSArgs:
    """The zone, the names served and the nodes behind them."""

    zone_id: str
    domain: str
    targets: tuple[LatencyTarget, ...]
    aliases: tuple[str, ...] = ()


def set_identifier(target: LatencyTarget) -> str:
    """Unique per record set; Route53 shows it, so it names the node and its region."""
    return f"edgecdn-{target.name}-{target.region}"


def health_check_name(target: LatencyTarget, family: str) -> str:
    """The key of a node's health check for one address family: `name`, or `name-ipv6`."""
    return target.name if family == "A" else f"{target.name}-ipv6"


def latency_policy(region: str) -> aws.route53.RecordLatencyRoutingPolicyArgsDict:
    """Route53 answers with this record for resolvers nearest this AWS region."""
    return {"region": region}


class LatencyDNS(pulumi.ComponentResource):
    """Per node and address family a health check; per node, name and family a latency record.

    Each family has its own check, so a node whose IPv6 path fails leaves the AAAA answers
    while it keeps serving IPv4.
    """

    health_check_ids: dict[str, pulumi.Output[str]]

    def __init__(self, name: str, args: LatencyDNSArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("edgecdn:index:LatencyDNS", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.health_check_ids = {}
        for target in args.targets:
            families: list[tuple[str, Any]] = [("A", target.ipv4)]
            if target.ipv6 is not None:
                families.append(("AAAA", target.ipv6))
            for record_type, address in families:
                key = health_check_name(target, record_type)
                check = aws.route53.HealthCheck(
                    f"{name}-{key}-health",
                    type="HTTPS_STR_MATCH",
                    ip_address=address,
                    port=443,
                    fqdn=args.domain,
                    enable_sni=True,
                    resource_path=HEALTH_PATH,
                    search_string=HEALTH_MARKER,
                    request_interval=HEALTH_INTERVAL,
                    failure_threshold=HEALTH_FAILURE_THRESHOLD,
                    measure_latency=True,
                    tags={"Name": f"edgecdn {args.domain} {key}"},
                    opts=child,
                )
                self.health_check_ids[key] = check.id
                for served in (args.domain, *args.aliases):
                    aws.route53.Record(
                        f"{name}-{target.name}-{served}-{record_type.lower()}",
                        zone_id=args.zone_id,
                        name=served,
                        type=record_type,
                        ttl=TTL,
                        records=[address],
                        set_identifier=set_identifier(target),
                        latency_routing_policies=[latency_policy(target.region)],
                        health_check_id=check.id,
                        opts=child,
                    )
        self.register_outputs({"healthCheckIds": self.health_check_ids})
