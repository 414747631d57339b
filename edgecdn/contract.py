"""The node contract: what the Pulumi program, the deployer and every node must agree on.

Names and their patterns, the release id and how it is computed, the health marker, the paths
a node keeps for itself, file names on the node, how a certificate is identified, the deploy
agent's exit codes and the shape of its status answer. Everything here is defined once; the
other modules import it, and a test fails when one of these strings is spelled anywhere else.

Standard library only: this file also runs on every node, installed beside the deploy agent.
"""

from __future__ import annotations

import enum
import hashlib
import re
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import NotRequired, TypedDict

# ---------------------------------------------------------------- names

DOMAIN = re.compile(r"^(?=.{1,253}$)(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))+$")
NODE_NAME = re.compile(r"^[a-z](?:[a-z0-9-]{0,30}[a-z0-9])?$")
RELEASE_ID_LENGTH = 20
RELEASE_ID = re.compile(rf"^[0-9a-f]{{{RELEASE_ID_LENGTH}}}$")
RELEASE_ID_FORM = f"{RELEASE_ID_LENGTH} lower-case hex digits"
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

# ---------------------------------------------------------------- paths in a release

# The node writes this prefix into every release itself; a site may not ship anything under it.
RESERVED_PREFIX = ".well-known/edgecdn/"
# The health marker: a file in each release, served by the same file server as the pages, so a
# web server that cannot serve files fails its health check.
HEALTH_FILE = RESERVED_PREFIX + "health"
HEALTH_PATH = "/" + HEALTH_FILE
HEALTH_MARKER = "edgecdn-ok"
# Site files that configure the node instead of being served.
REDIRECTS_FILE, HEADERS_FILE, SETTINGS_FILE = "_redirects", "_headers", "_edgecdn.json"
RULE_FILES = (REDIRECTS_FILE, HEADERS_FILE, SETTINGS_FILE)


def health_body(release_id: str) -> str:
    """The health marker's content for a release; a health check looks for it in the answer."""
    return f"{HEALTH_MARKER} release={release_id}\n"


def is_reserved(rel: str) -> bool:
    """Whether a site path lies where the node writes its own files."""
    return rel == RESERVED_PREFIX.rstrip("/") or rel.startswith(RESERVED_PREFIX)


# ---------------------------------------------------------------- file names on a node

# The agent reads the node's layout (paths, ports, names) from this file beside its launcher.
LAYOUT_FILE = "layout.json"

# ---------------------------------------------------------------- limits a node enforces

MAX_RELEASE_BYTES = 4 << 30
# A 100,000-file site with a brotli and a gzip sibling for every text file fits, with room.
MAX_MANIFEST_FILES = 400_000
MAX_MANIFEST_BYTES = 96 << 20
FREE_DISK_FLOOR_BYTES = 1 << 30
MAX_PATH_BYTES = 1024
MAX_NAME_BYTES = 255
MAX_CERT_BYTES = 64 << 10
MIN_CERT_DAYS_LEFT = 7
KEEP_RANGE = range(2, 100)

# ---------------------------------------------------------------- files sent with finalize

# A deploy that changes little sends the files a node lacks with its `finalize` request, in the
# same exchange, instead of an rsync session (several round trips more). Each file is a line
# "<size> <path>\n" followed by exactly <size> bytes; paths are manifest paths, which never
# hold a newline.
MAX_INLINE_BYTES = 16 << 20
_INLINE_HEADER = re.compile(rb"^([0-9]{1,10}) ([^\n]+)$")


def pack_inline(files: Iterable[tuple[str, bytes]]) -> bytes:
    """Files as `finalize` takes them on its standard input."""
    return b"".join(f"{len(data)} {path}\n".encode() + data for path, data in files)


def unpack_inline(data: bytes) -> list[tuple[str, bytes]]:
    """The (path, bytes) pairs of `pack_inline`'s output; ValueError naming what is malformed."""
    files, at = [], 0
    while at < len(data):
        end = data.find(b"\n", at, at + MAX_PATH_BYTES + 16)
        header = _INLINE_HEADER.match(data[at:end]) if end >= 0 else None
        if header is None:
            raise ValueError(f"malformed file header at byte {at}")
        size, path = int(header.group(1)), header.group(2).decode("utf-8")
        if end + 1 + size > len(data):
            raise ValueError(f"{path[:80]!r} is cut short")
        files.append((path, data[end + 1 : end + 1 + size]))
        at = end + 1 + size
    return files


# ---------------------------------------------------------------- the release id


class ManifestEntry(TypedDict):
    """One file of a release as the manifest lists it."""

    path: str
    size: int
    sha256: str
    derived: NotRequired[bool]  # a compressed sibling (x.br, x.gz) of another entry


