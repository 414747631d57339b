"""Building a release directory: the site's files plus precompressed siblings, and a manifest.

Compressed siblings (`x.css.br`, `x.css.gz`) are made only for compressible types and kept only
when smaller. Every file gets the build time as its mtime, so a changed file always gets a new
ETag, and all nodes show the same one.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import brotli

from site_sync.release import release_id, scan_site

# Text and the font and icon formats that are not compressed already (woff and woff2 are).
COMPRESSIBLE = frozenset(
    ".html .htm .css .js .mjs .json .svg .xml .txt .webmanifest .map .wasm .ico .otf .ttf .eot "
    ".py .rs .c .h .md .rst .ini .cfg .toml .yaml .yml .csv".split()
)
MIN_COMPRESS_BYTES = 256


@dataclass(frozen=True)
class ManifestEntry:
    """A file of the release; `derived` marks a compressed sibling of a site file."""

    path: str
    size: int
    sha256: str
    derived: bool = False


@dataclass(frozen=True)
class BuiltRelease:
    """A release ready to upload."""

    release_id: str
    root: Path
    entries: tuple[ManifestEntry, ...]
    built_at: int

    def manifest_json(self) -> str:
        """The manifest the node checks the upload against."""
        return json.dumps({"release_id": self.release_id, "files": [asdict(e) for e in self.entries]})


def _compressed(data: bytes) -> dict[str, bytes]:
    return {
        ".br": brotli.compress(data, quality=11),
        ".gz": gzip.compress(data, compresslevel=9, mtime=0),
    }


def build_release(site_dir: Path, out_dir: Path, built_at: int | None = None) -> BuiltRelease:
    """Copy the site into out_dir with compressed siblings; return the release and its manifest."""
    stamp = int(time.time()) if built_at is None else built_at
    files = scan_site(site_dir)
    present = {f.path for f in files}
    entries = [ManifestEntry(f.path, f.size, f.sha256) for f in files]
    for f in files:
        target = out_dir / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(site_dir / f.path, target)
        if Path(f.path).suffix.lower() not in COMPRESSIBLE or f.size < MIN_COMPRESS_BYTES:
            continue
        data = target.read_bytes()
        for ext, packed in _compressed(data).items():
            sibling = f.path + ext
            if sibling in present or len(packed) >= len(data):
                continue
            (out_dir / sibling).write_bytes(packed)
            entries.append(ManifestEntry(sibling, len(packed), hashlib.sha256(packed).hexdigest(), derived=True))
    for dirpath, _, names in os.walk(out_dir):
        for name in names:
            os.utime(Path(dirpath) / name, (stamp, stamp))
    entries.sort(key=lambda e: e.path)
    return BuiltRelease(release_id(files), out_dir, tuple(entries), stamp)
