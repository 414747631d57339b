"""A release ready to send: the site's files plus precompressed siblings, and its manifest.

Compressed siblings (`x.css.br` at brotli 11, `x.css.gz` at gzip 9) are made only for
compressible types, kept only when smaller, and made once per content: the local cache keeps
them by the SHA-256 of their source. Nothing is copied: the manifest names every file, and
each file's bytes are read from where they already are (the site, or the cache) when, and
only if, a node needs them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import brotli

from edgecdn.contract import ManifestEntry
from site_sync.cache import Cache
from site_sync.release import Site, SiteFile

# Text and the font and icon formats that are not compressed already (woff and woff2 are).
COMPRESSIBLE = frozenset(
    ".html .htm .css .js .mjs .json .svg .xml .txt .webmanifest .map .wasm .ico .otf .ttf .eot "
    ".py .rs .c .h .md .rst .ini .cfg .toml .yaml .yml .csv".split()
)
MIN_COMPRESS_BYTES = 256
SIBLINGS = (".br", ".gz")


@dataclass(frozen=True)
class Release:
    """A release ready to upload: its id, manifest, and where each file's bytes come from."""

    release_id: str
    entries: tuple[ManifestEntry, ...]
    sources: dict[str, Path]

    @property
    def total_bytes(self) -> int:
        """Every byte a node stores for this release."""
        return sum(e["size"] for e in self.entries)

    def manifest(self) -> bytes:
        """The manifest as the node's `begin` takes it: gzip'd JSON (hashes and paths compress well)."""
        text = json.dumps({"release_id": self.release_id, "files": list(self.entries)}, separators=(",", ":"))
        return gzip.compress(text.encode(), compresslevel=6, mtime=0)

    def link_tree(self, paths: list[str], directory: Path) -> None:
        """A tree of symbolic links to the sources of these paths, for rsync to send (it follows them)."""
        for rel in paths:
            link = directory / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(self.sources[rel].resolve())


def _compress(data: bytes) -> dict[str, bytes]:
    return {
        ".br": brotli.compress(data, quality=11),
        ".gz": gzip.compress(data, compresslevel=9, mtime=0),
    }


def _siblings_of(f: SiteFile, cache: Cache) -> dict[str, Path]:
    """The cached compressed siblings of one file (made now if missing), when smaller than it."""
    if cache.not_smaller(f.sha256).exists():
        return {}
    wanted = {ext: cache.sibling(f.sha256, ext) for ext in SIBLINGS}
    if all(path.exists() for path in wanted.values()):
        return wanted
    data = f.source.read_bytes()
    packed = {ext: blob for ext, blob in _compress(data).items() if len(blob) < len(data)}
    for ext, blob in packed.items():
        cache.store(wanted[ext], blob)
    if not packed:
        cache.store(cache.not_smaller(f.sha256), b"")
    return {ext: wanted[ext] for ext in packed}


def _digest(path: Path, known: dict[str, tuple[str, str]], cache: Cache) -> tuple[int, str]:
    info = path.stat()
    key = Cache.stat_key(info)
    cached = known.get(str(path))
    if cached is not None and cached[0] == key:
        return info.st_size, cached[1]
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    cache.remember(str(path), key, sha)
    return info.st_size, sha


def prepare_release(site: Site, cache: Cache) -> Release:
    """The manifest of a site with its compressed siblings, compressing only contents never seen."""
    present = {f.path for f in site.files}
    compressible = [
        f for f in site.files if PurePosixPath(f.path).suffix.lower() in COMPRESSIBLE and f.size >= MIN_COMPRESS_BYTES
    ]
    entries: list[ManifestEntry] = [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in site.files]
    sources = {f.path: f.source for f in site.files}
    # brotli and zlib release the GIL while they work, so threads use every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        siblings = list(pool.map(lambda f: _siblings_of(f, cache), compressible))
        made = [
            (f.path + ext, path)
            for f, found in zip(compressible, siblings, strict=True)
            for ext, path in found.items()
            if f.path + ext not in present
        ]
        known = cache.known_hashes(str(cache.compressed))
        digests = list(pool.map(lambda item: _digest(item[1], known, cache), made))
    cache.flush()
    for (rel, path), (size, sha) in zip(made, digests, strict=True):
        entries.append({"path": rel, "size": size, "sha256": sha, "derived": True})
        sources[rel] = path
    entries.sort(key=lambda e: e["path"])
    return Release(site.release_id, tuple(entries), sources)


def read_manifest(data: bytes) -> list[ManifestEntry]:
    """The entries of a manifest as `Release.manifest` writes it (for tests and tools)."""
    doc = json.loads(gzip.GzipFile(fileobj=io.BytesIO(data)).read())
    return list(doc["files"])
