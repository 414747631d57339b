"""`python -m edgecdn verify`: check a deployed stack the way its visitors and AWS see it.

Reads the stack's outputs (`pulumi stack output --json --show-secrets`, or a file) and checks,
each as a row of a table:
  dns       Route53's own answer (TestDNSAnswer) for every name, A and AAAA, from one client
            subnet per continent: which node answers, against the node nearest the client;
  health    each node's health checks as Route53's checkers see them, per checker region;
  firewall  the port rules as AWS holds them (Lightsail port states, EC2 security groups):
            80/443 open to all, 22 only from sshAllowedCidrs, on IPv4 and IPv6;
  https     each node directly (its address, SNI and Host set to each name): a verified
            chain covering the name with more than 14 days left, and a real page served;
  release   every node serves the same intact release (the deploy agent's status).
Exit codes: 0 all good (warnings allowed), 1 a problem found, 2 bad input.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import math
import socket
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

OK, WARN, FAIL = "ok", "warn", "FAIL"
MIN_CERT_DAYS = 14
WEB_PORTS = (("tcp", 80), ("tcp", 443), ("udp", 443))
ANYWHERE = ("0.0.0.0/0", "::/0")

# The city each region is in (AWS's region list), to tell which node is nearest a client. Great-
# circle distance stands in for latency: Route53 measures the real thing, so a different answer
# between two nodes at similar distances is a warning, not an error.
REGION_CITIES: dict[str, tuple[float, float]] = {
    "us-east-1": (39.04, -77.49), "us-east-2": (39.96, -83.00), "us-west-1": (37.34, -121.89),
    "us-west-2": (45.84, -119.70), "ca-central-1": (45.50, -73.57), "ca-west-1": (51.05, -114.07),
    "mx-central-1": (20.59, -100.39), "sa-east-1": (-23.55, -46.63), "eu-west-1": (53.35, -6.26),
    "eu-west-2": (51.51, -0.13), "eu-west-3": (48.86, 2.35), "eu-central-1": (50.11, 8.68),
    "eu-central-2": (47.38, 8.54), "eu-north-1": (59.33, 18.07), "eu-south-1": (45.46, 9.19),
    "eu-south-2": (41.65, -0.89), "il-central-1": (32.09, 34.78), "me-south-1": (26.07, 50.56),
    "me-central-1": (24.45, 54.38), "af-south-1": (-33.92, 18.42), "ap-east-1": (22.32, 114.17),
    "ap-south-1": (19.08, 72.88), "ap-south-2": (17.39, 78.49), "ap-northeast-1": (35.68, 139.69),
    "ap-northeast-2": (37.57, 126.98), "ap-northeast-3": (34.69, 135.50), "ap-southeast-1": (1.35, 103.82),
    "ap-southeast-2": (-33.87, 151.21), "ap-southeast-3": (-6.21, 106.85), "ap-southeast-4": (-37.81, 144.96),
    "ap-southeast-5": (3.14, 101.69), "ap-southeast-7": (13.76, 100.50),
}  # fmt: skip


@dataclass(frozen=True)
class Probe:
    """A client subnet Route53 is asked to answer for (EDNS0 client subnet), and where it is."""

    place: str
    subnet: str
    location: tuple[float, float]


# One large access network per continent. Route53 places a subnet with its own geo database;
# pass --probes FILE (a JSON list of {place, subnet, lat, lon}) to ask for others.
PROBES = (
    Probe("North America (Comcast, US)", "73.0.0.0", (39.74, -104.99)),
    Probe("South America (registro.br, BR)", "200.160.0.0", (-23.55, -46.63)),
    Probe("Europe (Deutsche Telekom, DE)", "80.128.0.0", (50.94, 6.96)),
    Probe("Africa (Telkom, ZA)", "196.25.0.0", (-26.20, 28.05)),
    Probe("Asia (SoftBank, JP)", "126.0.0.0", (35.68, 139.69)),
    Probe("Oceania (Telstra, AU)", "1.128.0.0", (-33.87, 151.21)),
)


class StackError(Exception):
    """The stack outputs lack what verify needs; names every missing output."""


@dataclass(frozen=True)
class Node:
    """One node as the stack outputs describe it."""

    name: str
    region: str
    backend: str
    instance_id: str
    ipv4: str
    ipv6: str | None


@dataclass(frozen=True)
class Stack:
    """What verify checks, from the stack outputs."""

    domain: str
    aliases: tuple[str, ...]
    zone_id: str
    ssh_cidrs: tuple[str, ...]
    nodes: tuple[Node, ...]
    health_checks: dict[str, str]  # node name (and "<name>-ipv6") to health check id
    handoff: str | None

    @property
    def names(self) -> tuple[str, ...]:
        """Every name served."""
        return (self.domain, *self.aliases)


def read_stack(outputs: Mapping[str, Any]) -> Stack:
    """The stack from `pulumi stack output --json [--show-secrets]`; StackError naming what is missing."""
    missing = [k for k in ("domain", "hostedZoneId", "nodes", "healthCheckIds") if k not in outputs]
    if missing:
        raise StackError(
            f"the stack outputs lack {', '.join(missing)}; run `pulumi up` with this edgecdn version, then "
            "`pulumi stack output --json --show-secrets | python -m edgecdn verify --outputs -`"
        )
    try:
        nodes = tuple(
            Node(n["name"], n["region"], n["backend"], n["instanceId"], n["ipv4"], n.get("ipv6"))
            for n in outputs["nodes"]
        )
    except (KeyError, TypeError) as exc:
        raise StackError(f"the 'nodes' output lacks {exc}; run `pulumi up` with this edgecdn version") from None
    handoff = outputs.get("handoff")
    return Stack(
        domain=outputs["domain"],
        aliases=tuple(outputs.get("aliases") or ()),
        zone_id=outputs["hostedZoneId"],
        ssh_cidrs=tuple(outputs.get("sshAllowedCidrs") or ()),
        nodes=nodes,
        health_checks=dict(outputs["healthCheckIds"]),
        handoff=handoff if isinstance(handoff, str) and handoff.startswith("{") else None,
    )


@dataclass(frozen=True)
class Finding:
    """One row of the report."""

    check: str
    subject: str
    level: str
    detail: str


def distance_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance between two (latitude, longitude) points."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * 6371 * math.asin(math.sqrt(h))


def nearest_node(nodes: Sequence[Node], location: tuple[float, float]) -> Node:
    """The node whose region is nearest a place."""
    return min(nodes, key=lambda n: distance_km(REGION_CITIES.get(n.region, (0.0, 0.0)), location))


def check_dns(route53: Any, stack: Stack, probes: Sequence[Probe] = PROBES) -> list[Finding]:
    """Route53's answer for every name and family from every probe, against the nearest node."""
    findings = []
    for name in stack.names:
        for record_type, family in (("A", "ipv4"), ("AAAA", "ipv6")):
            candidates = [n for n in stack.nodes if getattr(n, family)]
            if not candidates:
                continue
            by_address = {str(ipaddress.ip_address(getattr(n, family))): n for n in candidates}
            for probe in probes:
                answer = route53.test_dns_answer(
                    HostedZoneId=stack.zone_id, RecordName=name, RecordType=record_type,
                    EDNS0ClientSubnetIP=probe.subnet, EDNS0ClientSubnetMask="24",
                )  # fmt: skip
                data = [str(ipaddress.ip_address(d)) for d in answer.get("RecordData", [])]
                subject = f"{name} {record_type} from {probe.place}"
                nodes = [by_address[d] for d in data if d in by_address]
                expected = nearest_node(candidates, probe.location)
                if answer.get("ResponseCode") != "NOERROR" or not nodes:
                    findings.append(Finding("dns", subject, FAIL, f"{answer.get('ResponseCode')} {data}: no node"))
                elif nodes[0] == expected:
                    findings.append(Finding("dns", subject, OK, f"{nodes[0].name} (nearest)"))
                else:
                    findings.append(Finding("dns", subject, WARN, f"{nodes[0].name}; nearest is {expected.name}"))
    return findings


