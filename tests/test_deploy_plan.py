"""The deploy's plan: what a node needs, decided from its status alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgecdn.contract import StatusError, leaf_fingerprint, parse_status
from site_sync.deploy import normalize_pem
from site_sync.handoff import NodeTarget
from site_sync.plan import PlanError, plan_deploy, plan_node, plan_rollback

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
    from site_sync.build import prepare_release
    from site_sync.cache import open_cache
    from site_sync.release import scan_site

    site = tmp_path / "site"
    (site / "a").mkdir(parents=True)
    (site / "index.html").write_text("<h1>hi</h1>" * 100)
    (site / "a" / "b.css").write_text("b{}")
    with open_cache(tmp_path / "cache") as cache:
        release = prepare_release(scan_site(site, cache), cache)
    assert any(e.get("derived") for e in release.entries), "compressed siblings must not change the id"
    parse_manifest(release.manifest(), release.release_id)  # refuses any other id


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


def fleet(*actives_and_releases):
    nodes = tuple(
        NodeTarget(f"n{i}", f"203.0.113.{i + 1}", 22, "edgecdn", "ssh-ed25519 AAAA")
        for i in range(len(actives_and_releases))
    )
    statuses = {}
    for node, (active, releases, previous) in zip(nodes, actives_and_releases, strict=True):
        s = dict(status(releases, active, SAME))
        s["previous"] = previous
        statuses[node.name] = parse_status(s)
    return nodes, statuses


def test_a_seed_leaves_serving_nodes_alone_and_min_nodes_is_checked():
    nodes, statuses = fleet((OLD, [OLD], None), (None, [], None))
    plan = plan_deploy(nodes, statuses, NEW, SAME, seed=True)
    assert [p.node.name for p in plan.nodes] == ["n1"] and plan.skipped == ("n0",)
    assert plan_deploy(nodes, statuses, NEW, SAME).required == 2
    assert plan_deploy(nodes, statuses, NEW, SAME, min_nodes=1).required == 1
    with pytest.raises(PlanError, match="--min-nodes must be between 1 and 2"):
        plan_deploy(nodes, statuses, NEW, SAME, min_nodes=3)


def test_an_unchanged_fleet_plans_no_change():
    nodes, statuses = fleet((NEW, [OLD, NEW], OLD), (NEW, [NEW], None))
    plan = plan_deploy(nodes, statuses, NEW, SAME)
    assert not plan.changes_anything
    assert plan.describe()[1:3] == ["  n0: already holds the release, already serves it"] * 1 + [
        "  n1: already holds the release, already serves it"
    ]


def test_a_rollback_goes_to_the_previous_release_every_node_agrees_on():
    nodes, statuses = fleet((NEW, [OLD, NEW], OLD), (NEW, [OLD, NEW], OLD))
    plan = plan_rollback(nodes, statuses, None)
    assert plan.target == OLD and all(p.activate for p in plan.nodes)


@pytest.mark.parametrize(
    ("fleet_state", "to", "problem"),
    [
        (((NEW, [OLD, NEW], OLD), (OLD, [OLD, NEW], NEW)), None, "do not agree"),
        (((NEW, [NEW], None), (NEW, [NEW], None)), None, "do not agree"),
        (((NEW, [OLD, NEW], OLD), (NEW, [NEW], None)), OLD, f"release {OLD} is not on n1"),
    ],
)
def test_a_rollback_that_would_split_the_fleet_is_refused(fleet_state, to, problem):
    nodes, statuses = fleet(*fleet_state)
    with pytest.raises(PlanError, match=problem):
        plan_rollback(nodes, statuses, to)
