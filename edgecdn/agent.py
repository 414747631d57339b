#!/usr/bin/python3
"""edgecdn deploy agent: the only program a node's deploy key may run (SSH forced command).

Verbs arrive in SSH_ORIGINAL_COMMAND (or argv, for local use by the bootstrap and the lab).
Every argument is checked against a strict pattern; no shell is ever involved; the agent reads
and writes only under the node root and the TLS directory. Output is one JSON object.

This file runs on the node with the Python standard library and Debian's python3-brotli. It is
installed byte for byte as it is reviewed here; the node's paths, ports and names come from
`layout.json` beside it (rendered by edgecdn.node_files.render_layout).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import gzip
import hashlib
import json
import os
import re
import shlex
import shutil
import ssl
import stat
import subprocess
import sys
import syslog
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import brotli  # Debian's python3-brotli: compressed siblings are checked against their sources

LAYOUT_FILE = "layout.json"

RELEASE_ID = re.compile(r"^[0-9a-f]{20}$")
MAX_COMMAND = 4096
MAX_MANIFEST_BYTES = 32 << 20
MAX_MANIFEST_FILES = 200_000
MAX_CERT_BYTES = 64 << 10
MAX_RULES = 1000
# Bounds on what a site's _redirects may cost per request: Caddy tries the rules in order.
MAX_RULE_WILDCARDS = 4
MAX_RULES_BYTES = 64 << 10
STAGING_STALE_SECONDS = 3600
# What one release may take, and the free space a node always keeps for itself.
MAX_RELEASE_BYTES = 4 << 30
FREE_DISK_FLOOR_BYTES = 1 << 30
RELOAD_TIMEOUT = 30
# The site's own rule files: read at finalize, never served.
RULE_FILES = ("_redirects", "_headers", "_edgecdn.json")
# What skew protection serves from the previous release: what pages load, not pages.
SKEW_ASSET_TYPES = (
    "css js mjs map wasm woff woff2 ttf otf eot png jpg jpeg gif webp avif svg ico bmp mp4 webm mp3 ogg".split()
)
HEALTH_PATH = "/.well-known/edgecdn/health"
HEALTH_MARKER = "edgecdn-ok"
# The health answer is a file in each release, served like any page: a web server that cannot
# serve files fails its health check (the original CDN's nodes answered 404 and looked alive).
HEALTH_FILE = HEALTH_PATH.lstrip("/")
# Set explicitly: Go's MIME table depends on what the host has installed (webmanifest is often missing).
# HTML gets no charset parameter: it would override the page's own <meta charset> (an
# ISO-8859-1 page was garbled); text formats without such a declaration get UTF-8.
CONTENT_TYPES = {
    "text/html": "html htm",
    "text/css; charset=utf-8": "css",
    "text/javascript; charset=utf-8": "js mjs",
    "application/json": "json map",
    "image/svg+xml": "svg",
    "application/wasm": "wasm",
    "font/woff2": "woff2",
    "font/woff": "woff",
    "image/avif": "avif",
    "image/webp": "webp",
    "application/manifest+json": "webmanifest",
    "application/xml": "xml",
    "text/plain; charset=utf-8": "txt py rs c h md rst ini cfg toml yaml yml",
    "text/csv; charset=utf-8": "csv",
    "font/otf": "otf",
    "font/ttf": "ttf",
    "application/vnd.ms-fontobject": "eot",
    "image/vnd.microsoft.icon": "ico",
}
# A name part right before the extension, after a separator, that looks like a content hash:
# 8+ lower-case hex with both a digit and a letter (app.8d1e0f3a.js, rustdoc-b0742ba02757f159.css),
# or 8+ letters and digits where a letter stands between two digits, i.e. digits spread through
# it (index-BmF4dz3q.js, chunk-7D3V6S5Z.js). Words with a trailing number (trait.DirEntryExt2.js,
# screenshot2.png) and dates are not hashes: a false match would pin a changed file in browsers
# for a year, while a miss only costs a revalidation.
_SEGMENT = "[-._~]{}[.][a-z0-9]+$"
FINGERPRINT_ALL = (
    _SEGMENT.format("[0-9a-f]{8,}"),
    _SEGMENT.format("[0-9a-f]*[0-9][0-9a-f]*"),
    _SEGMENT.format("[0-9a-f]*[a-f][0-9a-f]*"),
)
FINGERPRINT_MIXED = (
    _SEGMENT.format("[0-9A-Za-z]{8,}"),
    _SEGMENT.format("[0-9A-Za-z]*[0-9][0-9A-Za-z]*[A-Za-z][0-9A-Za-z]*[0-9][0-9A-Za-z]*"),
)


def _fingerprint_expression() -> str:
    """A CEL expression true for fingerprinted paths (Caddy's RE2 regexes cannot AND alone)."""

    def all_of(patterns: tuple[str, ...]) -> str:
        return " && ".join(f'{{path}}.matches("{p}")' for p in patterns)

    return f"({all_of(FINGERPRINT_ALL)}) || ({all_of(FINGERPRINT_MIXED)})"


class AgentError(Exception):
    """A refused or failed request; the message is safe to show the deployer."""

    def __init__(self, message: str, code: str = "refused") -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- paths


class Paths:
    """Every path the agent may touch, derived from the layout."""

    def __init__(self, layout: dict) -> None:
        self.layout = layout
        self.root = Path(layout["root"])
        self.releases = self.root / "releases"
        self.staging = self.root / "staging"
        self.verifying = self.root / "verifying"
        self.meta = self.root / "meta"
        self.state = Path(layout["root"]) / "state"
        self.site_snippet = self.state / "site.caddy"
        self.identity_snippet = self.state / "identity.caddy"
        self.current = self.root / "current"
        self.previous = self.root / "previous"
        self.tls = Path(layout["tls_dir"])
        self.cert = self.tls / "fullchain.pem"
        self.key = self.tls / "key.pem"
        self.cert_installed = self.tls / "installed"

    def release(self, release_id: str) -> Path:
        return self.releases / _checked_release(release_id)

    def link_target(self, link: Path) -> str | None:
        try:
            target = os.readlink(link)
        except FileNotFoundError:
            return None
        name = Path(target).name
        return name if RELEASE_ID.match(name) else None


def _checked_release(release_id: str) -> str:
    if not RELEASE_ID.match(release_id):
        raise AgentError(f"{release_id[:40]!r} is not a release id (20 lower-case hex digits)")
    return release_id


# ---------------------------------------------------------------- file helpers


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
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


def _atomic_symlink(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _read_stdin(limit: int) -> bytes:
    data = sys.stdin.buffer.read(limit + 1)
    if len(data) > limit:
        raise AgentError(f"input is larger than {limit} bytes")
    return data


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _make_tree_writable(path: Path) -> None:
    # Releases are read-only (0555 directories); deleting one needs write access back.
    for dirpath, dirnames, _ in os.walk(path):
        os.chmod(dirpath, 0o755)  # noqa: S103 - released files are public web content
        for d in dirnames:
            full = Path(dirpath) / d
            if not full.is_symlink():
                os.chmod(full, 0o755)  # noqa: S103 - as above


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        _make_tree_writable(path)
        shutil.rmtree(path)


# ---------------------------------------------------------------- manifest


def release_id_of(entries: list[dict]) -> str:
    """The content hash over the site's own files (the same formula as site_sync.release)."""
    digest = hashlib.sha256()
    for e in sorted((e for e in entries if not e.get("derived")), key=lambda e: e["path"]):
        digest.update(f"{e['path']}\0{e['size']}\0{e['sha256']}\n".encode())
    return digest.hexdigest()[:20]


def _valid_rel_path(rel: str) -> bool:
    try:
        encoded = rel.encode()
    except UnicodeEncodeError:  # a lone surrogate, which JSON can carry
        return False
    if not rel or rel.startswith("/") or "\\" in rel or len(encoded) > 1024:
        return False
    if any(ord(c) < 0x20 or c == "\x7f" for c in rel):
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def parse_manifest(data: bytes, release_id: str) -> list[dict]:
    """Check the manifest's shape and that it hashes to the release id."""
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AgentError("manifest is not JSON") from None
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
            and re.fullmatch(r"[0-9a-f]{64}", e["sha256"])
            and isinstance(e.get("derived", False), bool)
        ):
            raise AgentError(f"manifest entry is malformed: {str(e)[:200]}")
        if e["path"] in seen:
            raise AgentError(f"manifest lists {e['path']!r} twice")
        if e["path"].startswith(HEALTH_FILE.rsplit("/", 1)[0] + "/"):
            raise AgentError(f"{e['path']!r} is inside {HEALTH_PATH.rsplit('/', 1)[0]}/, which the node writes itself")
        seen.add(e["path"])
    for e in files:
        if e.get("derived"):
            base, _, ext = e["path"].rpartition(".")
            if ext not in ("br", "gz") or base not in seen:
                raise AgentError(f"derived file {e['path']!r} has no source file in the release")
    if release_id_of(files) != release_id:
        raise AgentError("manifest does not hash to the release id; the upload is not that release")
    if "index.html" not in seen:
        raise AgentError("release has no index.html")
    return files


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


def verify_tree(tree: Path, files: list[dict]) -> None:
    """The tree holds exactly the manifest's files: no more, no less, no links, nothing shared.

    A compressed sibling (x.css.br, x.css.gz) must decompress to its source, byte for byte, so
    the release id, which covers the sources, determines every byte a node can serve.
    """
    expected = {e["path"]: e for e in files}
    found = set()
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(tree).as_posix()
            info = full.lstat()
            if stat.S_ISDIR(info.st_mode):
                continue
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                raise AgentError(f"{rel!r} is not a plain file; releases hold regular, unlinked files only")
            entry = expected.get(rel)
            if entry is None:
                raise AgentError(f"{rel!r} is not in the manifest")
            if info.st_size != entry["size"] or _sha256(full) != entry["sha256"]:
                raise AgentError(f"{rel!r} does not match the manifest (incomplete or altered upload)")
            if entry.get("derived"):
                source = expected[rel.rpartition(".")[0]]
                try:
                    same = _decompressed_sha256(full, rel.rpartition(".")[2], source["size"]) == source["sha256"]
                except (OSError, EOFError, brotli.error):
                    same = False
                if not same:
                    raise AgentError(f"{rel!r} is not a compression of {source['path']!r}")
            found.add(rel)
    missing = sorted(set(expected) - found)
    if missing:
        raise AgentError(f"{len(missing)} files are missing, e.g. {missing[0]!r}")


# ---------------------------------------------------------------- _redirects and _headers

_SAFE_TARGET = re.compile(r"^(/|https?://[A-Za-z0-9.-]+(:\d+)?/?)[A-Za-z0-9._~!$&'()*+,;=:@%/?#-]*$")
_SAFE_SOURCE = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$")
# Letters, digits and inner hyphens only: Caddy reads a leading + - ? > and a * in a header
# name as an operation (add, delete, default, defer, wildcard), which would let a site remove
# or shadow a protected header such as HSTS.
_HEADER_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,98}[A-Za-z0-9])?$")
_REDIRECT_STATUSES = {"200", "301", "302", "307", "308"}
_PROTECTED_HEADERS = {"x-edge-node", "x-edge-release", "strict-transport-security"}


