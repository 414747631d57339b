"""The deployer's transport: what goes on the wire, and what is retried."""

from __future__ import annotations

import json
import subprocess

import pytest

from site_sync import transport
from site_sync.handoff import NodeTarget
from site_sync.transport import Agent, AgentRefusedError, Credentials, TransportError, with_retries

NODE = NodeTarget("eu", "203.0.113.1", 22, "edgecdn", "ssh-ed25519 AAAA")


def test_reads_and_a_booting_nodes_bootstrap_agent_get_no_lease_changes_do(monkeypatch, tmp_path):
    sent: list[list[str]] = []

    def fake_run(argv, **kwargs):
        sent.append(argv[argv.index("--") + 1 :])
        return subprocess.CompletedProcess(argv, 0, json.dumps({"ok": True}).encode(), b"")

    monkeypatch.setattr(transport.subprocess, "run", fake_run)
    agent = Agent(NODE, Credentials(tmp_path / "key", tmp_path / "known", tmp_path), lease="a" * 32)
    agent.call("status", leased=False)
    agent.call("activate", "0" * 20)
    assert sent == [["status"], [f"lease={'a' * 32}", "activate", "0" * 20]]
    options = transport.ssh_options(agent.creds, NODE)
    assert "ControlMaster=auto" in options and f"ControlPath={tmp_path}/cm-%C" in options


def test_transport_failures_are_retried_a_bounded_number_of_times_refusals_never(monkeypatch):
    monkeypatch.setattr(transport.time, "sleep", lambda _: None)
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise TransportError("connection reset")
        return "done"

    lines: list[str] = []
    assert with_retries(flaky, "eu: begin", lines.append) == "done" and len(lines) == 2
    attempts.clear()

    def down() -> str:
        attempts.append(1)
        raise TransportError("no route")

    with pytest.raises(TransportError):
        with_retries(down, "eu: begin", lines.append)
    assert len(attempts) == 1 + len(transport.RETRY_DELAYS)
    attempts.clear()

    def refused() -> str:
        attempts.append(1)
        raise AgentRefusedError("eu", "begin", "quota")

    with pytest.raises(AgentRefusedError):
        with_retries(refused, "eu: begin", lines.append)
    assert len(attempts) == 1
