"""The deployer's local cache: file hashes by path and stat, compressed siblings by content.

Hashing a 100,000-file site on every `pulumi up` would cost minutes, and brotli at quality 11
costs seconds per megabyte; both results depend only on what they are computed from, so they
are kept: a hash while the file's path, size, mtime, ctime and inode are unchanged, a compressed
sibling forever (named by the SHA-256 of its source). It also remembers which releases each
node (by its host key) held when last seen, so a deploy of a release a node holds sends it no
manifest. Losing the cache only costs time.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from edgecdn.contract import LEASE_TOKEN

SCHEMA = 1


def default_cache_dir() -> Path:
    """$EDGECDN_CACHE_DIR, else $XDG_CACHE_HOME/edgecdn, else ~/.cache/edgecdn."""
    explicit = os.environ.get("EDGECDN_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgecdn"


class Cache:
    """Hashes and compressed siblings, in a private directory."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or default_cache_dir()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.compressed = self.root / "compressed"
        self.compressed.mkdir(exist_ok=True, mode=0o700)
        self._db = sqlite3.connect(self.root / "hashes.sqlite", timeout=30, check_same_thread=False)
        with self._db:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, stat TEXT NOT NULL, sha256 TEXT NOT NULL)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS nodes (host_key TEXT PRIMARY KEY, releases TEXT NOT NULL)")
        self._pending: list[tuple[str, str, str]] = []

    @staticmethod
    def stat_key(info: os.stat_result) -> str:
        """What must not change for a cached hash to hold."""
        return f"{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}:{info.st_ino}:{info.st_dev}"

    def known_hashes(self, prefix: str) -> dict[str, tuple[str, str]]:
        """Cached (stat key, sha256) for every path under a directory, in one query."""
        rows = self._db.execute(
            "SELECT path, stat, sha256 FROM hashes WHERE path >= ? AND path < ?", (prefix, prefix + "\uffff")
        )
        return {path: (stat, sha) for path, stat, sha in rows}

    def remember(self, path: str, stat_key: str, sha256: str) -> None:
        """Record a hash (written at the next flush)."""
        self._pending.append((path, stat_key, sha256))

    def flush(self) -> None:
        """Write remembered hashes."""
        if self._pending:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?)", self._pending)
            self._pending.clear()

    def releases_on(self, host_key: str) -> set[str]:
        """The releases a node held when last seen (nothing known: empty)."""
        row = self._db.execute("SELECT releases FROM nodes WHERE host_key = ?", (host_key,)).fetchone()
        return set(row[0].split()) if row else set()

    def remember_releases(self, host_key: str, releases: Iterable[str]) -> None:
        """Record what a node holds now."""
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO nodes VALUES (?, ?)", (host_key, " ".join(sorted(releases))))

    def sibling(self, sha256: str, ext: str) -> Path:
        """Where the compressed sibling (ext: .br or .gz) of a content is kept."""
        return self.compressed / sha256[:2] / f"{sha256}{ext}"

    def not_smaller(self, sha256: str) -> Path:
        """A marker: this content does not get smaller when compressed."""
        return self.compressed / sha256[:2] / f"{sha256}.none"

    def store(self, path: Path, data: bytes) -> None:
        """Write a cache file atomically, so a crash never leaves a truncated sibling."""
        path.parent.mkdir(exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def close(self) -> None:
        """Flush and close the hash database."""
        self.flush()
        self._db.close()


@contextlib.contextmanager
def lease_token(root: Path | None, new: Callable[[], str]) -> Iterator[tuple[str, Callable[[bool], None]]]:
    """This machine's deploy lease token, and a function to call with whether every node let go of it.

    A deploy that lost a node mid-way cannot end that node's lease, which then holds for up to
    15 minutes; the token is kept, so the next deploy from this machine carries on with that
    lease instead of being told "busy" by its own earlier run. A deploy running meanwhile from
    the same machine (the lock is taken) gets a fresh token, and so a "busy", as from anywhere else.
    """
    root = root or default_cache_dir()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    stored = root / "lease-token"
    with open(root / "lease.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield new(), lambda released: None
            return
        try:
            token = stored.read_text().strip()
        except OSError:
            token = ""
        if not LEASE_TOKEN.match(token):
            token = new()
            fd = os.open(stored, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")

        def settle(released: bool) -> None:
            if released:
                stored.unlink(missing_ok=True)

        yield token, settle


@contextlib.contextmanager
def open_cache(root: Path | None = None) -> Iterator[Cache]:
    """A cache for the length of a command."""
    cache = Cache(root)
    try:
        yield cache
    finally:
        cache.close()