def release_id_of(entries: Iterable[ManifestEntry]) -> str:
    """The release id: a hash over the site's own files' paths, sizes and contents.

    Compressed siblings are left out of the formula: a node proves each one decompresses to
    its source, so the sources determine every byte a node can serve.
    """
    digest = hashlib.sha256()
    for e in sorted((e for e in entries if not e.get("derived")), key=lambda e: e["path"]):
        digest.update(f"{e['path']}\0{e['size']}\0{e['sha256']}\n".encode())
    return digest.hexdigest()[:RELEASE_ID_LENGTH]


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's content, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# Every file's modification time is derived from its content, on the deployer and on every
# node alike, so the web server's ETag (mtime and size) changes exactly when the content does
# and is the same on every node. The times lie in the past (1973 to 2007): a Last-Modified in
# the future would look broken, and caches never use it since every answer has Cache-Control.
CONTENT_MTIME_EPOCH = 100_000_000
CONTENT_MTIME_SPAN = 1 << 30


def content_mtime(sha256: str) -> int:
    """The modification time a file with this content gets everywhere."""
    return CONTENT_MTIME_EPOCH + int(sha256[:8], 16) % CONTENT_MTIME_SPAN


# ---------------------------------------------------------------- deploy leases

# A deployer holds a lease on every node for the length of a deploy, so a second deploy (CI and
# a laptop at once) is told "busy" instead of interleaving. A lease always expires.
LEASE_TOKEN = re.compile(r"^[0-9a-f]{32}$")
LEASE_PREFIX = "lease="
MAX_LEASE_SECONDS = 900
# However often it is renewed, one deployer holds a node at most this long in a row: a stuck or
# hostile loop of renewals cannot keep every other deploy out.
MAX_LEASE_HOLD_SECONDS = 3600


# ---------------------------------------------------------------- certificates

_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+-----END CERTIFICATE-----")


def leaf_fingerprint(pem: str | bytes) -> str:
    """The SHA-256 of the first certificate's DER bytes: how a node and the deployer name a certificate.

    PEM text varies (line endings, order of blocks, a key in the same file); the leaf's DER
    does not, so two sides comparing fingerprints agree exactly when they hold the same leaf.
    """
    text = pem.decode("ascii", "replace") if isinstance(pem, bytes) else pem
    block = _CERTIFICATE.search(text)
    if block is None:
        raise ValueError("no PEM certificate found")
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(block.group(0).replace("\r", ""))).hexdigest()


# ---------------------------------------------------------------- the agent's answers


class ExitCode(enum.IntEnum):
    """How the deploy agent's process ends."""

    OK = 0
    REFUSED = 2  # the request was checked and refused; the JSON answer says why
    INTERNAL = 3  # the agent failed; the node's state is as before the request
    BUSY = 4  # another deploy holds the node; try again when it is done


class CertificateStatus(TypedDict):
    """The certificate a node serves."""

    not_after: str
    names: list[str]
    fingerprint: str


class NodeStatus(TypedDict):
    """The agent's answer to `status`."""

    ok: bool
    node: str
    active: str | None
    intact: bool | None
    previous: str | None
    releases: list[str]
    staged: list[str]
    certificate: CertificateStatus | None


class StatusError(ValueError):
    """A status answer that does not have the contract's shape."""


def parse_status(doc: object) -> NodeStatus:
    """Check that an agent's answer is a NodeStatus; raise StatusError naming the field otherwise."""
    if not isinstance(doc, dict) or doc.get("ok") is not True:
        raise StatusError("the answer is not a successful status")
    release_or_none = lambda v: v is None or (isinstance(v, str) and bool(RELEASE_ID.match(v)))  # noqa: E731
    checks = {
        "node": isinstance(doc.get("node"), str),
        "active": release_or_none(doc.get("active")),
        "intact": doc.get("intact") is None or isinstance(doc.get("intact"), bool),
        "previous": release_or_none(doc.get("previous")),
        "releases": isinstance(doc.get("releases"), list) and all(map(release_or_none, doc["releases"])),
        "staged": isinstance(doc.get("staged"), list) and all(map(release_or_none, doc["staged"])),
        "certificate": _is_certificate_status(doc.get("certificate")),
    }
    wrong = [name for name, good in checks.items() if not good]
    if wrong:
        raise StatusError(f"the status answer has a malformed {', '.join(wrong)}")
    return NodeStatus(
        ok=True,
        node=doc["node"],
        active=doc["active"],
        intact=doc["intact"],
        previous=doc["previous"],
        releases=list(doc["releases"]),
        staged=list(doc["staged"]),
        certificate=doc["certificate"],
    )


def _is_certificate_status(value: object) -> bool:
    if value is None:
        return True
    return (
        isinstance(value, dict)
        and isinstance(value.get("not_after"), str)
        and isinstance(value.get("names"), list)
        and all(isinstance(n, str) for n in value["names"])
        and isinstance(value.get("fingerprint"), str)
        and bool(SHA256_HEX.match(value["fingerprint"]))
    )
