"""Helpers for tests against real lab nodes: HTTPS, HTTP/3, raw SSH to the agent, odd certificates."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from site_sync.handoff import NodeTarget
from site_sync.probe import Response, fetch
from site_sync.transport import Credentials, ssh_options

EXAMPLE_SITE = Path(__file__).resolve().parent.parent / "example-site"
WASM_MODULE = b"\x00asm\x01\x00\x00\x00"


@dataclass(frozen=True)
class Lab:
    """A running lab as the tests see it."""

    dir: Path
    description: dict

    @property
    def domain(self) -> str:
        return self.description["domain"]

    @property
    def ca(self) -> str:
        return self.description["ca_cert"]

    @property
    def nodes(self) -> list[dict]:
        return self.description["nodes"]

    def get(self, path: str, node: int = 0, headers: dict[str, str] | None = None, host: str | None = None) -> Response:
        n = self.nodes[node]
        return fetch(n["address"], host or self.domain, path, n["https_port"], self.ca, headers=headers)

    def target(self, node: int = 0, host_key: str | None = None) -> NodeTarget:
        n = self.nodes[node]
        return NodeTarget(
            n["name"], n["address"], n["ssh_port"], n["user"], host_key or n["host_key"], "lab", n["https_port"]
        )

    def ssh(
        self, *words: str, node: int = 0, stdin: bytes = b"", options: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess:
        """Run ssh with the lab's deploy key against a node, as an attacker holding the key would."""
        target = self.target(node)
        known = self.dir / "known_hosts_test"
        known.write_text(f"[{target.address}]:{target.port} {target.host_key}\n")
        creds = Credentials(Path(self.description["deploy_key_file"]), known)
        argv = [*ssh_options(creds, target), *options, target.address, *words]
        return subprocess.run(argv, input=stdin, capture_output=True, timeout=60, check=False)

    def agent(self, *words: str, node: int = 0, stdin: bytes = b"") -> dict:
        """An agent verb's JSON answer."""
        result = self.ssh(*words, node=node, stdin=stdin)
        return json.loads(result.stdout.decode().strip().splitlines()[-1])

    def rsync(self, *args: str, node: int = 0) -> subprocess.CompletedProcess:
        """rsync through the agent with the deploy key."""
        target = self.target(node)
        known = self.dir / "known_hosts_test"
        known.write_text(f"[{target.address}]:{target.port} {target.host_key}\n")
        creds = Credentials(Path(self.description["deploy_key_file"]), known)
        shell = " ".join(ssh_options(creds, target))
        argv = ["rsync", "-e", shell, *[a.replace("NODE:", f"{target.address}:") for a in args]]
        return subprocess.run(argv, capture_output=True, timeout=60, check=False)

    def node_dir(self, node: int = 0) -> Path:
        return Path(self.nodes[node]["dir"])


def write_test_site(root: Path, extra: dict[str, bytes] | None = None) -> Path:
    """The example site plus one file of every content type the nodes must label right."""
    shutil.copytree(EXAMPLE_SITE, root)
    files = {
        "data.json": b'{"ok": true}',
        "logo.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="1" height="1"/>',
        "module.wasm": WASM_MODULE,
        "fonts/body.woff2": b"wOF2" + b"\0" * 60,
        "img/photo.avif": b"\0\0\0\x1cftypavif" + b"\0" * 40,
        "img/photo.webp": b"RIFF\x24\0\0\0WEBPVP8 " + b"\0" * 40,
        "feed.xml": b'<?xml version="1.0"?><rss version="2.0"></rss>',
        "robots.txt": b"User-agent: *\nAllow: /\n",
        "assets/old-only.3b9d2e1f0a.js": b"console.log('only in the first release')",
        "docs/index.html": b"<!doctype html><title>docs</title>" + b"<p>documentation</p>" * 40,
        "big.css": b"body { margin: 0 }\n" * 200,
        "assets/index-BmF4dz3q.js": b"export {}",
        "img/screenshot2.png": b"\x89PNG\r\n\x1a\n",
        "files/report_20240101.pdf": b"%PDF-1.4",
        # Names that need escaping in a URL, and files a site carries but must never serve.
        "notes/c#-notes.html": b"<!doctype html><title>c# notes</title>",
        "what?.html": b"<!doctype html><title>what</title>",
        "100%.html": b"<!doctype html><title>percent</title>",
        "caf\u00e9.html": b"<!doctype html><title>cafe</title>",
        "with space/index.html": b"<!doctype html><title>space</title>",
        ".git/config": b"[remote]\n\turl = https://user:secret@git.example/repo\n",
        ".env": b"SECRET=1\n",
        ".well-known/security.txt": b"Contact: mailto:security@example.com\n",
        "deleted-page.html": b"<!doctype html><title>only in the first release</title>",
        # Web fonts and text formats real sites carry (Sphinx ships its sources as .txt and .py).
        "fonts/a.otf": b"OTTO" + bytes(range(256)) * 2,
        "fonts/a.ttf": b"\x00\x01\x00\x00" + b"glyf" * 200,
        "fonts/a.eot": b"\x00" * 300,
        "favicon.ico": b"\x00\x00\x01\x00" + b"\x00" * 60,
        "src/example.py": b"def hello():\n    return 'hello'\n" * 20,
        "legacy.htm": "<html><head><meta charset=iso-8859-1><title>caf\u00e9</title></head></html>".encode("latin-1"),
    }
    redirects = (root / "_redirects").read_bytes() + b"/go/:id /posts/:id/ 307\n/app/* /index.html 200\n"
    headers = (root / "_headers").read_bytes() + b"/robots.txt\n  Cache-Control: public, max-age=60\n"
    files.update({"_redirects": redirects, "_headers": headers})
    for path, data in {**files, **(extra or {})}.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root


