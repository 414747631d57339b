"""The release store: uploads, finalized releases, and which one is served.

Layout under the node root (Capistrano's, plus a verifying area):
  staging/ID     where rsync writes an upload (the only place the deploy key can write files)
  verifying/ID   an upload being checked, out of rsync's reach
  releases/ID    finalized, read-only releases; current and previous link to two of them
  meta/ID.json   each release's record: its manifest, compiled rules, when it was finalized
  state/         the site config the web server imports, and the lock

A finalized release is checked against its manifest on every activation and status, so a
change after finalize is noticed before it is served.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import brotli  # Debian's python3-brotli: compressed siblings are checked against their sources

from edgecdn.contract import (
    FREE_DISK_FLOOR_BYTES,
    HEALTH_FILE,
    MAX_MANIFEST_BYTES,
    MAX_MANIFEST_FILES,
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    MAX_RELEASE_BYTES,
    RELEASE_ID,
    RESERVED_PREFIX,
    SHA256_HEX,
    ManifestEntry,
    content_mtime,
    file_sha256,
    health_body,
    is_reserved,
    release_id_of,
    unpack_inline,
)
from edgecdn.node.agent import webserver
from edgecdn.node.agent.common import AgentError, Answer, Paths, atomic_symlink, atomic_write, remove_tree, run
from edgecdn.node.agent.rules import Rules, compile_rules

# An upload the agent began this long ago and never finalized is abandoned: a deployer that
# died mid-upload cannot hold a node's disk for longer.
STAGING_STALE_SECONDS = 3600


def _valid_rel_path(rel: str) -> bool:
    try:
        encoded = rel.encode()
    except UnicodeEncodeError:  # a lone surrogate, which JSON can carry
        return False
    if not rel or rel.startswith("/") or "\\" in rel or len(encoded) > MAX_PATH_BYTES:
        return False
    if any(ord(c) < 0x20 or c == "\x7f" for c in rel):
        return False
    return all(part not in ("", ".", "..") and len(part.encode()) <= MAX_NAME_BYTES for part in rel.split("/"))


def parse_manifest(data: bytes, release_id: str) -> list[ManifestEntry]:
    """Check the manifest's shape (JSON, gzip'd or not) and that it hashes to the release id."""
    try:
        doc = json.loads(_gunzip(data, MAX_MANIFEST_BYTES) if data[:2] == b"\x1f\x8b" else data)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, a number too long, nesting too deep
        raise AgentError("manifest is not JSON within the agent's limits") from None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, list) or not files or len(files) > MAX_MANIFEST_FILES:
        raise AgentError("manifest needs a 'files' list of 1 to 200000 entries")
    seen = set()
    for e in files:
        if not (
            isinstance(e, dict)
            and isinstance(e.get("path"), str)
            and _valid_rel_path(e["path"])
            and isinstance(e.get("size"), int)
            and e["size"] >= 0
            and isinstance(e.get("sha256"), str)
            and SHA256_HEX.match(e["sha256"])
            and isinstance(e.get("derived", False), bool)
        ):
            raise AgentError(f"manifest entry is malformed: {str(e)[:200]}")
        if e["path"] in seen:
            raise AgentError(f"manifest lists {e['path']!r} twice")
        if is_reserved(e["path"]):
            raise AgentError(f"{e['path']!r} is inside /{RESERVED_PREFIX}, which the node writes itself")
        seen.add(e["path"])
    for e in files:
        if e.get("derived"):
            base, _, ext = e["path"].rpartition(".")
            if ext not in ("br", "gz") or base not in seen:
                raise AgentError(f"derived file {e['path']!r} has no source file in the release")
    entries = cast(list[ManifestEntry], files)
    if release_id_of(entries) != release_id:
        raise AgentError("manifest does not hash to the release id; the upload is not that release")
    if "index.html" not in seen:
        raise AgentError("release has no index.html")
    return entries


def _gunzip(data: bytes, limit: int) -> bytes:
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
            out = stream.read(limit + 1)
    except (OSError, EOFError):
        raise AgentError("the manifest is not valid gzip") from None
    if len(out) > limit:
        raise AgentError(f"the manifest is larger than {limit} bytes")
    return out


def _decompressed_sha256(path: Path, kind: str, limit: int) -> str | None:
    """The SHA-256 of a compressed sibling's content, or None when it is not `limit` bytes of it."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        if kind == "gz":
            stream = gzip.GzipFile(fileobj=f)
            while chunk := stream.read(1 << 16):
                size += len(chunk)
                if size > limit:
                    return None
                digest.update(chunk)
        else:
            decompressor = brotli.Decompressor()
            while data := f.read(1 << 12):
                chunk = decompressor.process(data)
                size += len(chunk)
                if size > limit:
                    return None
                digest.update(chunk)
    return digest.hexdigest() if size == limit else None


