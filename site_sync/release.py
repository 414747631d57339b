"""A release: the site's files, named by a hash of their paths and contents.

The Pulumi program and the deployer both compute the id from the same function (the
contract's), so a changed site is a new release and an unchanged one is recognised as already
deployed. Reading the site checks everything a node would refuse, all at once, before any
node is touched: special files, unreadable files, symbolic links that leave the site, names
that cannot be URLs, and the limits a node enforces.
"""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from edgecdn.contract import (
    MAX_MANIFEST_FILES,
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    MAX_RELEASE_BYTES,
    RESERVED_PREFIX,
    ManifestEntry,
    file_sha256,
    is_reserved,
)
from edgecdn.contract import release_id_of as contract_release_id
from site_sync.cache import Cache

MAX_LISTED = 40  # problems shown in one message; the count says how many more
HASH_BATCH = 2000


class SiteError(Exception):
    """The site directory cannot become a release."""


@dataclass(frozen=True)
class SiteFile:
    """One file of the site: its path in the release, size, hash, and where its bytes are read."""

    path: str
    size: int
    sha256: str
    source: Path


@dataclass
class Site:
    """A site as read from disk, with what the deployer should tell the user about it."""

    files: list[SiteFile]
    left_out: list[str] = field(default_factory=list)  # dotfiles, never published
    warnings: list[str] = field(default_factory=list)

    @property
    def release_id(self) -> str:
        """The release id of these files."""
        return release_id(self.files)


def is_left_out(rel: str) -> bool:
    """Dotfiles and dot-directories (.git/, .env, .DS_Store) never become part of a release.

    A site's build output may carry them by accident (a planted .git/config held a credential);
    /.well-known/ is the exception, being meant for the web.
    """
    parts = rel.split("/")
    if parts[0] == ".well-known":
        parts = parts[1:]
    return any(part.startswith(".") for part in parts)


def _name_problem(rel: str) -> str | None:
    try:
        encoded = rel.encode()
    except UnicodeEncodeError:
        return "its name is not UTF-8, so no URL can name it; rename it"
    if any(ord(c) < 0x20 or c == "\x7f" or c == "\\" for c in rel):
        return "its name has a control character or backslash, which no URL can carry safely; rename it"
    if is_reserved(rel):
        return f"it is inside /{RESERVED_PREFIX}, which the nodes answer themselves"
    if len(encoded) > MAX_PATH_BYTES or any(len(p.encode()) > MAX_NAME_BYTES for p in PurePosixPath(rel).parts):
        return f"its path is longer than a node takes ({MAX_PATH_BYTES} bytes, {MAX_NAME_BYTES} per name)"
    return None


@dataclass
class _Walk:
    root: Path
    follow_external: bool
    found: list[tuple[str, str, int, str]] = field(default_factory=list)  # rel, path, size, stat key
    problems: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)

    def inside(self, real: Path) -> bool:
        return real == self.root or self.root in real.parents

    def directory(self, real_dir: Path, rel_dir: str, seen: frozenset[Path]) -> None:
        try:
            names = sorted(os.listdir(real_dir))
        except OSError as exc:
            self.problems.append(f"{rel_dir or '.'}/: cannot be read ({exc.strerror})")
            return
        for name in names:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            self.entry(real_dir / name, rel, seen)

    def entry(self, path: Path, rel: str, seen: frozenset[Path]) -> None:
        if is_left_out(rel):
            self.left_out.append(rel + ("/" if path.is_dir() and not path.is_symlink() else ""))
            return
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            target = Path(os.path.realpath(path))
            if not target.exists():
                self.problems.append(f"{rel}: a symbolic link to {os.readlink(path)}, which does not exist")
                return
            if not self.inside(target) and not self.follow_external:
                self.problems.append(f"{rel}: a symbolic link to {target}, outside the site")
                return
            info = target.stat()
            path = target
        if stat.S_ISDIR(info.st_mode):
            real = Path(os.path.realpath(path))
            if real in seen:
                self.problems.append(f"{rel}/: a symbolic link loop")
                return
            self.directory(real, rel, seen | {real})
            return
        if not stat.S_ISREG(info.st_mode):
            kind = (
                "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode) else "a device"
            )
            self.problems.append(f"{rel}: {kind}, not a file; remove it from the site")
            return
        problem = _name_problem(rel)
        if problem:
            self.problems.append(f"{rel!r}: {problem}")
        elif not os.access(path, os.R_OK):
            self.problems.append(f"{rel}: cannot be read (permissions); make it readable or remove it")
        else:
            self.found.append((rel, str(path), info.st_size, Cache.stat_key(info)))


