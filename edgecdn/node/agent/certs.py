"""Certificates: check a key and chain a deployer sends, then install them without an outage.

The names a certificate covers come from its DNS subject alternative names, decoded as
structure. CA certificates, ones not yet valid or expiring within a week, and key types the web
server cannot load are refused. The web server proves it loads the new pair before it replaces
the served one, and the old pair goes back if the server does not come back: installing a good
certificate with the deploy key always brings a node back.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgecdn.contract import MIN_CERT_DAYS_LEFT, CertificateStatus, leaf_fingerprint
from edgecdn.node.agent import store, webserver
from edgecdn.node.agent.common import AgentError, Answer, Paths, run

# Key types the web server (Go's crypto/tls) can serve: RSA, ECDSA on these curves, Ed25519.
_SERVABLE_KEYS = re.compile(r"Public Key Algorithm: (rsaEncryption|ED25519|id-ecPublicKey)")
_SERVABLE_CURVES = ("prime256v1", "secp384r1", "secp521r1")


def _openssl_date(text: str) -> dt.datetime:
    return dt.datetime.strptime(text.strip(), "%b %d %H:%M:%S %Y %Z").replace(tzinfo=dt.UTC)


def _dns_names(paths: Paths, leaf: bytes) -> list[str]:
    """The leaf's DNS subject alternative names, decoded as structure (a URI can't pose as one)."""
    fd, tmp = tempfile.mkstemp(dir=paths.state, prefix=".leaf.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(leaf)
        decoded = ssl._ssl._test_decode_cert(tmp)  # type: ignore[attr-defined]  # CPython's own X.509 decoder
    except (ssl.SSLError, OSError, AttributeError):
        raise AgentError("the certificate's names cannot be read") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return [value for kind, value in decoded.get("subjectAltName", ()) if kind == "DNS"]


@dataclass(frozen=True)
class CertFacts:
    """What a servable leaf certificate says."""

    not_before: dt.datetime
    not_after: dt.datetime
    names: list[str]
    pubkey: str


def _cert_facts(paths: Paths, pem: bytes) -> CertFacts:
    """What the leaf certificate says: validity, DNS names, public key; refused unless servable."""
    openssl = paths.layout["openssl_bin"]
    result = run([openssl, "x509", "-noout", "-text", "-startdate", "-enddate", "-pubkey"], pem)
    if result.returncode != 0:
        raise AgentError("the certificate is not a PEM X.509 certificate")
    out = result.stdout.decode(errors="replace")
    start, end = re.search(r"notBefore=(.+)", out), re.search(r"notAfter=(.+)", out)
    pubkey = re.search(r"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", out, re.S)
    if not start or not end or not pubkey:
        raise AgentError("the certificate has no validity dates or public key")
    if re.search(r"CA:TRUE", out):
        raise AgentError("that is a CA certificate; install the site's own (leaf) certificate first in the chain")
    algorithm = _SERVABLE_KEYS.search(out)
    curve = re.search(r"ASN1 OID: (\S+)", out)
    if not algorithm or (
        algorithm.group(1) == "id-ecPublicKey" and (not curve or curve.group(1) not in _SERVABLE_CURVES)
    ):
        raise AgentError(
            "the certificate's key type is one the web server cannot serve; use RSA, ECDSA P-256/384/521 or Ed25519"
        )
    pem_leaf = PEM_BLOCK.match(pem.lstrip())
    return CertFacts(
        not_before=_openssl_date(start.group(1)),
        not_after=_openssl_date(end.group(1)),
        names=_dns_names(paths, pem_leaf.group(0) if pem_leaf else pem),
        pubkey=pubkey.group(0),
    )


PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----\r?\n[A-Za-z0-9+/=\r\n]+-----END \1-----\r?\n?")


def split_pem_bundle(data: bytes) -> tuple[bytes, bytes]:
    """(chain, key) from a bundle of exactly one private key and one or more certificates."""
    blocks = list(PEM_BLOCK.finditer(data))
    leftover = PEM_BLOCK.sub(b"", data).strip()
    keys = [b for b in blocks if b.group(1).endswith(b"PRIVATE KEY")]
    certs = [b for b in blocks if b.group(1) == b"CERTIFICATE"]
    if leftover or len(keys) != 1 or not certs or len(keys) + len(certs) != len(blocks):
        raise AgentError("expected on standard input a PEM bundle: one private key and its certificate chain")
    as_pem = lambda block: block.group(0).rstrip(b"\r\n") + b"\n"  # noqa: E731
    return b"".join(as_pem(c) for c in certs), as_pem(keys[0])


def _covers(names: list[str], host: str) -> bool:
    return any(name == host or (name.startswith("*.") and host.split(".", 1)[-1] == name[2:]) for name in names)


def install(paths: Paths, bundle: bytes) -> Answer:
    """Install the key and certificate chain (one PEM bundle on stdin) after checking them.

    The web server must load the new pair before it replaces the served one; if the reload
    fails, the old pair is put back, so a bad certificate can never take a node down and a
    good one always brings it back.
    """
    chain, key = split_pem_bundle(bundle)
    facts = _cert_facts(paths, chain)
    missing = [n for n in [paths.layout["domain"], *paths.layout["aliases"]] if not _covers(facts.names, n)]
    if missing:
        raise AgentError(f"the certificate does not cover {', '.join(missing)}")
    now = dt.datetime.now(dt.UTC)
    if facts.not_before > now:
        raise AgentError(f"the certificate is not valid before {facts.not_before.isoformat()}")
    if facts.not_after <= now:
        raise AgentError(f"the certificate expired at {facts.not_after.isoformat()}")
    if facts.not_after - now < dt.timedelta(days=MIN_CERT_DAYS_LEFT):
        raise AgentError(f"the certificate expires within {MIN_CERT_DAYS_LEFT} days; renew it first")
    key_pub = run([paths.layout["openssl_bin"], "pkey", "-pubout"], key)
    if key_pub.returncode != 0:
        raise AgentError("the key is not a PEM private key")
    if key_pub.stdout.decode().strip() != facts.pubkey.strip():
        raise AgentError("the private key does not belong to the certificate")
    not_after = facts.not_after.isoformat()
    unchanged = paths.cert_installed.exists() and paths.cert.read_bytes() == chain and paths.key.read_bytes() == key
    if not unchanged:
        webserver.loads_certificate(paths, chain, key)
        # The key readable by the caddy group only; the old pair comes back if Caddy refuses the new one.
        files: dict[Path, bytes | None] = {paths.key: key, paths.cert: chain, paths.cert_installed: not_after.encode()}
        config = store.render_config(paths, paths.link_target(paths.current), cert_ready=True)
        store.apply_config(paths, {**files, **config}, reload=True, private=frozenset({paths.key}))
    return {"certificate": certificate_status(paths), "changed": not unchanged}


def certificate_status(paths: Paths) -> CertificateStatus | None:
    """The installed certificate as the status answer names it (None for the placeholder)."""
    if not paths.cert_installed.exists():
        return None
    chain = paths.cert.read_bytes()
    facts = _cert_facts(paths, chain)
    return CertificateStatus(
        not_after=facts.not_after.isoformat(), names=facts.names, fingerprint=leaf_fingerprint(chain)
    )
