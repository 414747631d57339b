"""The deploy's plan: what a node needs, decided from its status alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgecdn.contract import StatusError, leaf_fingerprint, parse_status
from site_sync.deploy import normalize_pem, plan_node
from site_sync.handoff import NodeTarget

NODE = NodeTarget("eu", "203.0.113.1", 22, "edgecdn", "ssh-ed25519 AAAA")
NEW, OLD = "a" * 20, "b" * 20
SAME, OTHER = "1" * 64, "2" * 64


def status(releases, active, fingerprint):
    certificate = {"not_after": "2027-01-01T00:00:00+00:00", "names": ["example.com"], "fingerprint": fingerprint}
    return parse_status(
        {
            "ok": True,
            "node": "eu",
            "active": active,
            "intact": True if active else None,
            "previous": None,
            "releases": releases,
            "staged": [],
            "certificate": certificate if fingerprint else None,
        }
    )


@pytest.mark.parametrize(
    ("node_status", "upload", "certificate", "activate"),
    [
        (status([], None, None), True, True, True),
        (status([OLD], OLD, SAME), True, False, True),
        (status([OLD, NEW], OLD, SAME), False, False, True),
        (status([OLD, NEW], NEW, SAME), False, False, False),
        (status([NEW], NEW, OTHER), False, True, False),
    ],
)
def test_a_node_gets_only_the_steps_it_lacks(node_status, upload, certificate, activate):
    plan = plan_node(NODE, node_status, NEW, SAME)
    assert (plan.upload, plan.install_certificate, plan.activate) == (upload, certificate, activate)
    assert plan.was_active == node_status["active"]


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
    from edgecdn.node.agent.store import parse_manifest
    from site_sync.build import build_release

    site = tmp_path / "site"
    (site / "a").mkdir(parents=True)
    (site / "index.html").write_text("<h1>hi</h1>" * 100)
    (site / "a" / "b.css").write_text("b{}")
    release = build_release(site, tmp_path / "build")
    assert any(e.derived for e in release.entries), "compressed siblings must not change the id"
    parse_manifest(release.manifest_json().encode(), release.release_id)  # refuses any other id


@pytest.mark.parametrize(
    ("field", "value"),
    [("active", "not-a-release"), ("releases", "a"), ("intact", "yes"), ("certificate", {"fingerprint": "x"})],
)
def test_a_malformed_status_answer_is_refused_naming_the_field(field, value):
    answer = dict(status([NEW], NEW, SAME))
    answer[field] = value
    with pytest.raises(StatusError, match=field):
        parse_status(answer)


def test_a_certificate_is_identified_by_its_leaf_whatever_the_pem_spelling(tmp_path):
    from lab import make_certificates

    chain = Path(make_certificates(tmp_path)["chain_file"]).read_text()
    other = tmp_path / "other"
    other.mkdir()
    assert leaf_fingerprint(chain) != leaf_fingerprint(Path(make_certificates(other)["chain_file"]).read_text())
    assert leaf_fingerprint(chain) == leaf_fingerprint(chain.replace("\n", "\r\n") + "trailing text\n")
    assert leaf_fingerprint(chain) == leaf_fingerprint(normalize_pem(chain))