def walk_files(tree: Path) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """Every entry below a tree but directories, as (path relative to it, entry), names sorted.

    Links are not followed. os.scandir with plain strings: a release has tens of thousands of
    files, and every check of one walks them all.
    """
    pending = [("", str(tree))]
    while pending:
        prefix, directory = pending.pop()
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel = prefix + entry.name
                if entry.is_dir(follow_symlinks=False):
                    pending.append((rel + "/", entry.path))
                else:
                    yield rel, entry


def verify_tree(
    tree: Path,
    files: list[ManifestEntry],
    proven: frozenset[tuple[str, str]] = frozenset(),
    held: frozenset[str] = frozenset(),
) -> None:
    """The tree holds exactly the manifest's files: no more, no less, regular files only.

    A compressed sibling (x.css.br, x.css.gz) must decompress to its source, byte for byte, so
    the release id, which covers the sources, determines every byte a node can serve. A pair
    of contents (sibling SHA-256, source SHA-256) this node already proved is not decompressed
    again: the bytes, hashed here, are the ones proved. Paths in `held` are links the agent
    made itself to files of the node's finalized releases, whose contents those releases'
    manifests already fix (and which activation and `status` check like every other file).
    """
    expected = {e["path"]: e for e in files}
    found = set()
    for rel, item in walk_files(tree):
        info = item.stat(follow_symlinks=False)
        if not stat.S_ISREG(info.st_mode):
            raise AgentError(f"{rel!r} is not a plain file; releases hold regular, unlinked files only")
        entry = expected.get(rel)
        if entry is None:
            raise AgentError(f"{rel!r} is not in the manifest")
        if info.st_size != entry["size"] or (rel not in held and file_sha256(Path(item.path)) != entry["sha256"]):
            raise AgentError(f"{rel!r} does not match the manifest (incomplete or altered upload)")
        if entry.get("derived") and rel not in held:
            source = expected[rel.rpartition(".")[0]]
            if (entry["sha256"], source["sha256"]) in proven:
                found.add(rel)
                continue
            try:
                same = _decompressed_sha256(Path(item.path), rel.rpartition(".")[2], source["size"]) == source["sha256"]
            except (OSError, EOFError, brotli.error):
                same = False
            if not same:
                raise AgentError(f"{rel!r} is not a compression of {source['path']!r}")
        found.add(rel)
    missing = sorted(set(expected) - found)
    if missing:
        raise AgentError(f"{len(missing)} files are missing, e.g. {missing[0]!r}")


def _record(paths: Paths, release_id: str) -> dict[str, Any]:
    record = json.loads((paths.meta / f"{release_id}.json").read_text())
    if not isinstance(record, dict):
        raise ValueError("a release record is a JSON object")
    return record


def _rules_of(paths: Paths, release_id: str | None) -> Rules | None:
    if not release_id:
        return None
    try:
        return cast(Rules, _record(paths, release_id)["rules"])
    except (OSError, ValueError, KeyError):
        raise AgentError(f"release {release_id} has no record; finalize it again", "state") from None


def render_config(paths: Paths, current: str | None, cert_ready: bool | None = None) -> dict[Path, bytes]:
    """The site and identity snippets for serving `current` (its rules), by the file they go to."""
    serving = current is not None
    ready = paths.cert_installed.exists() if cert_ready is None else cert_ready
    site = webserver.render_site(paths.layout, serving, _rules_of(paths, current), ready)
    return {
        paths.site_snippet: site.encode(),
        paths.identity_snippet: webserver.render_identity(paths.layout, serving).encode(),
    }


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _write_files(files: dict[Path, bytes | None], private: frozenset[Path] = frozenset()) -> None:
    for path, content in files.items():
        if content is None:
            path.unlink(missing_ok=True)
        else:
            atomic_write(path, content, 0o640 if path in private else 0o644)


