"""The deploy agent driven in-process through `main`: its boundary, without sshd or a web server.

What reaches the agent over SSH is pinned against a real lab node in test_lab.py; here every
request goes through the same `main(argv, env, stdin, stdout)` that the node's launcher calls.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from edgecdn.contract import ExitCode, parse_status
from edgecdn.node.agent import protocol
from edgecdn.node.agent.common import AgentError, Paths
from edgecdn.node.files import NodeLayout, render_layout

REMOTE = {"SSH_CONNECTION": "198.51.100.7 50000 192.0.2.1 22"}
RELEASE = "0123456789abcdef0123"


@pytest.fixture
def node(tmp_path: Path) -> Path:
    """A node's layout file, its root and TLS directory under tmp_path, initialized."""
    layout = NodeLayout(
        node_name="eu",
        domain="edgecdn.test",
        root=str(tmp_path / "srv"),
        tls_dir=str(tmp_path / "tls"),
        caddy_bin=shutil.which("caddy") or "/usr/local/bin/caddy",
        openssl_bin=shutil.which("openssl") or "/usr/bin/openssl",
    )
    layout_file = tmp_path / "layout.json"
    layout_file.write_text(render_layout(layout))
    code, answer = run(layout_file, ["init"], env={})
    assert code == ExitCode.OK, answer
    return layout_file


def run(layout_file: Path, argv: list[str], env: dict[str, str], stdin: bytes = b"") -> tuple[int, dict]:
    out = io.StringIO()
    code = protocol.main(argv, env, io.BytesIO(stdin), out, layout_file=layout_file)
    return code, json.loads(out.getvalue())


def remote(layout_file: Path, command: str, stdin: bytes = b"") -> tuple[int, dict]:
    return run(layout_file, [], {**REMOTE, "SSH_ORIGINAL_COMMAND": command}, stdin)


def test_local_only_verbs_cannot_be_reached_with_the_deploy_key(node):
    code, answer = remote(node, "init")
    assert code == ExitCode.REFUSED and answer["error"] == "refused"
    assert "unknown request 'init'" in answer["message"] and "init" not in answer["message"].split(";")[1]


def test_over_ssh_the_request_comes_from_sshd_never_from_argv(node):
    code, answer = run(node, ["init"], {**REMOTE, "SSH_ORIGINAL_COMMAND": "status"})
    assert code == ExitCode.OK and answer["node"] == "eu"


def test_the_status_answer_has_the_contracts_shape(node):
    code, answer = remote(node, "status")
    status = parse_status(answer)
    assert code == ExitCode.OK
    assert (status["active"], status["certificate"], status["releases"]) == (None, None, [])


@pytest.mark.parametrize(
    "command",
    [
        "status extra",
        "begin",
        f"begin {RELEASE} 100",
        f"lease=notatoken begin {RELEASE}",
        "lease 99999",
        "activate ../../etc",
        "activate " + "A" * 20,
        "prune 0",
        "prune 100",
        "prune 1e3",
        "rollback now",
        "sh -c id",
        "'unterminated",
        "x" * 5000,
    ],
)
def test_every_argument_is_checked_against_the_verb_table(node, command):
    code, answer = remote(node, command)
    assert code == ExitCode.REFUSED, answer
    assert answer["ok"] is False and answer["error"] == "refused"


@pytest.mark.parametrize(
    "manifest",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'{"files": {}}',
        b'{"files": [{"path": "\\ud800", "size": 1, "sha256": "' + b"0" * 64 + b'"}]}',
        b'{"files": [{"path": "a", "size": 1e999, "sha256": "' + b"0" * 64 + b'"}]}',
        b'{"files": [{"path": "a", "size": ' + b"9" * 5000 + b', "sha256": "x"}]}',
        b'{"files": [{"path": "a/../../b", "size": 1, "sha256": "' + b"0" * 64 + b'"}]}',
        b'{"files": [{"path": ".well-known/edgecdn/health", "size": 1, "sha256": "' + b"0" * 64 + b'"}]}',
        b"[" * 100_000 + b"]" * 100_000,
    ],
    ids=["text", "binary", "list", "dict-files", "surrogate", "infinity", "huge-int", "dotdot", "reserved", "deep"],
)
def test_a_hostile_manifest_gets_a_json_refusal_never_a_traceback(node, manifest):
    code, answer = remote(node, f"begin {RELEASE}", stdin=manifest)
    assert code == ExitCode.REFUSED, answer
    assert answer["ok"] is False and "Traceback" not in answer["message"]


def test_input_beyond_a_verbs_limit_is_refused_before_anything_runs(node):
    code, answer = remote(node, "install-cert", stdin=b"x" * (protocol.MAX_CERT_BYTES + 1))
    assert code == ExitCode.REFUSED and "larger than" in answer["message"]


