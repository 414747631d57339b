"""What every part of the deploy agent shares: its error, the paths it may touch, safe file writes.

The agent reads and writes only under the node root and the TLS directory named in its layout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from edgecdn.contract import RELEASE_ID, RELEASE_ID_FORM

Layout = dict[str, Any]  # the node's layout.json, as rendered by edgecdn.node.files.render_layout
Answer = dict[str, Any]  # a verb's JSON answer


class AgentError(Exception):
    """A refused or failed request; the message is safe to show the deployer."""

    def __init__(self, message: str, code: str = "refused") -> None:
        super().__init__(message)
        self.code = code


class Paths:
    """Every path the agent may touch, derived from the layout."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.root = Path(layout["root"])
        self.releases = self.root / "releases"
        self.staging = self.root / "staging"
        self.verifying = self.root / "verifying"
        self.meta = self.root / "meta"
        self.state = Path(layout["root"]) / "state"
        self.site_snippet = self.state / "site.caddy"
        self.identity_snippet = self.state / "identity.caddy"
        # The release the web server serves, and the one before it: read by every request.
        self.served = self.state / "served"
        self.served_previous = self.state / "served-previous"
        self.current = self.root / "current"
        self.previous = self.root / "previous"
        self.tls = Path(layout["tls_dir"])
        self.cert = self.tls / "fullchain.pem"
        self.key = self.tls / "key.pem"
        self.cert_installed = self.tls / "installed"

    def release(self, release_id: str) -> Path:
        """The directory of a finalized release."""
        return self.releases / checked_release(release_id)

    def link_target(self, link: Path) -> str | None:
        """The release a link (current, previous) points at, if any."""
        try:
            target = os.readlink(link)
        except FileNotFoundError:
            return None
        name = Path(target).name
        return name if RELEASE_ID.match(name) else None


def checked_release(release_id: str) -> str:
    """The release id, or a refusal when it does not have the contract's form."""
    if not RELEASE_ID.match(release_id):
        raise AgentError(f"{release_id[:40]!r} is not a release id ({RELEASE_ID_FORM})")
    return release_id


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Replace a file in one step: readers see the old content or the new, never a mix."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_symlink(link: Path, target: str) -> None:
    """Point a link somewhere else in one step."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _make_tree_writable(path: Path) -> None:
    # Releases are read-only (0555 directories); deleting one needs write access back.
    for dirpath, dirnames, _ in os.walk(path):
        os.chmod(dirpath, 0o755)  # noqa: S103 - released files are public web content
        for d in dirnames:
            full = Path(dirpath) / d
            if not full.is_symlink():
                os.chmod(full, 0o755)  # noqa: S103 - as above


def remove_tree(path: Path) -> None:
    """Delete a file, link or (read-only) release tree."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        _make_tree_writable(path)
        shutil.rmtree(path)


def run(argv: list[str], stdin: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """Run a fixed program (never a shell), capturing its output, within a time limit."""
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout, check=False)
