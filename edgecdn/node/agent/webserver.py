"""The web server's side of a node: the site config the agent renders, and loading it into Caddy.

`render_site` turns a release's compiled rules into the Caddy snippet the node's Caddyfile
imports: the health marker, guards against hostile paths, the site's own headers and redirects,
pretty URLs, content types and cache lifetimes, skew protection. `reload` and `validate` have
Caddy itself confirm a config before anything on the node depends on it.

Which release is served is not part of the config: every request reads it, once, from a small
file the agent replaces atomically (Caddy's {file.*} placeholder, into a request variable that
the file server, the health marker and X-Edge-Release all use). A release switch is therefore a
rename, not a config reload: a reload makes Caddy stop its old servers, and connections they had
just accepted were closed without an answer (about one per client per switch in the lab). Caddy
reloads only when the config itself changes: another site's rules, the first release, a new
certificate.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from edgecdn.contract import HEALTH_PATH, RULE_FILES
from edgecdn.node.agent.common import AgentError, Layout, Paths, run
from edgecdn.node.agent.rules import Rules, caddy_quote

RELOAD_TIMEOUT = 30
# The request variables the served files are read into.
SERVED_VAR, PREVIOUS_VAR = "edge_release", "edge_previous"
# What skew protection serves from the previous release: what pages load, not pages.
SKEW_ASSET_TYPES = (
    "css js mjs map wasm woff woff2 ttf otf eot png jpg jpeg gif webp avif svg ico bmp mp4 webm mp3 ogg".split()
)
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


def _indent(lines: list[str], depth: int) -> str:
    pad = "\t" * depth
    return "".join(pad + line + "\n" for chunk in lines for line in chunk.splitlines())


def _content_type_rule(index: int, content_type: str, extensions: str) -> str:
    patterns = " ".join(f"*.{ext}" for ext in extensions.split())
    return f"@type{index} path {patterns}\nheader @type{index} Content-Type {caddy_quote(content_type)}"


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


def render_identity(layout: Layout, serving: bool) -> str:
    """Headers every response carries, on port 80 too: which node, which release (read once per request)."""
    node = caddy_quote(layout["node_name"])
    if not serving:
        return f"header {{\n\tX-Edge-Node {node}\n\tX-Edge-Release none\n\t-Server\n}}\n"
    served = Paths(layout).served
    return (
        f"vars {SERVED_VAR} {{file.{served}}}\n"
        f"header {{\n\tX-Edge-Node {node}\n\tX-Edge-Release {{vars.{SERVED_VAR}}}\n\t-Server\n}}\n"
    )


def render_site(layout: Layout, serving: bool, rules: Rules | None, cert_ready: bool) -> str:
    """The Caddy snippet for the site block: health, rules, pretty URLs, skew protection.

    `serving`: whether a release is active; which one is read per request from the served files.
    """
    releases = f"{layout['root']}/releases"
    head = [render_identity(layout, serving), 'header Strict-Transport-Security "max-age=31536000"']
    current = f"{{vars.{SERVED_VAR}}}"
    if serving and cert_ready:
        health = [
            f"root * {releases}/{current}",
            'header Content-Type "text/plain; charset=utf-8"',
            "file_server",
        ]
    else:
        why = "no release is active" if not serving else "no certificate is installed"
        health = [f"respond {caddy_quote(f'edgecdn-unready: {why}')} 503"]
    text = _indent(head, 0)
    text += f"handle {HEALTH_PATH} {{\n\theader Cache-Control no-store\n" + _indent(health, 1) + "}\n"
    if not serving:
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

    redirects = rules["redirects"] if rules else []
    rewrites = [r for r in redirects if "\nrewrite " in r]
    guards = [
        f"@unsafe vars_regexp unsafe {_URI} {caddy_quote(UNSAFE_PATH)}",
        'route @unsafe {\n\theader Cache-Control "no-cache"\n\trespond "Bad Request" 400\n}',
        # The site's rule files and dotfiles (.git/, .env, .htaccess) are never served.
        f"@hidden path {' '.join('/' + name for name in RULE_FILES)}",
        "@dotted {\n\tpath_regexp dotted (^|/)\\.\n\tnot path /.well-known/*\n}",
        *(f"route @{m} {{\n" + _indent(not_found(m), 1) + "}" for m in ("hidden", "dotted")),
    ]
    # Order: the guards, the site's headers, its redirects, the pretty-URL redirects, and only
    # then its 200 rewrites, so a rewritten path is served, never redirected again.
    body = _indent(guards + (rules["headers"] if rules else []) + [r for r in redirects if r not in rewrites], 1)
    body += _pretty_url_redirects(cur, bool(rules and rules["canonical"]), 1)
    body += _indent(rewrites, 1)
    body += _serve_from(cur, "cur", 1)
    # Skew protection: a page loaded before a switch may still fetch its old assets, never an old
    # page or document (a deleted page must be gone). With no previous release, the file names
    # the current one again.
    body += _indent([f"vars {PREVIOUS_VAR} {{file.{Paths(layout).served_previous}}}"], 1)
    body += _serve_from(f"{releases}/{{vars.{PREVIOUS_VAR}}}", "prev", 1, assets_only=True)
    body += _indent(not_found("end"), 1)
    return text + "handle {\n\troute {\n" + body + "\t}\n}\n"


def reload(layout: Layout) -> None:
    """Have the running web server load its config again; refused unless it confirms in time."""
    try:
        result = run(
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


def validate(paths: Paths, site: str, chain: bytes, key: bytes, what: str) -> None:
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
        result = run([paths.layout["caddy_bin"], "validate", "--config", str(config), "--adapter", "caddyfile"])
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise AgentError(f"the web server cannot load {what}: {detail[0][:300]}")


def loads_certificate(paths: Paths, chain: bytes, key: bytes) -> None:
    """Prove the web server accepts this certificate and key before they replace the served ones."""
    validate(paths, "respond ok\n", chain, key, "this certificate")
