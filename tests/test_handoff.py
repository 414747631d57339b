"""The handoff document: built by the program, validated by the deployer, secrets never echoed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pulumi_harness import PROJECT_DIR, fake_ssh_public_key

from site_sync.handoff import SCHEMA, HandoffError, NodeTarget, build_handoff, parse_handoff

DEPLOY_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nSECRET-DEPLOY-KEY\n-----END OPENSSH PRIVATE KEY-----\n"
TLS_KEY = "-----BEGIN PRIVATE KEY-----\nSECRET-TLS-KEY\n-----END PRIVATE KEY-----\n"


NODE = NodeTarget(
    name="eu",
    region="eu-central-1",
    address="203.0.113.1",
    port=22,
    user="edgecdn",
    host_key=fake_ssh_public_key("eu").strip(),
    bundle=b"\x1f\x8b any bytes",
)


def document(**changes) -> str:
    doc = json.loads(
        build_handoff(
            domain="example.com",
            aliases=["www.example.com"],
            release_id="0123456789abcdef0123",
            site_dir="/srv/site",
            deploy_key=DEPLOY_KEY,
            certificate_chain="-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----\n",
            certificate_key=TLS_KEY,
            nodes=[NODE],
        )
    )
    doc.update(changes)
    return json.dumps(doc)


def test_a_built_document_parses_back():
    handoff = parse_handoff(document())
    assert handoff.domain == "example.com" and handoff.aliases == ("www.example.com",)
    assert handoff.nodes == (NODE,), "the reader returns exactly the nodes the writer took"
    assert handoff.deploy_key == DEPLOY_KEY and handoff.certificate_key == TLS_KEY
    assert "SECRET" not in repr(handoff)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"schema": "edgecdn.handoff/v0"}, "schema: expected 'edgecdn.handoff/v2'"),
        ({"release_id": "../../etc"}, "release_id: missing or malformed"),
        ({"nodes": []}, "nodes: expected a non-empty list"),
        (
            {"nodes": [{"name": "eu", "address": "not-an-ip", "port": 22, "user": "edgecdn", "host_key": "x"}]},
            "nodes[0].address",
        ),
        (
            {
                "nodes": [
                    {
                        "name": "eu",
                        "address": "203.0.113.1",
                        "port": 0,
                        "user": "edgecdn",
                        "host_key": fake_ssh_public_key("eu"),
                    }
                ]
            },
            "nodes[0].port",
        ),
        (
            {
                "nodes": [
                    {"name": "eu", "address": "203.0.113.1", "port": 22, "user": "edgecdn", "host_key": "ssh-rsa AAAA"}
                ]
            },
            "nodes[0].host_key",
        ),
        ({"deploy_key": "SECRET-not-a-key"}, "deploy_key: not an OpenSSH private key"),
        (
            {"certificate": {"chain_pem": "SECRET-chain", "key_pem": "SECRET-key"}},
            "certificate.key_pem: not a PEM private key",
        ),
    ],
)
def test_bad_documents_name_the_field_and_never_the_secret(change, expected):
    with pytest.raises(HandoffError) as info:
        parse_handoff(document(**change))
    assert expected in str(info.value)
    assert "SECRET" not in str(info.value)


def test_not_json_is_refused():
    with pytest.raises(HandoffError, match="not JSON"):
        parse_handoff("{nope")


def test_cli_check_reads_stdin_and_reports_without_secrets():
    ok = subprocess.run(
        [sys.executable, "-m", "site_sync", "check", "--handoff", "-"],
        input=document(),
        capture_output=True,
        text=True,
        cwd=PROJECT_DIR,
    )
    assert ok.returncode == 0, ok.stderr
    assert "1 node" in ok.stdout and "SECRET" not in ok.stdout + ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "site_sync", "check", "--handoff", "-"],
        input=document(schema=SCHEMA + "x"),
        capture_output=True,
        text=True,
        cwd=PROJECT_DIR,
    )
    assert bad.returncode == 2 and "schema" in bad.stderr and "SECRET" not in bad.stderr


def test_following_external_symlinks_travels_only_when_the_stack_asks_for_it():
    assert parse_handoff(document()).follow_external_symlinks is False
    doc = json.loads(document())
    doc["follow_external_symlinks"] = True
    assert parse_handoff(json.dumps(doc)).follow_external_symlinks is True
    doc["follow_external_symlinks"] = "yes"
    assert parse_handoff(json.dumps(doc)).follow_external_symlinks is False, "only a JSON true turns it on"