def apply_config(
    paths: Paths, files: dict[Path, bytes | None], reload: bool, private: frozenset[Path] = frozenset()
) -> None:
    """Write these node files and, if `reload`, have the web server load them; on failure restore them.

    After a failed or timed-out reload the server may hold either config, so it is given the old
    one again.
    """
    old = {path: _read(path) for path in files}
    _write_files(files, private)
    if not reload:
        return
    try:
        webserver.reload(paths.layout)
    except AgentError:
        _write_files(old, private)
        with contextlib.suppress(AgentError):
            webserver.reload(paths.layout)
        raise


def _switch(paths: Paths, current: str, previous: str | None) -> None:
    """Make the web server serve these releases, then record them; on any failure change nothing.

    The served files are read by every request, so when the site config stays the same (the
    new release has the same rules) the switch is their atomic replacement, with no reload and
    no connection dropped. Otherwise Caddy must confirm the new config first. The recorded
    state (the current and previous links that `status` reports) moves only after either.
    """
    config = render_config(paths, current)
    reload = any(_read(path) != content for path, content in config.items())
    # The previous file first: a request between the two renames finds the old release in both.
    served: dict[Path, bytes | None] = {
        paths.served_previous: (previous or current).encode(),
        paths.served: current.encode(),
    }
    apply_config(paths, {**served, **config}, reload)
    for link, target in ((paths.previous, previous), (paths.current, current)):
        if target:
            atomic_symlink(link, f"releases/{target}")


def init(paths: Paths) -> Answer:
    """Create the node's directories, a placeholder certificate and the not-ready site."""
    for d in (paths.root, paths.releases, paths.staging, paths.verifying, paths.meta, paths.state):
        d.mkdir(parents=True, exist_ok=True)
    paths.tls.mkdir(parents=True, exist_ok=True)
    if not paths.cert.exists() or not paths.key.exists():
        # Caddy will not start without a certificate; health stays 503 until a real one arrives.
        result = run(
            [
                paths.layout["openssl_bin"], "req", "-x509", "-newkey", "ec",
                "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
                "-subj", "/CN=edgecdn-placeholder", "-keyout", str(paths.key), "-out", str(paths.cert),
            ]
        )  # fmt: skip
        if result.returncode != 0:
            raise AgentError("could not make a placeholder certificate", "init")
        os.chmod(paths.key, 0o640)
        paths.cert_installed.unlink(missing_ok=True)
    if not paths.site_snippet.exists() or not paths.identity_snippet.exists():
        current = paths.link_target(paths.current)
        if current:
            previous = paths.link_target(paths.previous) or current
            _write_files({paths.served_previous: previous.encode(), paths.served: current.encode()})
        _write_files(dict(render_config(paths, current)))
    return {"initialized": str(paths.root)}


def finalize(paths: Paths, release_id: str, inline: bytes = b"") -> Answer:
    """Check a staged upload against the manifest its `begin` recorded and make it an immutable release.

    The upload leaves the staging area (where rsync writes) before it is checked, so nothing
    can change it between the check and the release. Files sent with the request itself
    (`inline`, see contract.pack_inline) are written by the agent after that move, into a tree
    already checked to hold only directories and regular files. Every file then gets the
    modification time its content determines, so ETags agree across nodes and deploys.
    """
    target = paths.release(release_id)
    if target.exists():
        remove_tree(paths.staging / release_id)
        _upload_record(paths, release_id).unlink(missing_ok=True)
        return {"release": release_id, "finalized": True, "already": True}
    staged = paths.staging / release_id
    try:
        files = cast(list[ManifestEntry], _upload(paths, release_id)["manifest"])
    except (OSError, ValueError, KeyError, TypeError):
        files = []
    uploaded = staged.is_dir() and not staged.is_symlink()
    if not files or not (uploaded or inline):
        raise AgentError(f"release {release_id} has not been uploaded (begin, rsync, then finalize)")
    paths.verifying.mkdir(exist_ok=True)
    checking = paths.verifying / release_id
    remove_tree(checking)
    if uploaded:
        os.rename(staged, checking)
    else:
        checking.mkdir()
    try:
        _check_structure(checking)
        _write_inline(checking, files, inline)
        signed = [r for r in _release_names(paths.releases) if _signature_matches(paths, r)]
        held, proven = _held_contents(paths, signed), _proven_siblings(paths)
        with _keeping_signatures(paths, signed):
            linked = _fill_from_held(checking, files, held)
        verify_tree(checking, files, proven, linked)
        rules = compile_rules(checking)
        # A rules file the web server would reject fails here, not at activation on every node
        # (unless its config is the one the web server runs already).
        site = webserver.render_site(paths.layout, True, rules, True)
        if site.encode() != _read(paths.site_snippet):
            webserver.validate(paths, site, paths.cert.read_bytes(), paths.key.read_bytes(), "this site's rules")
    except BaseException:
        remove_tree(checking)
        raise
    marker = checking / HEALTH_FILE
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_bytes(health_body(release_id).encode())
    by_path = {e["path"]: e["sha256"] for e in files}
    health: ManifestEntry = {"path": HEALTH_FILE, "size": marker.stat().st_size, "sha256": file_sha256(marker)}
    entries = [*files, health]
    record = {
        "release": release_id,
        "files": len(files),
        "finalized_at": time.time(),
        "rules": rules,
        "manifest": [[e["path"], e["size"], e["sha256"]] for e in entries],
        # (sibling, source) content pairs proved to decompress one to the other, for later deploys.
        "siblings": [[e["sha256"], by_path[e["path"].rpartition(".")[0]]] for e in files if e.get("derived")],
    }
    atomic_write(paths.meta / f"{release_id}.json", json.dumps(record).encode(), 0o644)
    for entry in entries:
        if entry["path"] in linked:
            continue  # a finalized release's file: read-only with its content's time already
        path = checking / entry["path"]
        os.chmod(path, 0o444)
        os.utime(path, (content_mtime(entry["sha256"]),) * 2)
    os.rename(checking, target)
    _upload_record(paths, release_id).unlink(missing_ok=True)
    for dirpath, _, _ in os.walk(target, topdown=False):
        os.chmod(dirpath, 0o555)  # noqa: S103 - released files are public web content
    # Every byte was checked just now, under the lock, out of any upload's reach.
    atomic_write(_signature_file(paths, release_id), _signature(target).encode(), 0o644)
    return {"release": release_id, "finalized": True, "already": False, "files": len(files)}


