"""The stack configuration: read once, checked completely, frozen.

Every problem is collected and reported in one error before any resource exists, so a user
fixes their stack file in one pass instead of one `pulumi up` per typo.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecdn.contract import DOMAIN, NODE_NAME
from edgecdn.regions import BACKENDS, DEFAULT_SIZE, EC2, LIGHTSAIL, REGION_BACKENDS

NAMESPACE = "edgecdn"

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"

# ACME directories whose CAA identity is known. Any other CA needs `caaIssuer`.
KNOWN_CA_IDENTITIES = {
    LETS_ENCRYPT: "letsencrypt.org",
    "https://acme-staging-v02.api.letsencrypt.org/directory": "letsencrypt.org",
    "https://acme.zerossl.com/v2/DV90": "sectigo.com",
    "https://dv.acme-v02.api.pki.goog/directory": "pki.goog",
}

# Key -> how its raw value is decoded. Lists, objects, ints and bools arrive as JSON text
# from the Pulumi CLI; strings arrive as they are.
KEY_KINDS = {
    "domain": "string",
    "aliases": "list",
    "hostedZoneId": "string",
    "siteDir": "string",
    "nodes": "list",
    "sshAllowedCidrs": "list",
    "allowSshFromAnywhere": "bool",
    "adminSshKeys": "list",
    "acmeEmail": "string",
    "acmeServer": "string",
    "caaIssuer": "string",
    "certMinDaysRemaining": "int",
    "manageCaa": "bool",
    "followExternalSymlinks": "bool",
    "alertEmail": "string",
}
# A fixed renewal threshold must stay under half of the shortest lifetime a CA will issue
# (Let's Encrypt: 45 days from 2028), or every run would renew.
MIN_DAYS_RANGE = (7, 20)
REQUIRED_KEYS = ("domain", "hostedZoneId", "siteDir", "nodes", "sshAllowedCidrs", "acmeEmail")
NODE_KEYS = ("region", "backend", "size", "name")

_HOSTNAME = DOMAIN
_ZONE_ID = re.compile(r"^Z[A-Z0-9]{1,32}$")
_NODE_NAME = NODE_NAME
_EMAIL = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@" + _HOSTNAME.pattern[1:])
_LIGHTSAIL_BUNDLE = re.compile(r"^[a-z0-9]+_\d+_\d+$")
# Graviton families carry a "g" after the generation digit (t4g, c7g, m7gd, r8g ...): the
# only ones that boot the arm64 Debian image.
_EC2_ARM_TYPE = re.compile(r"^[a-z]+\d+g[a-z]*\.[a-z0-9]+$")
_SSH_KEY = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(?:256|384|521)|sk-ssh-ed25519@openssh\.com"
    r"|sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/]+={0,3}(?: [ -~]{0,200})?$"
)


@dataclass(frozen=True)
class NodeSpec:
    """One edge node as the user asked for it."""

    name: str
    region: str
    backend: str = LIGHTSAIL
    size: str = DEFAULT_SIZE[LIGHTSAIL]


@dataclass(frozen=True)
class EdgeConfig:
    """The whole, validated stack configuration."""

    domain: str
    hosted_zone_id: str
    site_dir: Path
    nodes: tuple[NodeSpec, ...]
    ssh_allowed_cidrs: tuple[str, ...]
    acme_email: str
    aliases: tuple[str, ...] = ()
    allow_ssh_from_anywhere: bool = False
    admin_ssh_keys: tuple[str, ...] = ()
    acme_server: str = LETS_ENCRYPT
    caa_issuer: str = KNOWN_CA_IDENTITIES[LETS_ENCRYPT]
    cert_min_days_remaining: int | None = None
    alert_email: str | None = None
    manage_caa: bool = False
    follow_external_symlinks: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        """Every name served: the domain first, then the aliases."""
        return (self.domain, *self.aliases)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one key."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{NAMESPACE}:{self.key}: {self.message}"


class ConfigError(Exception):
    """The stack configuration cannot be used; lists every problem found."""

    def __init__(self, problems: list[Problem], stack_file: str) -> None:
        self.problems = problems
        self.stack_file = stack_file
        lines = "\n".join(f"  - {p}" for p in problems)
        count = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
        super().__init__(
            f"the stack configuration has {count}; fix them in {stack_file} "
            f"(or with `pulumi config set`) and run again:\n{lines}"
        )


@dataclass
class _Reader:
    """Decodes raw values and collects problems instead of stopping at the first."""

    raw: Mapping[str, Any]
    problems: list[Problem] = field(default_factory=list)

    def add(self, key: str, message: str) -> None:
        self.problems.append(Problem(key, message))

    def text(self, key: str) -> str | None:
        """A string-valued key, or None when it is missing or was reported as wrong."""
        value = self.get(key)
        return value if isinstance(value, str) else None

    def get(self, key: str) -> Any:
        value = self.raw.get(key)
        if value is None:
            if key in REQUIRED_KEYS:
                self.add(key, "missing; this key is required (see the README's configuration table)")
            return None
        kind = KEY_KINDS[key]
        if isinstance(value, str) and kind != "string":
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                self.add(key, f"expected a {kind} (as YAML or JSON), got {value!r}")
                return None
        expected = {"string": str, "list": list, "bool": bool, "int": int}[kind]
        if not isinstance(value, expected) or (kind == "int" and isinstance(value, bool)):
            self.add(key, f"expected a {kind}, got {type(value).__name__} {value!r}")
            return None
        return value

    def strings(self, key: str) -> list[str] | None:
        """A list of strings; None when missing or not a list."""
        values = self.get(key)
        if values is None:
            return None
        good = []
        for i, value in enumerate(values):
            if isinstance(value, str):
                good.append(value)
            else:
                self.add(f"{key}[{i}]", f"expected a string, got {value!r}")
        return good


def parse_config(
    raw: Mapping[str, Any],
    project_dir: Path,
    stack_file: str = "Pulumi.<stack>.yaml",
    zone_name: str | None = None,
) -> EdgeConfig:
    """Validate raw `edgecdn:` values (keys without namespace) into an EdgeConfig.

    `zone_name`, when known, is the name of the hosted zone, and every served name must be in it.
    Raises ConfigError listing every problem.
    """
    r = _Reader(raw)
    for key in sorted(set(raw) - set(KEY_KINDS)):
        r.add(key, f"unknown key; known keys are: {', '.join(sorted(KEY_KINDS))}")

    domain = _parse_domain(r)
    aliases = _parse_aliases(r, domain, zone_name)
    zone_id = _parse_zone_id(r)
    site_dir = _parse_site_dir(r, project_dir)
    nodes = _parse_nodes(r)
    allow_anywhere = bool(r.get("allowSshFromAnywhere"))
    cidrs = _parse_cidrs(r, allow_anywhere)
    admin_keys = _parse_admin_keys(r)
    acme_email = _parse_email(r, "acmeEmail")
    alert_email = _parse_email(r, "alertEmail")
    acme_server, caa_issuer = _parse_ca(r)
    min_days = r.get("certMinDaysRemaining")
    if min_days is not None and not MIN_DAYS_RANGE[0] <= min_days <= MIN_DAYS_RANGE[1]:
        r.add(
            "certMinDaysRemaining",
            f"{min_days} is out of range; expected {MIN_DAYS_RANGE[0]} to {MIN_DAYS_RANGE[1]} days, or leave it "
            "unset to renew when a third of the lifetime is left (certificates lasting 45 days, as Let's "
            "Encrypt's will from 2028, would be renewed on every run with a larger value)",
        )
    manage_caa = bool(r.get("manageCaa"))
    follow_external = bool(r.get("followExternalSymlinks"))

    if r.problems:
        raise ConfigError(r.problems, stack_file)
    assert domain and zone_id and site_dir and acme_email and acme_server and caa_issuer
    return EdgeConfig(
        domain=domain,
        aliases=tuple(aliases),
        hosted_zone_id=zone_id,
        site_dir=site_dir,
        nodes=tuple(nodes),
        ssh_allowed_cidrs=tuple(cidrs),
        allow_ssh_from_anywhere=allow_anywhere,
        admin_ssh_keys=tuple(admin_keys),
        acme_email=acme_email,
        acme_server=acme_server,
        caa_issuer=caa_issuer,
        cert_min_days_remaining=min_days,
        alert_email=alert_email,
        manage_caa=manage_caa,
        follow_external_symlinks=follow_external,
    )


def _hostname_problem(value: str) -> str | None:
    if value != value.lower():
        return f"{value!r} must be lower case: use {value.lower()!r}"
    if value.endswith("."):
        return f"{value!r} must not end with a dot: use {value.rstrip('.')!r}"
    if not _HOSTNAME.match(value):
        return (
            f"{value!r} is not a valid DNS name; expected labels of letters, digits and "
            "hyphens separated by dots, e.g. 'example.com'"
        )
    return None


def _in_zone(name: str, zone: str) -> bool:
    return name == zone or name.endswith("." + zone)


def _parse_domain(r: _Reader) -> str | None:
    domain = r.text("domain")
    if domain is None:
        return None
    problem = _hostname_problem(domain)
    if problem:
        r.add("domain", problem)
        return None
    return domain


def _parse_aliases(r: _Reader, domain: str | None, zone_name: str | None) -> list[str]:
    zone = zone_name.rstrip(".").lower() if zone_name else None
    if domain and zone and not _in_zone(domain, zone):
        r.add("domain", f"{domain!r} is not in the hosted zone {zone!r}; use a name under it")
    aliases: list[str] = []
    for i, alias in enumerate(r.strings("aliases") or []):
        key = f"aliases[{i}]"
        problem = _hostname_problem(alias)
        if problem:
            r.add(key, problem)
        elif alias == domain or alias in aliases:
            r.add(key, f"{alias!r} is listed twice; each name may appear once")
        elif zone and not _in_zone(alias, zone):
            r.add(key, f"{alias!r} is outside the hosted zone {zone!r}; aliases must be in that zone")
        else:
            aliases.append(alias)
    return aliases


def _parse_zone_id(r: _Reader) -> str | None:
    zone_id = r.text("hostedZoneId")
    if zone_id is None:
        return None
    zone_id = zone_id.removeprefix("/hostedzone/")
    if not _ZONE_ID.match(zone_id):
        r.add(
            "hostedZoneId",
            f"{zone_id!r} is not a Route53 hosted zone id; expected the id shown by "
            "`aws route53 list-hosted-zones`, e.g. 'Z0123456789ABCDEFGHIJ'",
        )
        return None
    return zone_id


def _parse_site_dir(r: _Reader, project_dir: Path) -> Path | None:
    value = r.text("siteDir")
    if value is None:
        return None
    path = (project_dir / value).resolve()
    if not path.exists():
        r.add("siteDir", f"{value!r} does not exist (looked at {path}); build the site first")
    elif not path.is_dir():
        r.add("siteDir", f"{value!r} is not a directory; point it at the generated site's folder")
    elif not (path / "index.html").is_file():
        r.add("siteDir", f"{value!r} has no index.html; point it at the generated site's folder")
    else:
        return path
    return None


def _parse_nodes(r: _Reader) -> list[NodeSpec]:
    raw_nodes = r.get("nodes")
    if raw_nodes is None:
        return []
    if not raw_nodes:
        r.add("nodes", "is empty; list at least one node, e.g. [{region: eu-central-1}]")
        return []
    nodes: list[NodeSpec] = []
    regions: dict[str, int] = {}
    names: dict[str, int] = {}
    for i, raw in enumerate(raw_nodes):
        node = _parse_node(r, i, raw)
        if node is None:
            continue
        if node.region in regions:
            r.add(
                f"nodes[{i}].region",
                f"{node.region!r} already holds nodes[{regions[node.region]}]; Route53 allows one "
                "latency record per region for a name, so each node needs its own region",
            )
        if node.name in names:
            r.add(f"nodes[{i}].name", f"{node.name!r} is already the name of nodes[{names[node.name]}]")
        regions.setdefault(node.region, i)
        names.setdefault(node.name, i)
        nodes.append(node)
    return nodes


def _parse_node(r: _Reader, i: int, raw: Any) -> NodeSpec | None:
    key = f"nodes[{i}]"
    if not isinstance(raw, dict):
        r.add(key, f"expected an object like {{region: eu-central-1}}, got {raw!r}")
        return None
    ok = True
    for extra in sorted(set(raw) - set(NODE_KEYS)):
        r.add(f"{key}.{extra}", f"unknown node key; known keys are: {', '.join(NODE_KEYS)}")
        ok = False
    region = raw.get("region")
    backend = raw.get("backend", LIGHTSAIL)
    if not isinstance(region, str) or region not in REGION_BACKENDS:
        r.add(
            f"{key}.region",
            f"{region!r} is not an AWS region edgecdn knows; expected one of: " + ", ".join(REGION_BACKENDS),
        )
        ok = False
    if backend not in BACKENDS:
        r.add(f"{key}.backend", f"{backend!r} is not a backend; expected one of: {', '.join(BACKENDS)}")
        ok = False
    elif ok and backend not in REGION_BACKENDS[str(region)]:
        r.add(
            f"{key}.backend",
            f"{backend} is not offered in {region}; use backend: {EC2} there, or a Lightsail region",
        )
        ok = False
    size = raw.get("size", DEFAULT_SIZE.get(backend, ""))
    if backend == LIGHTSAIL and not (isinstance(size, str) and _LIGHTSAIL_BUNDLE.match(size)):
        r.add(f"{key}.size", f"{size!r} is not a Lightsail bundle id; expected e.g. 'nano_3_0'")
        ok = False
    if backend == EC2 and not (isinstance(size, str) and _EC2_ARM_TYPE.match(size)):
        r.add(
            f"{key}.size",
            f"{size!r} is not an arm64 (Graviton) EC2 instance type; nodes run the arm64 "
            "Debian image, e.g. 't4g.nano' or 't4g.micro'",
        )
        ok = False
    name = raw.get("name", region)
    if not (isinstance(name, str) and _NODE_NAME.match(name)):
        r.add(
            f"{key}.name",
            f"{name!r} is not a valid node name; expected lower-case letters, digits and "
            "hyphens, starting with a letter, at most 32 characters",
        )
        ok = False
    if not ok:
        return None
    return NodeSpec(name=str(name), region=str(region), backend=str(backend), size=str(size))


def _parse_cidrs(r: _Reader, allow_anywhere: bool) -> list[str]:
    values = r.strings("sshAllowedCidrs")
    if values == []:
        r.add(
            "sshAllowedCidrs",
            "is empty; the deployer pushes the site over SSH, so list the address it runs "
            "from, e.g. ['203.0.113.7/32']",
        )
    cidrs: list[str] = []
    for i, value in enumerate(values or []):
        key = f"sshAllowedCidrs[{i}]"
        try:
            network = ipaddress.ip_network(value, strict=True)
        except ValueError as exc:
            hint = ""
            if "has host bits set" in str(exc):
                hint = f"; did you mean {ipaddress.ip_network(value, strict=False)}?"
            r.add(key, f"{value!r} is not a CIDR block ({exc}){hint}; expected e.g. '203.0.113.7/32'")
            continue
        if network.prefixlen == 0 and not allow_anywhere:
            r.add(
                key,
                f"{value!r} opens SSH to the whole internet; list your own addresses instead, or "
                "set edgecdn:allowSshFromAnywhere to true if you really mean it",
            )
            continue
        cidrs.append(str(network))
    if cidrs and all(":" in c for c in cidrs):
        r.add(
            "sshAllowedCidrs",
            "needs at least one IPv4 block: the deployer reaches nodes at their static IPv4 "
            "address, e.g. add '203.0.113.7/32'",
        )
    return cidrs


def _parse_admin_keys(r: _Reader) -> list[str]:
    keys = []
    for i, value in enumerate(r.strings("adminSshKeys") or []):
        value = value.strip()
        if not _SSH_KEY.match(value):
            r.add(
                f"adminSshKeys[{i}]",
                "is not an OpenSSH public key line; expected 'ssh-ed25519 AAAA... comment' "
                "(the contents of a .pub file, without options)",
            )
        else:
            keys.append(value)
    return keys


def _parse_email(r: _Reader, key: str) -> str | None:
    value = r.text(key)
    if value is None:
        return None
    if not _EMAIL.match(value):
        r.add(key, f"{value!r} is not an email address; expected e.g. 'ops@example.com'")
        return None
    return value


def _parse_ca(r: _Reader) -> tuple[str | None, str | None]:
    server = r.get("acmeServer") or LETS_ENCRYPT
    issuer = r.get("caaIssuer")
    ok = True
    if not server.startswith("https://"):
        r.add("acmeServer", f"{server!r} is not an https:// ACME directory URL")
        ok = False
    if issuer is not None and _hostname_problem(issuer):
        r.add("caaIssuer", f"{issuer!r} is not a CA domain; expected e.g. 'letsencrypt.org'")
        return None, None
    if issuer is None:
        issuer = KNOWN_CA_IDENTITIES.get(server)
        if issuer is None and ok:
            r.add(
                "caaIssuer",
                f"missing for the ACME server {server!r}; set the CA's CAA identity "
                "(its documentation names it), e.g. 'letsencrypt.org'",
            )
    return (server if ok else None), issuer