def check_health(route53: Any, stack: Stack) -> list[Finding]:
    """Every health check as Route53's checkers see it, per checker region."""
    findings = []
    for subject, check_id in sorted(stack.health_checks.items()):
        observations = route53.get_health_check_status(HealthCheckId=check_id)["HealthCheckObservations"]
        failing = [
            f"{o.get('Region')}: {o.get('StatusReport', {}).get('Status', '')[:80]}"
            for o in observations
            if not o.get("StatusReport", {}).get("Status", "").startswith("Success")
        ]
        if not observations:
            findings.append(Finding("health", subject, FAIL, "no checker has reported yet"))
        elif failing:
            findings.append(
                Finding("health", subject, FAIL, f"{len(failing)} of {len(observations)} fail: {failing[0]}")
            )
        else:
            findings.append(Finding("health", subject, OK, f"{len(observations)} checker regions healthy"))
    return findings


def _rule_problems(rules: list[tuple[str, int, int, list[str]]], ssh_cidrs: Sequence[str]) -> list[str]:
    """What is wrong with a node's port rules (protocol, from, to, blocks) as AWS holds them."""
    problems = []
    for proto, port in WEB_PORTS:
        blocks = {b for p, low, high, bs in rules if p in (proto, "-1", "all") and low <= port <= high for b in bs}
        missing = [a for a in ANYWHERE if a not in blocks]
        if missing:
            problems.append(f"{proto}/{port} is not open to {', '.join(missing)}")
    ssh_blocks = {b for p, low, high, bs in rules if p in ("tcp", "-1", "all") and low <= 22 <= high for b in bs}
    allowed = set(ssh_cidrs) | {"100::/64"}  # RFC 6666 discard-only: what edgecdn sets for "no IPv6"
    extra = sorted(ssh_blocks - allowed)
    if extra:
        problems.append(f"22 is open to {', '.join(extra)}, beyond sshAllowedCidrs")
    return problems