def _write_inline(tree: Path, files: list[ManifestEntry], inline: bytes) -> None:
    """Write the files sent with `finalize` into the tree: manifest paths only, each once, never over a file."""
    if not inline:
        return
    try:
        sent = unpack_inline(inline)
    except ValueError as exc:
        raise AgentError(f"the files sent with finalize are malformed: {exc}") from None
    listed = {e["path"] for e in files}
    for rel, data in sent:
        if rel not in listed:
            raise AgentError(f"{rel[:200]!r} was sent but is not in the manifest")
        target = tree / rel
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except OSError:
            raise AgentError(f"{rel[:200]!r} was sent twice, or where the upload has something else") from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def _upload_record(paths: Paths, release_id: str) -> Path:
    return paths.meta / f"upload-{release_id}.json"


def _upload(paths: Paths, release_id: str) -> dict[str, Any]:
    record = json.loads(_upload_record(paths, release_id).read_text())
    if not isinstance(record, dict):
        raise ValueError("an upload record is a JSON object")
    return record


def _held_contents(paths: Paths, signed: list[str] | None = None) -> dict[str, str]:
    """Every file content this node holds in an intact finalized release, by SHA-256: its path.

    `signed`: releases already seen to match their signatures (not checked again).
    """
    held: dict[str, str] = {}
    for release in _release_names(paths.releases):
        if release not in (signed or []) and not intact(paths, release):
            continue  # an altered release lends nothing to a new one
        try:
            prefix = f"{paths.releases}/{release}/"
            for rel, _, sha in _record(paths, release)["manifest"]:
                held.setdefault(sha, prefix + rel)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a release without a readable record offers nothing to reuse
    return held


def _check_structure(tree: Path) -> None:
    """Only directories and regular, unlinked files: nothing that could redirect a write."""
    for rel, item in walk_files(tree):
        info = item.stat(follow_symlinks=False)
        if not (stat.S_ISREG(info.st_mode) and info.st_nlink == 1):
            raise AgentError(f"{rel!r} is not a plain file; releases hold regular, unlinked files only")


def _proven_siblings(paths: Paths) -> frozenset[tuple[str, str]]:
    """Every (sibling, source) content pair a kept release proved at its finalize."""
    pairs: set[tuple[str, str]] = set()
    for release in _release_names(paths.releases):
        try:
            pairs.update((str(a), str(b)) for a, b in _record(paths, release).get("siblings", []))
        except (OSError, ValueError, TypeError):
            continue
    return frozenset(pairs)