def _pattern_regex(pattern: str) -> tuple[str, list[str]]:
    """A Netlify/Cloudflare path pattern as an anchored regex and its capture names."""
    names: list[str] = []
    parts = []
    for i, segment in enumerate(pattern.split("/")):
        if segment.startswith(":") and re.fullmatch(r":[A-Za-z_][A-Za-z0-9_]*", segment):
            names.append(segment[1:])
            parts.append("([^/]+)")
            continue
        chunks = segment.split("*")
        out = []
        for j, chunk in enumerate(chunks):
            out.append(re.escape(chunk))
            if j < len(chunks) - 1:
                names.append("splat")
                out.append("(.*)")
        parts.append("".join(out) if i else "")
    return "^" + "/".join(parts) + "$", names


def _caddy_quote(text: str) -> str:
    # The Caddyfile lexer unescapes only \" inside quotes; a backslash is otherwise literal,
    # which regexes rely on. Callers never pass a value ending in a backslash.
    return '"' + text.replace('"', '\\"') + '"'


def _substitute(target: str, names: list[str], rule: str) -> str:
    def repl(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in names:
            return m.group(0)
        return "{re." + rule + "." + str(names.index(name) + 1) + "}"

    return re.sub(r":([A-Za-z_][A-Za-z0-9_]*)", repl, target)


def _hidden_target(target: str) -> bool:
    parts = target.split("?", 1)[0].lstrip("/").split("/")
    if parts[0] == ".well-known":
        parts = parts[1:]
    return target.split("?", 1)[0].lstrip("/") in RULE_FILES or any(part.startswith(".") for part in parts)


def compile_redirects(text: str) -> list[str]:
    """_redirects lines as Caddy directives, in file order."""
    out: list[str] = []
    size = 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip() if not raw.strip().startswith("#") else ""
        if not line:
            continue
        fields = line.split()
        where = f"_redirects line {lineno}"
        if len(fields) not in (2, 3):
            raise AgentError(f"{where}: expected 'from to [status]', got {line[:120]!r}")
        source, target = fields[0], fields[1]
        status = fields[2] if len(fields) == 3 else "301"
        if status.endswith("!"):
            status = status[:-1]
        if status not in _REDIRECT_STATUSES:
            raise AgentError(f"{where}: status {status!r} is not one of 200, 301, 302, 307, 308")
        if not _SAFE_SOURCE.match(source):
            raise AgentError(f"{where}: {source[:120]!r} is not a path starting with '/'")
        if not _SAFE_TARGET.match(target) or "{" in target or "}" in target:
            raise AgentError(f"{where}: {target[:120]!r} is not a path or http(s) URL")
        if status == "200" and not target.startswith("/"):
            raise AgentError(f"{where}: a 200 rewrite must point at a path on this site, not a URL")
        if status == "200" and _hidden_target(target):
            raise AgentError(f"{where}: a 200 rewrite may not serve a rule file or a dotfile ({target[:120]!r})")
        if source.count("*") + source.count("/:") > MAX_RULE_WILDCARDS:
            raise AgentError(f"{where}: at most {MAX_RULE_WILDCARDS} wildcards and placeholders per rule")
        size += len(source) + len(target)
        if size > MAX_RULES_BYTES:
            raise AgentError(f"_redirects: the patterns and targets exceed {MAX_RULES_BYTES} bytes")
        rule = f"r{len(out)}"
        regex, names = _pattern_regex(source)
        target = _substitute(target, names, rule)
        matcher = f"@{rule} path_regexp {rule} {_caddy_quote(regex)}"
        if status == "200":
            out.append(f"{matcher}\nrewrite @{rule} {_caddy_quote(target)}")
        else:
            out.append(f"{matcher}\nredir @{rule} {_caddy_quote(target)} {status}")
        if len(out) > MAX_RULES:
            raise AgentError(f"_redirects has more than {MAX_RULES} rules")
    return out


def compile_headers(text: str) -> list[str]:
    """_headers blocks as Caddy header directives, in file order."""
    out: list[str] = []
    rule: str | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        where = f"_headers line {lineno}"
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if not raw[0].isspace():
            pattern = raw.strip()
            if not _SAFE_SOURCE.match(pattern):
                raise AgentError(f"{where}: {pattern[:120]!r} is not a path pattern starting with '/'")
            rule = f"h{len(out)}"
            regex, _ = _pattern_regex(pattern)
            out.append(f"@{rule} path_regexp {_caddy_quote(regex)}")
            continue
        if rule is None:
            raise AgentError(f"{where}: a header line must follow a path pattern")
        line = raw.strip()
        if line.startswith("!"):
            name, value = line[1:].strip(), None
        elif ":" in line:
            name, value = (s.strip() for s in line.split(":", 1))
        else:
            raise AgentError(f"{where}: expected 'Name: value' or '! Name'")
        if not _HEADER_NAME.match(name) or name.lower() in _PROTECTED_HEADERS:
            raise AgentError(f"{where}: {name[:100]!r} is not a header name a site may set")
        if value is None:
            out.append(f"header @{rule} -{name}")
            continue
        if len(value) > 2000 or any(ord(c) < 0x20 or c in "{}\\\x7f" for c in value):
            raise AgentError(f"{where}: the value of {name} has a control character, brace or backslash")
        out.append(f"header @{rule} {name} {_caddy_quote(value)}")
        if len(out) > MAX_RULES:
            raise AgentError(f"_headers has more than {MAX_RULES} rules")
    return out


def compile_settings(text: str) -> bool:
    """_edgecdn.json: the site's own settings; today one, whether to redirect to canonical URLs."""
    try:
        settings = json.loads(text)
    except ValueError:
        raise AgentError("_edgecdn.json is not JSON") from None
    if not isinstance(settings, dict) or set(settings) - {"canonical_urls"}:
        raise AgentError('_edgecdn.json takes one key, e.g. {"canonical_urls": true}')
    canonical = settings.get("canonical_urls", False)
    if not isinstance(canonical, bool):
        raise AgentError("_edgecdn.json: canonical_urls must be true or false")
    return canonical


def compile_rules(tree: Path) -> dict:
    """The release's own _redirects, _headers and _edgecdn.json, checked and compiled."""
    rules: dict = {"redirects": [], "headers": [], "canonical": False}
    for name, key, compile_fn in (
        ("_redirects", "redirects", compile_redirects),
        ("_headers", "headers", compile_headers),
        ("_edgecdn.json", "canonical", compile_settings),
    ):
        path = tree / name
        if path.is_file():
            if path.stat().st_size > 1 << 20:
                raise AgentError(f"{name} is larger than 1 MiB")
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise AgentError(f"{name} is not UTF-8 text") from None
            rules[key] = compile_fn(text)
    return rules


# ---------------------------------------------------------------- the served site


def _indent(lines: list[str], depth: int) -> str:
    pad = "\t" * depth
    return "".join(pad + line + "\n" for chunk in lines for line in chunk.splitlines())


def _content_type_rule(index: int, content_type: str, extensions: str) -> str:
    patterns = " ".join(f"*.{ext}" for ext in extensions.split())
    return f"@type{index} path {patterns}\nheader @type{index} Content-Type {_caddy_quote(content_type)}"


def _serve_from(release_dir: str, tag: str, depth: int, assets_only: bool = False) -> str:
    """Routes that serve a request from one release when the file exists there."""
    serve = [
        "rewrite {http.matchers.file.relative}",
        f"root * {release_dir}",
        # Deferred defaults ("?": only if _headers set none) apply last-registered first,
        # so the most specific comes last.
        'header ?Cache-Control "public, max-age=3600"',
        f"@fingerprinted expression `{_fingerprint_expression()}`",
        'header @fingerprinted ?Cache-Control "public, max-age=31536000, immutable"',
        "@html path *.html *.htm",
        'header @html ?Cache-Control "no-cache"',
        "header ?Vary Accept-Encoding",
        *(_content_type_rule(i, ctype, exts) for i, (ctype, exts) in enumerate(CONTENT_TYPES.items())),
        "file_server {\n\tprecompressed br gzip\n\tdisable_canonical_uris\n}",
    ]
    if assets_only:
        kinds = [("file", f"path {' '.join('*.' + ext for ext in SKEW_ASSET_TYPES)}", "{path}")]
    else:
        kinds = [("dir", "path */", "{path}index.html"), ("file", "not path */", "{path} {path}.html")]
    blocks = [
        f"@{tag}_{kind} {{\n\t{path_match}\n\tfile {{\n\t\troot {release_dir}\n"
        f"\t\ttry_files {tries}\n\t}}\n}}\nroute @{tag}_{kind} {{\n" + _indent(serve, 1) + "}"
        for kind, path_match, tries in kinds
    ]
    return _indent(blocks, depth)


# Redirects are built from the request's escaped URI ({http.request.uri}), never from the
# decoded path, so a name with '#', '?', '%', spaces or non-ASCII leads back to the same file.
_URI = "{http.request.uri}"
_REDIRECT_CACHE = 'header Cache-Control "public, max-age=3600"'
# Paths that could turn a Location into another host ("//evil.example", "/\evil.example") or
# carry control characters, spelled out or percent-encoded: refused before any rule runs.
UNSAFE_PATH = r"^[^?]*(//|\\|%5[cC]|%2[fF]|%[01][0-9a-fA-F]|%7[fF])"


def _redirect(name: str, target: str) -> str:
    return f"route @{name} {{\n\t{_REDIRECT_CACHE}\n\tredir {target} 308\n}}"


def _pretty_url_redirects(release_dir: str, canonical: bool, depth: int) -> str:
    """The redirects pretty URLs need: /dir -> /dir/, /page/ -> /page; with `canonical`, one URL per page.

    By default /x, /x.html and /x/index.html are all served as they are (the links that Sphinx,
    rustdoc and Jekyll output use), since a redirect costs a visitor a round trip per click.
    """
    rules = [
        # /x -> /x/ when x is a directory with an index and there is no file x or x.html
        f"@todir {{\n\tnot path */\n\tnot file {{\n\t\troot {release_dir}\n\t\ttry_files {{path}} "
        f"{{path}}.html\n\t}}\n\tfile {{\n\t\troot {release_dir}\n\t\ttry_files {{path}}/index.html\n\t}}\n"
        f"\tvars_regexp todir {_URI} ^([^?]*)(\\?.*)?$\n}}",
        _redirect("todir", "{re.todir.1}/{re.todir.2}"),
        # /x/ -> /x when there is no x/index.html but an x.html
        "@slash path_regexp slash ^(/.+)/$",
        f"route @slash {{\n\t@tofile {{\n\t\tnot file {{\n\t\t\troot {release_dir}\n\t\t\ttry_files "
        f"{{path}}index.html\n\t\t}}\n\t\tfile {{\n\t\t\troot {release_dir}\n\t\t\ttry_files "
        f"{{re.slash.1}}.html\n\t\t}}\n\t\tvars_regexp tofile {_URI} ^(/[^?]*[^/?])/(\\?.*)?$\n\t}}\n"
        f"\troute @tofile {{\n\t\t{_REDIRECT_CACHE}\n\t\tredir {{re.tofile.1}}{{re.tofile.2}} 308\n\t}}\n}}",
    ]
    if canonical:
        rules += [
            # /x/index.html -> /x/
            f"@idx vars_regexp idx {_URI} ^([^?]*/)index\\.html(\\?.*)?$",
            _redirect("idx", "{re.idx.1}{re.idx.2}"),
            # /x.html -> /x
            f"@dothtml vars_regexp dothtml {_URI} ^(/[^?]+)\\.html(\\?.*)?$",
            _redirect("dothtml", "{re.dothtml.1}{re.dothtml.2}"),
        ]
    return _indent(rules, depth)


def render_identity(layout: dict, current: str | None) -> str:
    """Headers every response carries, on port 80 too: which node, which release."""
    node, release = _caddy_quote(layout["node_name"]), _caddy_quote(current or "none")
    return f"header {{\n\tX-Edge-Node {node}\n\tX-Edge-Release {release}\n\t-Server\n}}\n"


def render_site(layout: dict, current: str | None, previous: str | None, rules: dict, cert_ready: bool) -> str:
    """The Caddy snippet for the site block: health, rules, pretty URLs, skew protection."""
    releases = f"{layout['root']}/releases"
    head = [render_identity(layout, current), 'header Strict-Transport-Security "max-age=31536000"']
    if current and cert_ready:
        health = [
            f"root * {releases}/{current}",
            'header Content-Type "text/plain; charset=utf-8"',
            "file_server",
        ]
    else:
        why = "no release is active" if not current else "no certificate is installed"
        health = [f"respond {_caddy_quote(f'edgecdn-unready: {why}')} 503"]
    text = _indent(head, 0)
    text += f"handle {HEALTH_PATH} {{\n\theader Cache-Control no-store\n" + _indent(health, 1) + "}\n"
    if not current:
        return text + 'handle {\n\trespond "no release is active on this node" 503\n}\n'
    cur = f"{releases}/{current}"

    def not_found(tag: str) -> list[str]:
        return [
            'header Cache-Control "no-cache"',
            f"root * {cur}",
            f"@has404_{tag} file /404.html",
            f"route @has404_{tag} {{\n\trewrite * /404.html\n\tfile_server {{\n\t\tstatus 404\n\t}}\n}}",
            'respond "Not Found" 404',
        ]

    redirects = rules.get("redirects", [])
    rewrites = [r for r in redirects if "\nrewrite " in r]
    guards = [
        f"@unsafe vars_regexp unsafe {_URI} {_caddy_quote(UNSAFE_PATH)}",
        'route @unsafe {\n\theader Cache-Control "no-cache"\n\trespond "Bad Request" 400\n}',
        # The site's rule files and dotfiles (.git/, .env, .htaccess) are never served.
        f"@hidden path {' '.join('/' + name for name in RULE_FILES)}",
        "@dotted {\n\tpath_regexp dotted (^|/)\\.\n\tnot path /.well-known/*\n}",
        *(f"route @{m} {{\n" + _indent(not_found(m), 1) + "}" for m in ("hidden", "dotted")),
    ]
    # Order: the guards, the site's headers, its redirects, the pretty-URL redirects, and only
    # then its 200 rewrites, so a rewritten path is served, never redirected again.
    body = _indent(guards + rules.get("headers", []) + [r for r in redirects if r not in rewrites], 1)
    body += _pretty_url_redirects(cur, bool(rules.get("canonical")), 1)
    body += _indent(rewrites, 1)
    body += _serve_from(cur, "cur", 1)
    if previous:
        # Skew protection: a page loaded before a switch may still fetch its old assets, never
        # an old page or document (a deleted page must be gone).
        body += _serve_from(f"{releases}/{previous}", "prev", 1, assets_only=True)
    body += _indent(not_found("end"), 1)
    return text + "handle {\n\troute {\n" + body + "\t}\n}\n"


# ---------------------------------------------------------------- actions


def _run(argv: list[str], stdin: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout, check=False)


def _reload_caddy(layout: dict) -> None:
    try:
        result = _run(
            [
                layout["caddy_bin"],
                "reload",
                "--config",
                layout["caddyfile"],
                "--adapter",
                "caddyfile",
                "--address",
                f"unix/{layout['admin_socket']}",
                "--force",
            ],
            timeout=RELOAD_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise AgentError(
            f"the web server did not confirm the new configuration within {RELOAD_TIMEOUT} s", "reload"
        ) from None
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise AgentError(f"the web server refused the new configuration: {detail[0][:300]}", "reload")


def _rules_of(paths: Paths, release_id: str | None) -> dict:
    if not release_id:
        return {}
    try:
        return json.loads((paths.meta / f"{release_id}.json").read_text())["rules"]
    except (OSError, ValueError, KeyError):
        raise AgentError(f"release {release_id} has no record; finalize it again", "state") from None


def _write_site(paths: Paths, current: str | None, previous: str | None) -> None:
    snippet = render_site(paths.layout, current, previous, _rules_of(paths, current), paths.cert_installed.exists())
    _atomic_write(paths.identity_snippet, render_identity(paths.layout, current).encode(), 0o644)
    _atomic_write(paths.site_snippet, snippet.encode(), 0o644)


def _switch(paths: Paths, current: str | None, previous: str | None) -> None:
    """Make the web server serve these releases, then record them; on any failure change nothing.

    The recorded state (the current and previous links that `status` reports) moves only once
    the web server has confirmed the new configuration.
    """
    snippets = (paths.site_snippet, paths.identity_snippet)
    old_snippets = {p: p.read_bytes() for p in snippets if p.exists()}
    _write_site(paths, current, previous)
    try:
        _reload_caddy(paths.layout)
    except AgentError:
        for path, content in old_snippets.items():
            _atomic_write(path, content, 0o644)
        # After a timeout the server may hold either config: give it the old one again.
        with contextlib.suppress(AgentError):
            _reload_caddy(paths.layout)
        raise
    for link, target in ((paths.previous, previous), (paths.current, current)):
        if target:
            _atomic_symlink(link, f"releases/{target}")


def do_init(paths: Paths) -> dict:
    """Create the node's directories, a placeholder certificate and the not-ready site."""
    for d in (paths.root, paths.releases, paths.staging, paths.verifying, paths.meta, paths.state):
        d.mkdir(parents=True, exist_ok=True)
    paths.tls.mkdir(parents=True, exist_ok=True)
    if not paths.cert.exists() or not paths.key.exists():
        # Caddy will not start without a certificate; health stays 503 until a real one arrives.
        result = _run(
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
        _write_site(paths, current, paths.link_target(paths.previous))
    return {"initialized": str(paths.root)}


def do_finalize(paths: Paths, release_id: str) -> dict:
    """Check a staged upload against its manifest (stdin) and make it an immutable release.

    The upload leaves the staging area (where rsync writes) before it is checked, so nothing
    can change it between the check and the release.
    """
    _checked_release(release_id)
    target = paths.release(release_id)
    manifest = _read_stdin(MAX_MANIFEST_BYTES)
    if target.exists():
        _remove_tree(paths.staging / release_id)
        return {"release": release_id, "finalized": True, "already": True}
    files = parse_manifest(manifest, release_id)
    staged = paths.staging / release_id
    if not staged.is_dir() or staged.is_symlink() or not _upload_record(paths, release_id).exists():
        raise AgentError(f"release {release_id} has not been uploaded (begin, rsync, then finalize)")
    if sum(e["size"] for e in files) > MAX_RELEASE_BYTES:
        raise AgentError(f"the release is larger than the {MAX_RELEASE_BYTES} bytes a node takes", "quota")
    paths.verifying.mkdir(exist_ok=True)
    checking = paths.verifying / release_id
    _remove_tree(checking)
    os.rename(staged, checking)
    try:
        verify_tree(checking, files)
        rules = compile_rules(checking)
        # A rules file the web server would reject fails here, not at activation on every node.
        site = render_site(paths.layout, release_id, paths.link_target(paths.current), rules, True)
        _caddy_validates(paths, site, paths.cert.read_bytes(), paths.key.read_bytes(), "this site's rules")
    except BaseException:
        _remove_tree(checking)
        raise
    marker = checking / HEALTH_FILE
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_bytes(f"{HEALTH_MARKER} release={release_id}\n".encode())
    entries = [*files, {"path": HEALTH_FILE, "size": marker.stat().st_size, "sha256": _sha256(marker)}]
    record = {
        "release": release_id,
        "files": len(files),
        "finalized_at": int(time.time()),
        "rules": rules,
        "manifest": [[e["path"], e["size"], e["sha256"]] for e in entries],
    }
    _atomic_write(paths.meta / f"{release_id}.json", json.dumps(record).encode(), 0o644)
    for dirpath, _, filenames in os.walk(checking):
        for name in filenames:
            os.chmod(Path(dirpath) / name, 0o444)
    os.rename(checking, target)
    _upload_record(paths, release_id).unlink(missing_ok=True)
    for dirpath, _, _ in os.walk(target, topdown=False):
        os.chmod(dirpath, 0o555)  # noqa: S103 - released files are public web content
    return {"release": release_id, "finalized": True, "already": False, "files": len(files)}


def _upload_record(paths: Paths, release_id: str) -> Path:
    return paths.meta / f"upload-{release_id}.json"


def do_begin(paths: Paths, release_id: str, size: str) -> dict:
    """Open an upload of `size` bytes: within the quota and above the free-disk floor, or refused.

    The agent records when it began, so stale uploads are pruned by its own clock, never by
    file times a client can set.
    """
    total = int(size)
    if total > MAX_RELEASE_BYTES:
        raise AgentError(f"the release is {total} bytes; a node takes at most {MAX_RELEASE_BYTES}", "quota")
    usage = shutil.disk_usage(paths.root)
    if usage.free - total < FREE_DISK_FLOOR_BYTES:
        raise AgentError(
            f"the node has {usage.free} bytes free; this upload of {total} would leave less than "
            f"{FREE_DISK_FLOOR_BYTES} (prune old releases or use a bigger disk)",
            "quota",
        )
    (paths.staging / release_id).mkdir(exist_ok=True)
    _atomic_write(_upload_record(paths, release_id), json.dumps({"began": time.time(), "bytes": total}).encode(), 0o644)
    return {"release": release_id, "upload": "open", "bytes": total}


def _intact(paths: Paths, release_id: str) -> bool:
    """Whether a finalized release still holds exactly what was verified at finalize."""
    try:
        record = json.loads((paths.meta / f"{release_id}.json").read_text())
        files = [{"path": p, "size": size, "sha256": sha} for p, size, sha in record["manifest"]]
        for entry in files:
            entry["derived"] = False  # checked at finalize; here only the bytes
        verify_tree(paths.release(release_id), files)
    except (AgentError, OSError, ValueError, KeyError, TypeError):
        return False
    return True


def do_activate(paths: Paths, release_id: str) -> dict:
    """Serve a finalized release; the one it replaces becomes previous."""
    target = paths.release(release_id)
    if not target.is_dir() or not (paths.meta / f"{release_id}.json").exists():
        raise AgentError(f"release {release_id} is not finalized on this node", "missing")
    if not _intact(paths, release_id):
        raise AgentError(
            f"release {release_id} was altered on this node after it was finalized; upload it again", "integrity"
        )
    current = paths.link_target(paths.current)
    previous = paths.link_target(paths.previous)
    if current == release_id:
        _write_site(paths, current, previous)
        _reload_caddy(paths.layout)
        return {"active": release_id, "previous": previous, "changed": False}
    _switch(paths, release_id, current or previous)
    return {"active": release_id, "previous": current or previous, "changed": True}


def do_rollback(paths: Paths) -> dict:
    """Serve the previous release again; the current one becomes previous."""
    current = paths.link_target(paths.current)
    previous = paths.link_target(paths.previous)
    if not previous or not paths.release(previous).is_dir():
        raise AgentError("there is no previous release to roll back to", "missing")
    _switch(paths, previous, current)
    return {"active": previous, "previous": current, "changed": True}


# Key types the web server (Go's crypto/tls) can serve: RSA, ECDSA on these curves, Ed25519.
_SERVABLE_KEYS = re.compile(r"Public Key Algorithm: (rsaEncryption|ED25519|id-ecPublicKey)")
_SERVABLE_CURVES = ("prime256v1", "secp384r1", "secp521r1")
MIN_CERT_DAYS_LEFT = 7


def _openssl_date(text: str) -> dt.datetime:
    return dt.datetime.strptime(text.strip(), "%b %d %H:%M:%S %Y %Z").replace(tzinfo=dt.UTC)


def _dns_names(paths: Paths, leaf: bytes) -> list[str]:
    """The leaf's DNS subject alternative names, decoded as structure (a URI can't pose as one)."""
    fd, tmp = tempfile.mkstemp(dir=paths.state, prefix=".leaf.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(leaf)
        decoded = ssl._ssl._test_decode_cert(tmp)  # type: ignore[attr-defined]  # CPython's own X.509 decoder
    except (ssl.SSLError, OSError, AttributeError):
        raise AgentError("the certificate's names cannot be read") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return [value for kind, value in decoded.get("subjectAltName", ()) if kind == "DNS"]


def _cert_facts(paths: Paths, pem: bytes) -> dict:
    """What the leaf certificate says: validity, DNS names, public key; refused unless servable."""
    openssl = paths.layout["openssl_bin"]
    result = _run([openssl, "x509", "-noout", "-text", "-startdate", "-enddate", "-pubkey"], pem)
    if result.returncode != 0:
        raise AgentError("the certificate is not a PEM X.509 certificate")
    out = result.stdout.decode(errors="replace")
    start, end = re.search(r"notBefore=(.+)", out), re.search(r"notAfter=(.+)", out)
    pubkey = re.search(r"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", out, re.S)
    if not start or not end or not pubkey:
        raise AgentError("the certificate has no validity dates or public key")
    if re.search(r"CA:TRUE", out):
        raise AgentError("that is a CA certificate; install the site's own (leaf) certificate first in the chain")
    algorithm = _SERVABLE_KEYS.search(out)
    curve = re.search(r"ASN1 OID: (\S+)", out)
    if not algorithm or (
        algorithm.group(1) == "id-ecPublicKey" and (not curve or curve.group(1) not in _SERVABLE_CURVES)
    ):
        raise AgentError(
            "the certificate's key type is one the web server cannot serve; use RSA, ECDSA P-256/384/521 or Ed25519"
        )
    pem_leaf = PEM_BLOCK.match(pem.lstrip())
    return {
        "not_before": _openssl_date(start.group(1)),
        "not_after": _openssl_date(end.group(1)),
        "names": _dns_names(paths, pem_leaf.group(0) if pem_leaf else pem),
        "pubkey": pubkey.group(0),
    }


def _caddy_validates(paths: Paths, site: str, chain: bytes, key: bytes, what: str) -> None:
    """Have the web server itself load a site block with this certificate; refuse on any error."""
    with tempfile.TemporaryDirectory(dir=paths.state, prefix=".check.") as tmp:
        cert_file, key_file, config = Path(tmp) / "cert.pem", Path(tmp) / "key.pem", Path(tmp) / "Caddyfile"
        (Path(tmp) / "site.caddy").write_text(site)
        cert_file.write_bytes(chain)
        key_file.touch(mode=0o600)
        key_file.write_bytes(key)
        config.write_text(
            f"{{\n\tadmin off\n\tauto_https off\n\tstorage file_system {tmp}\n}}\n"
            f"https://{paths.layout['domain']} {{\n\ttls {cert_file} {key_file}\n\timport {tmp}/site.caddy\n}}\n"
        )
        result = _run([paths.layout["caddy_bin"], "validate", "--config", str(config), "--adapter", "caddyfile"])
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise AgentError(f"the web server cannot load {what}: {detail[0][:300]}")


def _caddy_loads(paths: Paths, chain: bytes, key: bytes) -> None:
    """Prove the web server accepts this certificate and key before they replace the served ones."""
    _caddy_validates(paths, "respond ok\n", chain, key, "this certificate")


PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----\r?\n[A-Za-z0-9+/=\r\n]+-----END \1-----\r?\n?")


def split_pem_bundle(data: bytes) -> tuple[bytes, bytes]:
    """(chain, key) from a bundle of exactly one private key and one or more certificates."""
    blocks = list(PEM_BLOCK.finditer(data))
    leftover = PEM_BLOCK.sub(b"", data).strip()
    keys = [b for b in blocks if b.group(1).endswith(b"PRIVATE KEY")]
    certs = [b for b in blocks if b.group(1) == b"CERTIFICATE"]
    if leftover or len(keys) != 1 or not certs or len(keys) + len(certs) != len(blocks):
        raise AgentError("expected on standard input a PEM bundle: one private key and its certificate chain")
    as_pem = lambda block: block.group(0).rstrip(b"\r\n") + b"\n"  # noqa: E731
    return b"".join(as_pem(c) for c in certs), as_pem(keys[0])


def _covers(names: list[str], host: str) -> bool:
    return any(name == host or (name.startswith("*.") and host.split(".", 1)[-1] == name[2:]) for name in names)


def do_install_cert(paths: Paths) -> dict:
    """Install the key and certificate chain (one PEM bundle on stdin) after checking them.

    The web server must load the new pair before it replaces the served one; if the reload
    fails, the old pair is put back, so a bad certificate can never take a node down and a
    good one always brings it back.
    """
    chain, key = split_pem_bundle(_read_stdin(MAX_CERT_BYTES))
    facts = _cert_facts(paths, chain)
    missing = [n for n in [paths.layout["domain"], *paths.layout["aliases"]] if not _covers(facts["names"], n)]
    if missing:
        raise AgentError(f"the certificate does not cover {', '.join(missing)}")
    now = dt.datetime.now(dt.UTC)
    if facts["not_before"] > now:
        raise AgentError(f"the certificate is not valid before {facts['not_before'].isoformat()}")
    if facts["not_after"] <= now:
        raise AgentError(f"the certificate expired at {facts['not_after'].isoformat()}")
    if facts["not_after"] - now < dt.timedelta(days=MIN_CERT_DAYS_LEFT):
        raise AgentError(f"the certificate expires within {MIN_CERT_DAYS_LEFT} days; renew it first")
    key_pub = _run([paths.layout["openssl_bin"], "pkey", "-pubout"], key)
    if key_pub.returncode != 0:
        raise AgentError("the key is not a PEM private key")
    if key_pub.stdout.decode().strip() != facts["pubkey"].strip():
        raise AgentError("the private key does not belong to the certificate")
    not_after = facts["not_after"].isoformat()
    unchanged = paths.cert_installed.exists() and paths.cert.read_bytes() == chain and paths.key.read_bytes() == key
    if not unchanged:
        _caddy_loads(paths, chain, key)
        old = {path: path.read_bytes() for path in (paths.key, paths.cert) if path.exists()}
        was_installed = paths.cert_installed.exists()
        _atomic_write(paths.key, key, 0o640)
        _atomic_write(paths.cert, chain, 0o644)
        _atomic_write(paths.cert_installed, not_after.encode(), 0o644)
        try:
            _write_site(paths, paths.link_target(paths.current), paths.link_target(paths.previous))
            _reload_caddy(paths.layout)
        except AgentError:
            for path, content in old.items():
                _atomic_write(path, content, 0o640 if path == paths.key else 0o644)
            if not was_installed:
                paths.cert_installed.unlink(missing_ok=True)
            _write_site(paths, paths.link_target(paths.current), paths.link_target(paths.previous))
            with contextlib.suppress(AgentError):
                _reload_caddy(paths.layout)
            raise
    return {"certificate": {"not_after": not_after, "names": facts["names"]}, "changed": not unchanged}


def do_status(paths: Paths) -> dict:
    """What this node serves and holds."""
    releases = (
        sorted(p.name for p in paths.releases.iterdir() if RELEASE_ID.match(p.name)) if paths.releases.is_dir() else []
    )
    staged = (
        sorted(p.name for p in paths.staging.iterdir() if RELEASE_ID.match(p.name)) if paths.staging.is_dir() else []
    )
    cert = None
    if paths.cert_installed.exists():
        chain = paths.cert.read_bytes()
        facts = _cert_facts(paths, chain)
        cert = {
            "not_after": facts["not_after"].isoformat(),
            "names": facts["names"],
            "sha256": hashlib.sha256(chain).hexdigest(),
        }
    active = paths.link_target(paths.current)
    return {
        "node": paths.layout["node_name"],
        "active": active,
        "intact": _intact(paths, active) if active else None,
        "previous": paths.link_target(paths.previous),
        "releases": releases,
        "staged": staged,
        "certificate": cert,
    }


def do_prune(paths: Paths, keep: int) -> dict:
    """Delete releases beyond the newest `keep` (never current or previous) and stale uploads."""
    protected = {paths.link_target(paths.current), paths.link_target(paths.previous)}
    finalized = []
    for p in paths.releases.iterdir():
        if RELEASE_ID.match(p.name):
            meta = paths.meta / f"{p.name}.json"
            finalized.append((meta.stat().st_mtime if meta.exists() else 0, p.name))
    finalized.sort(reverse=True)
    removed = []
    for _, name in finalized[keep:]:
        if name not in protected:
            _remove_tree(paths.releases / name)
            (paths.meta / f"{name}.json").unlink(missing_ok=True)
            removed.append(name)
    now = time.time()
    for p in paths.staging.iterdir():
        try:
            began = float(json.loads(_upload_record(paths, p.name).read_text())["began"])
        except (OSError, ValueError, KeyError, TypeError):
            began = 0.0  # an upload that never began through the agent is stale at once
        if now - began > STAGING_STALE_SECONDS:
            _remove_tree(p)
            _upload_record(paths, p.name).unlink(missing_ok=True)
            removed.append(f"staging/{p.name}")
    return {"removed": removed}


def do_receive(paths: Paths, command: str) -> None:
    """Hand an rsync upload to rrsync, confined to the staging directory, write-only."""
    os.environ["SSH_ORIGINAL_COMMAND"] = command
    rrsync = paths.layout["rrsync_bin"]
    os.execv(rrsync, [rrsync, "-wo", "-munge", str(paths.staging)])  # noqa: S606 - fixed path, no shell


# ---------------------------------------------------------------- entry point


@dataclass(frozen=True)
class Verb:
    """One request the agent serves: its arguments' patterns, whether it changes the node, who may ask."""

    run: Callable[..., dict]
    args: tuple[tuple[str, str], ...] = ()
    optional: int = 0
    changes_state: bool = True
    local_only: bool = False


# Each argument: its pattern, and what a refusal says it should be.
_RELEASE_ARG = (RELEASE_ID.pattern, "a release id (20 lower-case hex digits)")
_KEEP_ARG = (r"^(?:[2-9]|[1-9][0-9])$", "a number of releases to keep, 2 to 99")
_SIZE_ARG = (r"^(?:0|[1-9][0-9]{0,14})$", "a size in bytes")
VERBS: dict[str, Verb] = {
    "status": Verb(lambda paths: do_status(paths), changes_state=False),
    "begin": Verb(lambda paths, rid, size: do_begin(paths, rid, size), args=(_RELEASE_ARG, _SIZE_ARG)),
    "finalize": Verb(lambda paths, rid: do_finalize(paths, rid), args=(_RELEASE_ARG,)),
    "activate": Verb(lambda paths, rid: do_activate(paths, rid), args=(_RELEASE_ARG,)),
    "rollback": Verb(lambda paths: do_rollback(paths)),
    "prune": Verb(lambda paths, keep="3": do_prune(paths, int(keep)), args=(_KEEP_ARG,), optional=1),
    "install-cert": Verb(lambda paths: do_install_cert(paths)),
    "init": Verb(lambda paths: do_init(paths), local_only=True),
}


def usage() -> str:
    """The verbs the deploy key may use, from the table."""
    remote = [
        " ".join([name, *("ID" if a is _RELEASE_ARG else "[N]" for a in verb.args)])
        for name, verb in VERBS.items()
        if not verb.local_only
    ]
    return "verbs: " + ", ".join(remote) + ", and rsync uploads"


def dispatch(words: list[str], paths: Paths, local: bool) -> dict:
    """Run one verb after checking it and its arguments against the table."""
    name, args = words[0], words[1:]
    verb = VERBS.get(name)
    if verb is None or (verb.local_only and not local):
        raise AgentError(f"unknown or malformed request {' '.join(words)[:80]!r}; {usage()}")
    if not len(verb.args) - verb.optional <= len(args) <= len(verb.args):
        raise AgentError(f"unknown or malformed request {' '.join(words)[:80]!r}; {usage()}")
    for value, (pattern, expected) in zip(args, verb.args, strict=False):
        if not re.match(pattern, value):
            raise AgentError(f"{name}: {value[:40]!r} is not {expected}")
    if not verb.changes_state:
        return verb.run(paths, *args)
    with _state_lock(paths):
        return verb.run(paths, *args)


@contextlib.contextmanager
def _state_lock(paths: Paths) -> Iterator[None]:
    """One state-changing request at a time; a second deployer is told the node is busy."""
    paths.state.mkdir(parents=True, exist_ok=True)
    with open(paths.state / "lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AgentError(
                "another deploy is changing this node right now; try again when it is done", "busy"
            ) from None
        yield


def _audit(words: list[str], outcome: str) -> None:
    """One line per request to the system log: what was asked, from where, and how it ended."""
    client = (os.environ.get("SSH_CONNECTION") or "local").split(" ")[0]
    request = " ".join(words)[:200].encode("unicode_escape", "replace").decode()
    syslog.openlog("edgecdn-agent", 0, syslog.LOG_AUTH)
    syslog.syslog(syslog.LOG_INFO, f"client={client} request={request!r} outcome={outcome}")


# Exit codes: what went wrong, for the deployer and for a person at a terminal.
EXIT_OK, EXIT_REFUSED, EXIT_INTERNAL, EXIT_BUSY = 0, 2, 3, 4


def main(argv: list[str] | None = None) -> int:
    """Serve one request and print one JSON object; never a traceback."""
    os.umask(0o022)
    words: list[str] = []
    try:
        paths = Paths(json.loads(Path(__file__).with_name(LAYOUT_FILE).read_text()))
        # Remote whenever sshd ran us (with the deploy key's forced command), whatever else is set.
        remote = "SSH_CONNECTION" in os.environ
        if remote:
            original = os.environ.get("SSH_ORIGINAL_COMMAND", "")
            if len(original) > MAX_COMMAND:
                raise AgentError("request is too long")
            try:
                words = shlex.split(original)
            except ValueError:
                raise AgentError("request is not a well-formed command line") from None
            if words[:2] == ["rsync", "--server"]:
                if "--sender" in words:
                    raise AgentError("downloads are not allowed; the deploy key only uploads")
                _audit(words, "upload")
                do_receive(paths, original)
        else:
            words = list(sys.argv[1:] if argv is None else argv)
        if not words:
            raise AgentError(f"no request given; this key only runs the edgecdn deploy agent ({usage()})")
        result = dispatch(words, paths, local=not remote)
        print(json.dumps({"ok": True, **result}))
        _audit(words, "ok")
        return EXIT_OK
    except AgentError as exc:
        print(json.dumps({"ok": False, "error": exc.code, "message": str(exc)}))
        # Also on stderr, where rsync and a person at a terminal look.
        print(f"edgecdn agent: {exc}", file=sys.stderr)
        _audit(words, f"refused:{exc.code}")
        return EXIT_BUSY if exc.code == "busy" else EXIT_REFUSED
    except Exception as exc:  # the boundary answers in JSON whatever happens, never with a traceback
        print(json.dumps({"ok": False, "error": "internal", "message": f"{type(exc).__name__}: {str(exc)[:300]}"}))
        _audit(words, f"internal:{type(exc).__name__}")
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