def test_a_second_deploy_is_told_the_node_is_busy_while_reads_go_on(node):
    paths = Paths(json.loads(node.read_text()))
    with protocol.state_lock(paths):
        code, answer = remote(node, "rollback")
        assert code == ExitCode.BUSY and answer["error"] == "busy"
        assert remote(node, "status")[0] == ExitCode.OK
    assert remote(node, "rollback")[1]["error"] == "missing", "the lock is released after the request"


def test_a_silent_client_cannot_hold_a_request_open():
    read_end, write_end = os.pipe()
    try:
        with os.fdopen(read_end, "rb", buffering=0) as stream:
            started = time.monotonic()
            with pytest.raises(AgentError, match="did not arrive within"):
                protocol.read_input(stream, 100, seconds=0.3)
            assert time.monotonic() - started < 5
    finally:
        os.close(write_end)


def test_input_is_read_before_the_lock_is_taken(node, monkeypatch):
    order: list[str] = []
    monkeypatch.setattr(protocol, "read_input", lambda stream, limit: order.append("read") or b"")
    real_lock = protocol.state_lock

    def lock(paths):
        order.append("lock")
        return real_lock(paths)

    monkeypatch.setattr(protocol, "state_lock", lock)
    remote(node, f"begin {RELEASE}")
    assert order == ["read", "lock"]


def test_each_request_leaves_one_audit_line_with_client_and_outcome(node, monkeypatch):
    lines: list[str] = []
    monkeypatch.setattr(protocol.syslog, "syslog", lambda priority, line: lines.append(line))
    remote(node, "status")
    remote(node, "activate ../x")
    run(node, ["status"], env={})
    assert lines == [
        "client=198.51.100.7 request='status' outcome=ok",
        "client=198.51.100.7 request='activate ../x' outcome=refused:refused",
        "client=local request='status' outcome=ok",
    ]


def test_an_unexpected_failure_is_a_json_answer_with_its_own_exit_code(node, monkeypatch):
    def broken(paths):
        raise OSError("disk on fire")

    monkeypatch.setattr(protocol.store, "releases_status", broken)
    code, answer = remote(node, "status")
    assert code == ExitCode.INTERNAL
    assert answer == {"ok": False, "error": "internal", "message": "OSError: disk on fire"}


def test_help_and_refusals_come_from_the_verb_table():
    remote_usage, local_usage = protocol.usage(), protocol.usage(local=True)
    for name, verb in protocol.VERBS.items():
        assert (verb.usage(name) in remote_usage) is not verb.local_only, name
        assert verb.usage(name) in local_usage
    assert protocol.VERBS["begin"].usage("begin") == "begin ID < input"
    assert protocol.VERBS["prune"].usage("prune") == "prune [N]"


def test_a_deploy_lease_turns_a_second_deployer_away_until_it_ends(node, monkeypatch):
    first, second = "a" * 32, "b" * 32
    assert remote(node, f"lease={first} lease 60")[0] == ExitCode.OK
    code, answer = remote(node, "rollback")
    assert code == ExitCode.BUSY and "another deploy (from 198.51.100.7" in answer["message"]
    assert remote(node, f"lease={second} lease 60")[0] == ExitCode.BUSY, "a lease cannot be taken over"
    assert remote(node, "status")[0] == ExitCode.OK, "reading never waits for a lease"
    assert remote(node, f"lease={first} rollback")[1]["error"] == "missing", "the holder goes on"
    real_time = time.time
    monkeypatch.setattr(protocol.time, "time", lambda: real_time() + 61)
    assert remote(node, f"lease={second} lease 60")[0] == ExitCode.OK, "a lease always expires"
    monkeypatch.undo()
    assert remote(node, f"lease={second} unlease")[0] == ExitCode.OK
    assert remote(node, "rollback")[1]["error"] == "missing", "no lease, no waiting"


def test_only_the_holder_ends_a_lease(node):
    holder, other = "a" * 32, "b" * 32
    assert remote(node, f"lease={holder} lease 60")[0] == ExitCode.OK
    assert remote(node, f"lease={other} unlease")[0] == ExitCode.BUSY
    assert remote(node, "unlease")[0] == ExitCode.BUSY
    assert remote(node, "rollback")[0] == ExitCode.BUSY, "the lease still holds"
    assert remote(node, f"lease={holder} unlease")[0] == ExitCode.OK


def test_renewing_a_lease_cannot_hold_a_node_forever(node, monkeypatch):
    holder, other = "d" * 32, "e" * 32
    real_time = time.time
    for minutes in range(0, 50, 5):  # a renewal every five minutes keeps it for the hour
        monkeypatch.setattr(protocol.time, "time", lambda m=minutes: real_time() + 60 * m)
        assert remote(node, f"lease={holder} lease 600")[0] == ExitCode.OK
    monkeypatch.setattr(protocol.time, "time", lambda: real_time() + 3200)
    code, answer = remote(node, f"lease={holder} lease 600")
    assert code == ExitCode.BUSY and "may not run past 3600 s" in answer["message"]
    monkeypatch.setattr(protocol.time, "time", lambda: real_time() + 3301)
    assert remote(node, f"lease={other} lease 60")[0] == ExitCode.OK, "then another deploy gets the node"
    monkeypatch.undo()