def _fill_from_held(tree: Path, files: list[ManifestEntry], held: dict[str, str]) -> frozenset[str]:
    """Link into the tree every file it lacks whose content a finalized release holds; the paths linked.

    The tree is out of rsync's reach and was checked to hold only directories and regular,
    unlinked files before this, so nothing an upload wrote shares storage with a release:
    links join finalized releases only. A file system that cannot link gets a copy.
    """
    linked = set()
    made: set[str] = set()
    for entry in files:
        source = held.get(entry["sha256"])
        if source is None:
            continue
        target = f"{tree}/{entry['path']}"
        parent = target.rpartition("/")[0]
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        try:
            os.link(source, target)
            linked.add(entry["path"])
        except FileExistsError:
            continue  # uploaded: checked like every uploaded file
        except OSError:
            shutil.copyfile(source, target)
    return frozenset(linked)


def begin(paths: Paths, release_id: str, manifest: bytes) -> Answer:
    """Open an upload of a release (its manifest on stdin): answer which files must still be sent.

    Refused beyond the quota or below the free-disk floor. Whatever content the node already
    holds, it copies itself at finalize, so only changed files cross the network.
    The agent records when it began, so stale uploads are pruned by its own clock, never by
    file times a client can set; uploads abandoned by earlier deployers are pruned first, so
    none can hold the node's disk for more than an hour.
    """
    _prune_abandoned_uploads(paths, time.time())
    files = parse_manifest(manifest, release_id)
    total = sum(e["size"] for e in files)
    if total > MAX_RELEASE_BYTES:
        raise AgentError(f"the release is {total} bytes; a node takes at most {MAX_RELEASE_BYTES}", "quota")
    usage = shutil.disk_usage(paths.root)
    if usage.free - total < FREE_DISK_FLOOR_BYTES:
        raise AgentError(
            f"the node has {usage.free} bytes free; this upload of {total} would leave less than "
            f"{FREE_DISK_FLOOR_BYTES} (prune old releases or use a bigger disk)",
            "quota",
        )
    if paths.release(release_id).exists():
        return {"release": release_id, "upload": "finalized", "needed": [], "bytes": total}
    (paths.staging / release_id).mkdir(exist_ok=True)
    record = {"began": time.time(), "bytes": total, "manifest": files}
    atomic_write(_upload_record(paths, release_id), json.dumps(record).encode(), 0o644)
    held = _held_contents(paths)
    needed = [e["path"] for e in files if e["sha256"] not in held]
    return {"release": release_id, "upload": "open", "needed": needed, "bytes": total}


def _signature(tree: Path) -> str:
    """A digest of every file's identity and change time: any write, chmod or utime changes it."""
    digest = hashlib.sha256()
    for rel, item in walk_files(tree):
        info = item.stat(follow_symlinks=False)
        digest.update(f"{rel}\0{info.st_ino}:{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}\n".encode())
    return digest.hexdigest()


def _signature_file(paths: Paths, release_id: str) -> Path:
    return paths.meta / f"{release_id}.signature"


def _record_signature(paths: Paths, release_id: str) -> None:
    """Remember the release's signature once every byte of it was checked.

    Only when its newest change is over a second old: a write in the same clock tick as the
    check would leave the change time as it was (git's "racily clean" case).
    """
    tree = paths.release(release_id)
    newest = max((item.stat(follow_symlinks=False).st_ctime for _, item in walk_files(tree)), default=0.0)
    if time.time() - newest > 1:
        atomic_write(_signature_file(paths, release_id), _signature(tree).encode(), 0o644)
    else:
        _signature_file(paths, release_id).unlink(missing_ok=True)


def _signature_matches(paths: Paths, release_id: str) -> bool:
    try:
        return _signature_file(paths, release_id).read_text() == _signature(paths.release(release_id))
    except OSError:
        return False


@contextlib.contextmanager
def _keeping_signatures(paths: Paths, signed: list[str] | None = None) -> Iterator[None]:
    """Around linking or deleting files: record again the signatures that held before.

    Releases share files by hard links, and a link made or removed moves the shared file's
    change time, which would send every release holding it to a full check for nothing.
    """
    valid = [r for r in _release_names(paths.releases) if _signature_matches(paths, r)] if signed is None else signed
    yield
    for release_id in valid:
        if paths.release(release_id).is_dir():
            atomic_write(_signature_file(paths, release_id), _signature(paths.release(release_id)).encode(), 0o644)


