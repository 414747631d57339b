"""The handoff document: everything the deployer needs from `pulumi up`, as one JSON object.

It carries secrets (the deploy key, the TLS key), so it only ever travels on standard input,
never in argv, the environment or a log line. Errors name fields, never values of secrets.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from edgecdn.contract import DOMAIN, NODE_NAME, RELEASE_ID

# v2: per-node https_port and bundle (the node bundle a booting node installs), and ca_pem
# (a private CA the checks trust: the lab's and the real-boot test's).
SCHEMA = "edgecdn.handoff/v2"
MAX_DOCUMENT_BYTES = 1 << 20

_HOST_KEY = re.compile(r"^ssh-ed25519 [A-Za-z0-9+/]{68}$")
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


class HandoffError(Exception):
    """The handoff document is malformed; names every field at fault."""


@dataclass(frozen=True)
class NodeTarget:
    """How to reach one node's deploy agent, and the host key that proves it is that node."""

    name: str
    address: str
    port: int
    user: str
    host_key: str
    region: str = ""
    https_port: int = 443
    bundle: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Handoff:
    """A validated handoff document."""

    domain: str
    aliases: tuple[str, ...]
    release_id: str
    site_dir: str
    nodes: tuple[NodeTarget, ...]
    deploy_key: str
    certificate_chain: str
    certificate_key: str
    ca_pem: str | None = None
    follow_external_symlinks: bool = False

    def __repr__(self) -> str:
        return (
            f"Handoff(domain={self.domain!r}, release_id={self.release_id!r}, "
            f"nodes={[n.name for n in self.nodes]!r}, secrets=<redacted>)"
        )


def build_handoff(
    *,
    domain: str,
    aliases: Sequence[str],
    release_id: str,
    site_dir: str,
    nodes: Sequence[NodeTarget],
    deploy_key: str,
    certificate_chain: str,
    certificate_key: str,
    ca_pem: str | None = None,
    follow_external_symlinks: bool = False,
) -> str:
    """The JSON text of a handoff document (the Pulumi program's side, and the lab's)."""
    extra: dict[str, Any] = {"ca_pem": ca_pem} if ca_pem else {}
    if follow_external_symlinks:
        extra["follow_external_symlinks"] = True
    return json.dumps(
        {
            "schema": SCHEMA,
            **extra,
            "domain": domain,
            "aliases": list(aliases),
            "release_id": release_id,
            "site_dir": site_dir,
            "nodes": [node_document(node) for node in nodes],
            "deploy_key": deploy_key,
            "certificate": {"chain_pem": certificate_chain, "key_pem": certificate_key},
        },
        sort_keys=True,
    )


def node_document(node: NodeTarget) -> dict[str, Any]:
    """A node as the handoff document carries it: the inverse of what parse_handoff reads."""
    doc: dict[str, Any] = {
        "name": node.name,
        "region": node.region,
        "address": node.address,
        "port": node.port,
        "user": node.user,
        "host_key": node.host_key,
        "https_port": node.https_port,
    }
    if node.bundle is not None:
        doc["bundle"] = base64.b64encode(node.bundle).decode()
    return doc