def test_a_lease_needs_a_token_and_a_bounded_length(node):
    assert "needs a token" in remote(node, "lease 60")[1]["message"]
    assert "at most 900" in remote(node, f"lease={'c' * 32} lease 901")[1]["message"]


def _release(files: dict[str, bytes]) -> tuple[str, bytes]:
    import hashlib

    from edgecdn.contract import release_id_of

    entries = [
        {"path": p, "size": len(d), "sha256": hashlib.sha256(d).hexdigest(), "derived": p.endswith(".br")}
        for p, d in files.items()
    ]
    return release_id_of(entries), json.dumps({"files": entries}).encode()


def _stage_and_finalize(node: Path, files: dict[str, bytes]) -> tuple[int, dict]:
    release, manifest = _release(files)
    code, answer = remote(node, f"begin {release}", stdin=manifest)
    assert code == ExitCode.OK, answer
    staging = Path(json.loads(node.read_text())["root"]) / "staging" / release
    for path in answer["needed"]:
        (staging / path).parent.mkdir(parents=True, exist_ok=True)
        (staging / path).write_bytes(files[path])
    return remote(node, f"finalize {release}")


@pytest.mark.skipif(shutil.which("caddy") is None, reason="finalize validates the site config with caddy")
def test_a_sibling_pair_proved_once_is_not_decompressed_again_and_a_new_one_is(node, monkeypatch):
    import brotli

    from edgecdn.node.agent import store

    page = b"<!doctype html><p>" + b"same page " * 200
    first = {"index.html": page, "index.html.br": brotli.compress(page)}
    assert _stage_and_finalize(node, first)[0] == ExitCode.OK
    calls: list[str] = []
    real = store._decompressed_sha256
    monkeypatch.setattr(store, "_decompressed_sha256", lambda p, k, n: calls.append(p.name) or real(p, k, n))
    code, answer = _stage_and_finalize(node, {**first, "other.html": b"<p>new</p>"})
    assert code == ExitCode.OK, answer
    assert calls == [], "the pair was proved at the first finalize"
    forged = {"index.html": page, "index.html.br": brotli.compress(b"<script>evil()</script>"), "x.html": b"x"}
    code, answer = _stage_and_finalize(node, forged)
    assert code == ExitCode.REFUSED and "is not a compression of 'index.html'" in answer["message"]
    assert calls == ["index.html.br"]


@pytest.mark.skipif(shutil.which("caddy") is None, reason="finalize validates the site config with caddy")
def test_files_sent_with_finalize_make_a_release_in_one_exchange(node):
    from edgecdn.contract import pack_inline

    files = {"index.html": b"<h1>inline</h1>", "a/b.css": b"b{}"}
    release, manifest = _release(files)
    token = "f" * 32
    code, answer = remote(node, f"lease={token} lease 60 {release}", stdin=manifest)
    assert code == ExitCode.OK and sorted(answer["upload"]["needed"]) == sorted(files), answer
    code, answer = remote(node, f"lease={token} finalize {release}", stdin=pack_inline(files.items()))
    assert code == ExitCode.OK and answer["finalized"] is True, answer
    assert remote(node, "status")[1]["releases"] == [release], "publishing it is pinned against a lab node"


@pytest.mark.parametrize(
    ("sent", "problem"),
    [
        ([("../escape.html", b"x")], "is not in the manifest"),
        ([("/etc/passwd", b"x")], "is not in the manifest"),
        ([("other.html", b"x")], "is not in the manifest"),
        ([("index.html", b"<h1>one</h1>"), ("index.html", b"<h1>one</h1>")], "was sent twice"),
        ([("index.html", b"<h1>forged</h1>")], "does not match the manifest"),
    ],
)
def test_files_sent_with_finalize_are_held_to_the_manifest(node, sent, problem):
    from edgecdn.contract import pack_inline

    release, manifest = _release({"index.html": b"<h1>one</h1>"})
    assert remote(node, f"begin {release}", stdin=manifest)[0] == ExitCode.OK
    code, answer = remote(node, f"finalize {release}", stdin=pack_inline(sent))
    assert code == ExitCode.REFUSED and problem in answer["message"], answer
    root = Path(json.loads(node.read_text())["root"])
    assert not (root / "escape.html").exists() and not (root / "releases" / release).exists()


@pytest.mark.parametrize(
    "data",
    [b"12 index.html\nshort", b"x index.html\n", b"5 \n12345", b"99999999999 index.html\n", b"4 \xff\xfe\nabcd", b"\n"],
)
def test_malformed_files_sent_with_finalize_get_a_refusal(node, data):
    release, manifest = _release({"index.html": b"<h1>one</h1>"})
    assert remote(node, f"begin {release}", stdin=manifest)[0] == ExitCode.OK
    code, answer = remote(node, f"finalize {release}", stdin=data)
    assert code == ExitCode.REFUSED and ("malformed" in answer["message"] or "cut short" in answer["message"]), answer