def _listing(problems: list[str]) -> str:
    shown = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return shown + more


def check_limits(count: int, total: int) -> None:
    """Refuse a site over what a node takes, before anything is hashed, built or uploaded."""
    # Each text file may get two compressed siblings; the node counts them all.
    if count > MAX_MANIFEST_FILES // 3:
        raise SiteError(
            f"the site has {count} files; a node takes {MAX_MANIFEST_FILES // 3} (with their compressed "
            f"siblings), so remove {count - MAX_MANIFEST_FILES // 3} or split the site"
        )
    if total > MAX_RELEASE_BYTES:
        raise SiteError(
            f"the site is {total} bytes, {total - MAX_RELEASE_BYTES} over the {MAX_RELEASE_BYTES} bytes "
            "a node takes for one release"
        )


def _hashes(root: Path, found: list[tuple[str, str, int, str]], cache: Cache | None) -> list[str]:
    # Only the site's own entries are loaded (files reached through external links are hashed again).
    known = cache.known_hashes(f"{root}/") if cache is not None else {}
    results: list[str | None] = [
        known[path][1] if known.get(path, ("", ""))[0] == key else None for _, path, _, key in found
    ]
    del known
    missing = [i for i, sha in enumerate(results) if sha is None]
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        # In batches: pool.map queues every task at once, and 100,000 of them cost 100 MB.
        for start in range(0, len(missing), HASH_BATCH):
            batch = missing[start : start + HASH_BATCH]
            for i, sha in zip(batch, pool.map(lambda i: file_sha256(Path(found[i][1])), batch), strict=True):
                results[i] = sha
                if cache is not None:
                    cache.remember(found[i][1], found[i][3], sha)
            if cache is not None:
                cache.flush()
    return [sha for sha in results if sha is not None]


def scan_site(site_dir: Path, cache: Cache | None = None, follow_external: bool = False) -> Site:
    """Every file of the site (dotfiles left out); SiteError listing every problem at once."""
    root = Path(os.path.realpath(site_dir))
    if not (root / "index.html").is_file():
        raise SiteError(f"{site_dir} has no index.html; point siteDir at the generated site")
    walk = _Walk(root, follow_external)
    walk.directory(root, "", frozenset({root}))
    if walk.problems:
        advice = (
            "Copy link targets into the site (e.g. `cp -rL site site.copy`), or pass --follow-external-symlinks "
            "to publish what external links point at."
            if any("outside the site" in p for p in walk.problems)
            else "Fix these and deploy again."
        )
        raise SiteError(
            f"{len(walk.problems)} paths in {site_dir} cannot be published:\n{_listing(walk.problems)}\n{advice}"
        )
    check_limits(len(walk.found), sum(size for _, _, size, _ in walk.found))
    hashes = _hashes(root, walk.found, cache)
    files = [SiteFile(rel, size, sha, Path(path)) for (rel, path, size, _), sha in zip(walk.found, hashes, strict=True)]
    files.sort(key=lambda f: f.path)
    by_case: dict[str, list[str]] = {}
    for f in files:
        by_case.setdefault(f.path.lower(), []).append(f.path)
    warnings = [
        f"{' and '.join(paths)} differ only in case: a case-insensitive disk (macOS, Windows) keeps one of them"
        for paths in by_case.values()
        if len(paths) > 1
    ]
    return Site(files, walk.left_out, warnings)


def release_id(files: list[SiteFile]) -> str:
    """The content hash of a site: changes whenever a path or a byte changes."""
    return contract_release_id(ManifestEntry(path=f.path, size=f.size, sha256=f.sha256) for f in files)


def release_id_of(site_dir: Path, cache: Cache | None = None, follow_external: bool = False) -> str:
    """The release id of the site as it is on disk now."""
    return scan_site(site_dir, cache, follow_external).release_id
