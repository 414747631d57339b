"""The compiler for a site's own rule files: `_redirects`, `_headers` and `_edgecdn.json`.

Each is checked line by line and turned into Caddy directives at finalize, so a rules file the
web server would reject is refused before any node switches to it. Every rule's cost per
request is bounded (rules, wildcards per rule, total pattern size), and no spelling can set,
remove or shadow a header the node owns.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TypedDict

from edgecdn.contract import HEADERS_FILE, REDIRECTS_FILE, RULE_FILES, SETTINGS_FILE
from edgecdn.node.agent.common import AgentError

MAX_RULES = 1000
# Bounds on what a site's _redirects may cost per request: Caddy tries the rules in order.
MAX_RULE_WILDCARDS = 4
MAX_RULES_BYTES = 64 << 10
MAX_RULE_FILE_BYTES = 1 << 20


class Rules(TypedDict):
    """A release's compiled rules, as its record on the node keeps them."""

    redirects: list[str]
    headers: list[str]
    canonical: bool


def caddy_quote(text: str) -> str:
    """A Caddyfile token in double quotes.

    The Caddyfile lexer unescapes only an escaped quote inside quotes; a backslash is otherwise literal,
    which regexes rely on. Callers never pass a value ending in a backslash.
    """
    return '"' + text.replace('"', '\\"') + '"'


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
        matcher = f"@{rule} path_regexp {rule} {caddy_quote(regex)}"
        if status == "200":
            out.append(f"{matcher}\nrewrite @{rule} {caddy_quote(target)}")
        else:
            out.append(f"{matcher}\nredir @{rule} {caddy_quote(target)} {status}")
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
            out.append(f"@{rule} path_regexp {caddy_quote(regex)}")
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
        out.append(f"header @{rule} {name} {caddy_quote(value)}")
        if len(out) > MAX_RULES:
            raise AgentError(f"_headers has more than {MAX_RULES} rules")
    return out


def compile_settings(text: str) -> bool:
    """_edgecdn.json: the site's own settings; today one, whether to redirect to canonical URLs."""
    try:
        settings = json.loads(text)
    except (ValueError, RecursionError):
        raise AgentError("_edgecdn.json is not JSON") from None
    if not isinstance(settings, dict) or set(settings) - {"canonical_urls"}:
        raise AgentError('_edgecdn.json takes one key, e.g. {"canonical_urls": true}')
    canonical = settings.get("canonical_urls", False)
    if not isinstance(canonical, bool):
        raise AgentError("_edgecdn.json: canonical_urls must be true or false")
    return canonical


def _rule_text(tree: Path, name: str) -> str | None:
    path = tree / name
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_RULE_FILE_BYTES:
        raise AgentError(f"{name} is larger than {MAX_RULE_FILE_BYTES} bytes")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AgentError(f"{name} is not UTF-8 text") from None


def compile_rules(tree: Path) -> Rules:
    """The release's own rule files, checked and compiled."""
    redirects, headers, settings = (_rule_text(tree, name) for name in (REDIRECTS_FILE, HEADERS_FILE, SETTINGS_FILE))
    return Rules(
        redirects=compile_redirects(redirects) if redirects is not None else [],
        headers=compile_headers(headers) if headers is not None else [],
        canonical=compile_settings(settings) if settings is not None else False,
    )


# ---------------------------------------------------------------- the served site