def h3_get(lab: Lab, path: str, node: int = 0) -> tuple[dict[bytes, bytes], bytes]:
    """GET over HTTP/3 (QUIC on UDP) from a node."""
    headers, body, _ = h3_exchange(lab, path, node)
    return headers, body


def h3_certificate_serial(lab: Lab, node: int = 0) -> int:
    """The serial number of the certificate a node presents over QUIC."""
    return h3_exchange(lab, "/", node)[2]


def h3_exchange(lab: Lab, path: str, node: int = 0) -> tuple[dict[bytes, bytes], bytes, int]:
    """GET over HTTP/3: headers, body, and the serial of the certificate the QUIC handshake saw."""
    n = lab.nodes[node]

    class Client(QuicConnectionProtocol):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.h3 = H3Connection(self._quic)
            self.headers: dict[bytes, bytes] = {}
            self.body = b""
            self.done: asyncio.Future = asyncio.get_running_loop().create_future()

        def quic_event_received(self, event) -> None:
            for ev in self.h3.handle_event(event):
                if isinstance(ev, HeadersReceived):
                    self.headers.update(dict(ev.headers))
                elif isinstance(ev, DataReceived):
                    self.body += ev.data
                if getattr(ev, "stream_ended", False) and not self.done.done():
                    self.done.set_result(True)

    async def run() -> tuple[dict[bytes, bytes], bytes, int]:
        config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=lab.domain)
        config.load_verify_locations(lab.ca)
        async with connect(n["address"], n["https_port"], configuration=config, create_protocol=Client) as client:
            assert isinstance(client, Client)
            stream = client._quic.get_next_available_stream_id()
            authority = f"{lab.domain}:{n['https_port']}".encode()
            client.h3.send_headers(
                stream,
                [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", authority), (b":path", path.encode())],
                end_stream=True,
            )
            client.transmit()
            await asyncio.wait_for(client.done, 10)
            peer = client._quic.tls._peer_certificate
            assert peer is not None
            return client.headers, client.body, peer.serial_number

    return asyncio.run(run())


def tls_version(lab: Lab, version: ssl.TLSVersion, node: int = 0) -> str:
    """Handshake with only one TLS version offered; the version agreed."""
    import socket

    n = lab.nodes[node]
    context = ssl.create_default_context(cafile=lab.ca)
    context.minimum_version = context.maximum_version = version
    with (
        socket.create_connection((n["address"], n["https_port"]), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=lab.domain) as tls,
    ):
        return tls.version() or ""


def served_certificate_serial(lab: Lab, node: int = 0) -> int:
    """The serial number of the certificate a node presents."""
    import socket

    n = lab.nodes[node]
    context = ssl.create_default_context(cafile=lab.ca)
    with (
        socket.create_connection((n["address"], n["https_port"]), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=lab.domain) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def issue_certificate(
    lab: Lab,
    names: list[str],
    days: float = 30,
    not_before_days: float = -1,
    key: Any = None,
    extra_names: tuple[x509.GeneralName, ...] = (),
    ca: bool = False,
) -> tuple[str, str, int]:
    """A certificate signed by the lab CA: (chain PEM, key PEM, serial); odd ones on request."""
    ca_dir = Path(lab.ca).parent
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(Path(lab.ca).read_bytes())
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    serial = x509.random_serial_number()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "edgecdn.test")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now + dt.timedelta(days=not_before_days))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([*(x509.DNSName(n) for n in names), *extra_names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return chain.decode(), key_pem.decode(), serial


@dataclass(frozen=True)
class BuiltTree:
    """A release as the deployer prepares it, written out as a plain directory (for raw rsync tests)."""

    release_id: str
    root: Path
    entries: list[dict[str, Any]]

    def manifest(self, entries: list[dict[str, Any]] | None = None) -> bytes:
        """The manifest JSON the node's `begin` takes (the given entries, or the real ones)."""
        return json.dumps({"release_id": self.release_id, "files": entries or self.entries}).encode()


def build_tree(site: Path, out: Path) -> BuiltTree:
    """Prepare a site's release (with compressed siblings) and copy every file into `out`."""
    from site_sync.build import prepare_release
    from site_sync.cache import open_cache
    from site_sync.release import scan_site

    with open_cache() as cache:
        release = prepare_release(scan_site(site, cache), cache)
    for rel, source in release.sources.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, out / rel)
    return BuiltTree(release.release_id, out, [dict(e) for e in release.entries])


class LinesProgress:
    """Progress that keeps every line, for tests."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, line: str) -> None:
        self.lines.append(line)

    def node(self, name: str, state: str) -> None:
        self.lines.append(f"{name}: {state}")

    def close(self) -> None:
        pass