def parse_handoff(text: str) -> Handoff:
    """Validate a handoff document; raises HandoffError listing every problem."""
    if len(text.encode()) > MAX_DOCUMENT_BYTES:
        raise HandoffError(f"handoff document is larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HandoffError(f"handoff document is not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict):
        raise HandoffError("handoff document must be a JSON object")
    problems: list[str] = []

    def text_field(obj: dict[str, Any], key: str, pattern: re.Pattern[str] | None, where: str) -> str:
        value = obj.get(key)
        if not isinstance(value, str) or (pattern is not None and not pattern.match(value)):
            problems.append(f"{where}{key}: missing or malformed")
            return ""
        return value

    if doc.get("schema") != SCHEMA:
        problems.append(
            f"schema: expected {SCHEMA!r}, got {doc.get('schema')!r}; the deployer and the "
            "Pulumi program come from different edgecdn versions"
        )
    domain = text_field(doc, "domain", DOMAIN, "")
    aliases = doc.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and DOMAIN.match(a) for a in aliases):
        problems.append("aliases: expected a list of DNS names")
        aliases = []
    release = text_field(doc, "release_id", RELEASE_ID, "")
    site_dir = text_field(doc, "site_dir", None, "")
    deploy_key = text_field(doc, "deploy_key", None, "")
    if deploy_key and "-----BEGIN OPENSSH PRIVATE KEY-----" not in deploy_key:
        problems.append("deploy_key: not an OpenSSH private key")
    cert = doc.get("certificate")
    chain = key = ""
    if not isinstance(cert, dict):
        problems.append("certificate: expected an object with chain_pem and key_pem")
    else:
        chain = text_field(cert, "chain_pem", None, "certificate.")
        key = text_field(cert, "key_pem", None, "certificate.")
        if chain and "-----BEGIN CERTIFICATE-----" not in chain:
            problems.append("certificate.chain_pem: not a PEM certificate chain")
        if key and not re.search(r"-----BEGIN (EC |RSA )?PRIVATE KEY-----", key):
            problems.append("certificate.key_pem: not a PEM private key")
    ca_pem = doc.get("ca_pem")
    if ca_pem is not None and not (isinstance(ca_pem, str) and "-----BEGIN CERTIFICATE-----" in ca_pem):
        problems.append("ca_pem: not a PEM certificate")
    nodes = _parse_nodes(doc.get("nodes"), problems)
    if problems:
        raise HandoffError("handoff document is invalid:\n" + "\n".join(f"  - {p}" for p in problems))
    return Handoff(
        domain=domain,
        aliases=tuple(aliases),
        release_id=release,
        site_dir=site_dir,
        nodes=nodes,
        deploy_key=deploy_key,
        certificate_chain=chain,
        certificate_key=key,
        ca_pem=ca_pem,
        follow_external_symlinks=doc.get("follow_external_symlinks") is True,
    )


def _parse_bundle(value: Any, where: str, problems: list[str]) -> bytes | None:
    if value is None:
        return None
    try:
        return base64.b64decode(value, validate=True) if isinstance(value, str) else None
    except (binascii.Error, ValueError):
        problems.append(f"{where}bundle: not base64")
    return None


def _parse_nodes(raw: Any, problems: list[str]) -> tuple[NodeTarget, ...]:
    if not isinstance(raw, list) or not raw:
        problems.append("nodes: expected a non-empty list")
        return ()
    nodes = []
    for i, node in enumerate(raw):
        where = f"nodes[{i}]."
        if not isinstance(node, dict):
            problems.append(f"nodes[{i}]: expected an object")
            continue
        before = len(problems)
        name = node.get("name")
        if not isinstance(name, str) or not NODE_NAME.match(name):
            problems.append(f"{where}name: missing or malformed")
        address = node.get("address")
        try:
            ipaddress.ip_address(address if isinstance(address, str) else "")
        except ValueError:
            problems.append(f"{where}address: expected an IP address, got {address!r}")
        port = node.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            problems.append(f"{where}port: expected a TCP port number, got {port!r}")
        user = node.get("user")
        if not isinstance(user, str) or not _USER.match(user):
            problems.append(f"{where}user: missing or malformed")
        host_key = node.get("host_key")
        if not isinstance(host_key, str) or not _HOST_KEY.match(host_key.strip()):
            problems.append(f"{where}host_key: expected 'ssh-ed25519 AAAA...'")
        region = node.get("region", "")
        https_port = node.get("https_port", 443)
        if not isinstance(https_port, int) or isinstance(https_port, bool) or not 0 < https_port < 65536:
            problems.append(f"{where}https_port: expected a TCP port number, got {https_port!r}")
        bundle = _parse_bundle(node.get("bundle"), where, problems)
        if len(problems) == before:
            assert isinstance(name, str) and isinstance(address, str) and isinstance(port, int)
            assert isinstance(user, str) and isinstance(host_key, str)
            nodes.append(NodeTarget(name, address, port, user, host_key.strip(), str(region), https_port, bundle))
    names = [n.name for n in nodes]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"nodes: the name {dup!r} appears more than once")
    return tuple(nodes)