def lightsail_rules(client: Any, node: Node) -> list[tuple[str, int, int, list[str]]]:
    """A Lightsail instance's port states, as (protocol, from, to, blocks) for open ports."""
    states = client.get_instance_port_states(instanceName=node.instance_id)["portStates"]
    return [
        (s["protocol"], s["fromPort"], s["toPort"], [*s.get("cidrs", []), *s.get("ipv6Cidrs", [])])
        for s in states
        if s.get("state") == "open"
    ]


def ec2_rules(client: Any, node: Node) -> list[tuple[str, int, int, list[str]]]:
    """An EC2 instance's security group ingress, as (protocol, from, to, blocks)."""
    reservations = client.describe_instances(InstanceIds=[node.instance_id])["Reservations"]
    groups = [g["GroupId"] for r in reservations for i in r["Instances"] for g in i.get("SecurityGroups", [])]
    rules = []
    for group in client.describe_security_groups(GroupIds=groups)["SecurityGroups"]:
        for p in group.get("IpPermissions", []):
            low, high = p.get("FromPort", 0), p.get("ToPort", 65535)
            if p.get("IpProtocol") == "-1":
                low, high = 0, 65535
            blocks = [r["CidrIp"] for r in p.get("IpRanges", [])] + [r["CidrIpv6"] for r in p.get("Ipv6Ranges", [])]
            rules.append((p.get("IpProtocol", ""), low, high, blocks))
    return rules


def check_firewalls(client_for: Callable[[str, str], Any], stack: Stack) -> list[Finding]:
    """Each node's firewall read back from AWS (Lightsail's delete semantics can close ports)."""
    findings = []
    for node in stack.nodes:
        if node.backend == "lightsail":
            rules = lightsail_rules(client_for("lightsail", node.region), node)
        else:
            rules = ec2_rules(client_for("ec2", node.region), node)
        problems = _rule_problems(rules, stack.ssh_cidrs)
        level = FAIL if problems else OK
        findings.append(Finding("firewall", node.name, level, "; ".join(problems) or "web open, ssh restricted"))
    return findings


def peer_certificate(address: str, name: str, port: int = 443, ca_file: str | None = None) -> dict[str, Any]:
    """The certificate a node presents for a name, verified against the trust store (or ca_file)."""
    context = ssl.create_default_context(cafile=ca_file)
    with (
        socket.create_connection((address, port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        cert = tls.getpeercert()
    return dict(cert or {})


def check_https(
    stack: Stack,
    fetch: Callable[[str, str, str], Any],
    certificate: Callable[[str, str], Mapping[str, Any]],
    now: dt.datetime | None = None,
) -> list[Finding]:
    """Each node directly, for every name: verified chain, days left, a real page served."""
    now = now or dt.datetime.now(dt.UTC)
    findings = []
    for node in stack.nodes:
        for address in filter(None, (node.ipv4, node.ipv6)):
            for name in stack.names:
                subject = f"{node.name} {address} as {name}"
                try:
                    cert = certificate(address, name)
                    page = fetch(address, name, "/")
                except (OSError, ssl.SSLError) as exc:
                    findings.append(Finding("https", subject, FAIL, str(exc)[:120]))
                    continue
                expires = dt.datetime.strptime(cert["notAfter"], "%b %d %H:%M:%S %Y %Z").replace(tzinfo=dt.UTC)
                days = (expires - now).days
                if days <= MIN_CERT_DAYS:
                    findings.append(Finding("https", subject, FAIL, f"the certificate expires in {days} days"))
                elif page.status != 200:
                    findings.append(Finding("https", subject, FAIL, f"/ answered {page.status}"))
                else:
                    release = page.headers.get("x-edge-release", "?")
                    findings.append(Finding("https", subject, OK, f"{days} days left, / 200, release {release}"))
    return findings


def check_release(statuses: Mapping[str, Any], unreachable: Mapping[str, str]) -> list[Finding]:
    """Every node serves the same intact release (from the agents' status answers)."""
    findings = [Finding("release", name, FAIL, f"unreachable: {error}") for name, error in unreachable.items()]
    actives = {s["active"] for s in statuses.values()}
    for name, status in sorted(statuses.items()):
        if status["intact"] is not True:
            findings.append(Finding("release", name, FAIL, f"{status['active']} is not intact"))
        elif len(actives) > 1:
            findings.append(Finding("release", name, FAIL, f"serves {status['active']}; the nodes disagree"))
        else:
            findings.append(Finding("release", name, OK, f"serves {status['active']}, intact"))
    return findings


def as_json(findings: Sequence[Finding]) -> str:
    """The findings as a JSON document."""
    return json.dumps({"ok": not any(f.level == FAIL for f in findings), "findings": [vars(f) for f in findings]})
