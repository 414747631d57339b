"""A release: the site's files, named by a hash of their paths and contents.

The Pulumi program and the deployer both compute the id from the same function, so a changed
site is a new release and an unchanged one is recognised as already deployed.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from edgecdn.contract import MAX_NAME_BYTES, MAX_PATH_BYTES, RESERVED_PREFIX, ManifestEntry, file_sha256, is_reserved
from edgecdn.contract import release_id_of as contract_release_id


class SiteError(Exception):
    """The site directory cannot become a release."""


@dataclass(frozen=True)
class SiteFile:
    """One regular file of the site, by its path relative to the site root."""

    path: str
    size: int
    sha256: str


def is_left_out(rel: str) -> bool:
    """Dotfiles and dot-directories (.git/, .env, .DS_Store) never become part of a release.

    A site's build output may carry them by accident (a planted .git/config held a credential);
    /.well-known/ is the exception, being meant for the web.
    """
    parts = rel.split("/")
    if parts[0] == ".well-known":
        parts = parts[1:]
    return any(part.startswith(".") for part in parts)


def left_out_paths(site_dir: Path) -> list[str]:
    """The dotfiles and dot-directories of a site that a release leaves out, for the deploy to say so."""
    found = []
    for dirpath, dirnames, filenames in os.walk(site_dir):
        rel_dir = Path(dirpath).relative_to(site_dir).as_posix()
        for name in sorted(dirnames + filenames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if is_left_out(rel):
                found.append(rel + ("/" if name in dirnames else ""))
        dirnames[:] = [d for d in dirnames if not is_left_out(d if rel_dir == "." else f"{rel_dir}/{d}")]
    return found


def scan_site(site_dir: Path) -> list[SiteFile]:
    """Every regular file under site_dir but dotfiles, sorted by path; refuses links and special files."""
    root = Path(site_dir)
    if not (root / "index.html").is_file():
        raise SiteError(f"{root} has no index.html; point siteDir at the generated site")
    files: list[SiteFile] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        dirnames[:] = sorted(d for d in dirnames if not is_left_out(d if rel_dir == "." else f"{rel_dir}/{d}"))
        filenames = [f for f in filenames if not is_left_out(f if rel_dir == "." else f"{rel_dir}/{f}")]
        for name in sorted(filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]):
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            mode = full.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise SiteError(
                    f"{rel} is a symbolic link; edgecdn ships regular files only, so copy the "
                    "target into the site instead"
                )
            if not stat.S_ISREG(mode):
                raise SiteError(f"{rel} is not a regular file; remove it from the site")
            _check_path(rel)
            files.append(SiteFile(rel, full.stat().st_size, file_sha256(full)))
    files.sort(key=lambda f: f.path)
    return files


def _check_path(rel: str) -> None:
    # A site that ships the nodes' own paths is refused, not half-served.
    if is_reserved(rel):
        raise SiteError(f"{rel} is inside /{RESERVED_PREFIX}, which the nodes answer themselves")
    if any(ord(c) < 0x20 or c == "\x7f" or c == "\\" for c in rel):
        raise SiteError(f"{rel!r} has a control character or backslash in its name; rename it")
    if len(rel.encode()) > MAX_PATH_BYTES or any(len(p.encode()) > MAX_NAME_BYTES for p in PurePosixPath(rel).parts):
        raise SiteError(f"{rel!r} is too long a path for the nodes' file system")


def release_id(files: list[SiteFile]) -> str:
    """The content hash of a site: changes whenever a path or a byte changes."""
    return contract_release_id(ManifestEntry(path=f.path, size=f.size, sha256=f.sha256) for f in files)


def release_id_of(site_dir: Path) -> str:
    """The release id of the site as it is on disk now."""
    return release_id(scan_site(site_dir))
