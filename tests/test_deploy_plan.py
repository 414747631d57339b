"""The deploy's plan: what a node needs, decided from its status alone."""

from __future__ import annotations

import pytest

from site_sync.deploy import normalize_pem, plan_node
from site_sync.handoff import NodeTarget

NODE = NodeTarget("eu", "203.0.113.1", 22, "edgecdn", "ssh-ed25519 AAAA")
NEW, OLD = "a" * 20, "b" * 20


@pytest.mark.parametrize(
    ("status", "upload", "certificate", "activate"),
    [
        ({"releases": [], "active": None, "certificate": None}, True, True, True),
        ({"releases": [OLD], "active": OLD, "certificate": {"sha256": "x"}}, True, False, True),
        ({"releases": [OLD, NEW], "active": OLD, "certificate": {"sha256": "x"}}, False, False, True),
        ({"releases": [OLD, NEW], "active": NEW, "certificate": {"sha256": "x"}}, False, False, False),
        ({"releases": [NEW], "active": NEW, "certificate": {"sha256": "old"}}, False, True, False),
    ],
)
def test_a_node_gets_only_the_steps_it_lacks(status, upload, certificate, activate):
    plan = plan_node(NODE, status, NEW, "x")
    assert (plan.upload, plan.install_certificate, plan.activate) == (upload, certificate, activate)
    assert plan.was_active == status["active"]


def test_pem_is_normalized_as_a_node_stores_it():
    messy = (
        "junk\r\n-----BEGIN CERTIFICATE-----\r\nAAAA\r\n-----END CERTIFICATE-----\n\n\n"
        "-----BEGIN CERTIFICATE-----\nBB==\n-----END CERTIFICATE-----"
    )
    assert normalize_pem(messy) == (
        "-----BEGIN CERTIFICATE-----\r\nAAAA\r\n-----END CERTIFICATE-----\n"
        "-----BEGIN CERTIFICATE-----\nBB==\n-----END CERTIFICATE-----\n"
    )


def test_the_agent_and_the_deployer_agree_on_release_ids(tmp_path):
    from edgecdn.agent import release_id_of as agent_release_id
    from site_sync.build import build_release

    site = tmp_path / "site"
    (site / "a").mkdir(parents=True)
    (site / "index.html").write_text("<h1>hi</h1>" * 100)
    (site / "a" / "b.css").write_text("b{}")
    release = build_release(site, tmp_path / "build")
    entries = [e.__dict__ for e in release.entries]
    assert any(e["derived"] for e in entries), "compressed siblings must not change the id"
    assert agent_release_id(entries) == release.release_id