def intact(paths: Paths, release_id: str) -> bool:
    """Whether a finalized release still holds exactly what was verified at finalize.

    Every file is hashed, unless no file changed at all since every byte was last checked: a
    change to any file (its content, mode or times) moves its change time, which nobody can
    set back, so the release's signature (every file's inode, size, modification and change
    time) then differs.
    """
    tree = paths.release(release_id)
    if _signature_matches(paths, release_id):
        return True
    try:
        # Compressed siblings were proven at finalize; here every file's bytes are checked.
        files: list[ManifestEntry] = [
            {"path": p, "size": size, "sha256": sha} for p, size, sha in _record(paths, release_id)["manifest"]
        ]
        verify_tree(tree, files)
    except (AgentError, OSError, ValueError, KeyError, TypeError):
        return False
    _record_signature(paths, release_id)
    return True


def activate(paths: Paths, release_id: str) -> Answer:
    """Serve a finalized release; the one it replaces becomes previous."""
    target = paths.release(release_id)
    if not target.is_dir() or not (paths.meta / f"{release_id}.json").exists():
        raise AgentError(f"release {release_id} is not finalized on this node", "missing")
    if not intact(paths, release_id):
        raise AgentError(
            f"release {release_id} was altered on this node after it was finalized; upload it again", "integrity"
        )
    current = paths.link_target(paths.current)
    previous = paths.link_target(paths.previous)
    if current == release_id:
        # Nothing to switch; the config is written and loaded again, which repairs a node whose
        # web server lost it.
        apply_config(paths, dict(render_config(paths, current)), reload=True)
        return {"active": release_id, "previous": previous, "changed": False}
    _switch(paths, release_id, current or previous)
    return {"active": release_id, "previous": current or previous, "changed": True}


def rollback(paths: Paths) -> Answer:
    """Serve the previous release again; the current one becomes previous."""
    current = paths.link_target(paths.current)
    previous = paths.link_target(paths.previous)
    if not previous or not paths.release(previous).is_dir():
        raise AgentError("there is no previous release to roll back to", "missing")
    _switch(paths, previous, current)
    return {"active": previous, "previous": current, "changed": True}


def _finalized_at(paths: Paths, release_id: str) -> float:
    try:
        return float(_record(paths, release_id)["finalized_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def prune(paths: Paths, keep: int) -> Answer:
    """Delete releases beyond the newest `keep`, and abandoned uploads.

    Never current or previous, and never a release finalized within the last hour: another
    deploy may be about to activate it.
    """
    protected = {paths.link_target(paths.current), paths.link_target(paths.previous)}
    now = time.time()
    finalized = sorted(
        ((_finalized_at(paths, p.name), p.name) for p in paths.releases.iterdir() if RELEASE_ID.match(p.name)),
        reverse=True,
    )
    removed = []
    with _keeping_signatures(paths):
        for when, name in finalized[keep:]:
            if name not in protected and now - when > STAGING_STALE_SECONDS:
                remove_tree(paths.releases / name)
                (paths.meta / f"{name}.json").unlink(missing_ok=True)
                _signature_file(paths, name).unlink(missing_ok=True)
                removed.append(name)
    return {"removed": removed + _prune_abandoned_uploads(paths, now)}


def _prune_abandoned_uploads(paths: Paths, now: float) -> list[str]:
    """Uploads begun more than an hour ago by the agent's own clock, never by client-set file times."""
    removed = []
    for p in paths.staging.iterdir():
        try:
            began = float(json.loads(_upload_record(paths, p.name).read_text())["began"])
        except (OSError, ValueError, KeyError, TypeError):
            began = 0.0  # an upload that never began through the agent is stale at once
        if now - began > STAGING_STALE_SECONDS:
            remove_tree(p)
            _upload_record(paths, p.name).unlink(missing_ok=True)
            removed.append(f"staging/{p.name}")
    return removed


def _release_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if RELEASE_ID.match(p.name)) if directory.is_dir() else []


def releases_status(paths: Paths) -> dict[str, Any]:
    """What this node serves and holds: the release part of the status answer."""
    releases = (
        sorted(p.name for p in paths.releases.iterdir() if RELEASE_ID.match(p.name)) if paths.releases.is_dir() else []
    )
    staged = (
        sorted(p.name for p in paths.staging.iterdir() if RELEASE_ID.match(p.name)) if paths.staging.is_dir() else []
    )
    active = paths.link_target(paths.current)
    return {
        "active": active,
        "intact": intact(paths, active) if active else None,
        "previous": paths.link_target(paths.previous),
        "releases": releases,
        "staged": staged,
    }
