"""Checking a node over HTTPS by its address, with the site's name for SNI and Host."""

from __future__ import annotations

import http.client
import socket
import ssl
import time
from dataclasses import dataclass

from edgecdn.contract import HEALTH_PATH, health_body


@dataclass(frozen=True)
class Response:
    """What a node answered."""

    status: int
    headers: dict[str, str]
    body: bytes
    tls_version: str
    ttfb_ms: float


def fetch(
    address: str,
    host: str,
    path: str = "/",
    port: int = 443,
    ca_file: str | None = None,
    timeout: float = 10,
    headers: dict[str, str] | None = None,
) -> Response:
    """GET path from the node at address, verifying its certificate for host."""
    context = ssl.create_default_context(cafile=ca_file)
    started = time.perf_counter()
    with (
        socket.create_connection((address, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Connection: close", "User-Agent: edgecdn-probe"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        tls.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        response = http.client.HTTPResponse(tls)
        response.begin()
        ttfb = (time.perf_counter() - started) * 1000
        body = response.read()
        return Response(
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            body,
            tls.version() or "",
            ttfb,
        )


def check_health(address: str, host: str, release_id: str, port: int = 443, ca_file: str | None = None) -> str | None:
    """None when the node serves release_id and is healthy; otherwise what is wrong."""
    try:
        answer = fetch(address, host, HEALTH_PATH, port, ca_file)
    except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
        return f"HTTPS check failed: {exc}"
    text = answer.body.decode(errors="replace")
    if answer.status != 200 or text != health_body(release_id):
        return f"health answered {answer.status} {text.strip()[:120]!r}, expected release {release_id}"
    return None
