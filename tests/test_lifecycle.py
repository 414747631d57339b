"""Day-2 changes under Pulumi mocks: the order and options that keep every region serving.

Mocks accept any order, so these tests pin the dependencies and resource options that the
provider's delete semantics and Pulumi's replacement order require (see edgecdn/edge_node.py):
  - a new or replaced instance is seeded through its own address before the static address
    and its DNS records move to it;
  - deletes that act by name (Lightsail's static IP detach, its port close, EC2's
    disassociation, the ACME account deactivation) are retained, never run;
  - a removed node leaves DNS and drains before its instance is deleted.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from pulumi_harness import Run, run_main
from test_program import CONFIG
from test_render import unpack

from edgecdn.edge_node import DRAIN_SECONDS, node_user_data
from edgecdn.latency_dns import TTL
from edgecdn.node.bootstrap import BUNDLE_DIGEST_FILE, USER_DATA_BUDGET, USER_DATA_LIMIT
from edgecdn.node.files import NodeLayout, bundle_digest, render_bundle
from site_sync.handoff import parse_handoff


@pytest.fixture(scope="module")
def run() -> Run:
    return run_main(CONFIG)


def node_resources(run: Run, node: str, typ: str) -> list:
    return [r for r in run.of_type(typ) if "EdgeNode$" in r.urn and r.name.startswith(f"{node}-")]


def the(run: Run, node: str, typ: str):
    (resource,) = node_resources(run, node, typ)
    return resource


LIGHTSAIL_NODES = ("eu-central-1", "us-east-1")
SEED = "command:local:Command"


def seed_of(run: Run, node: str):
    return run.named(f"{node}-seed")


def drain_of(run: Run, node: str):
    return run.named(f"{node}-drain")


@pytest.mark.parametrize("node", LIGHTSAIL_NODES)
def test_lightsail_deletes_that_act_by_name_are_retained(run: Run, node: str):
    attachment = the(run, node, "aws:lightsail/staticIpAttachment:StaticIpAttachment")
    firewall = the(run, node, "aws:lightsail/instancePublicPorts:InstancePublicPorts")
    assert attachment.options["retain_on_delete"], f"{attachment.urn}: its delete detaches the moved IP"
    assert firewall.options["retain_on_delete"], f"{firewall.urn}: its delete closes the new rules"
    assert not attachment.options["delete_before_replace"], "the IP must move, not be dropped and re-attached"


def test_a_new_ec2_size_replaces_the_instance_instead_of_stopping_it(run: Run):
    (instance,) = run.of_type("aws:ec2/instance:Instance")
    assert instance.options["replace_on_changes"] == ["instanceType"], instance.urn
    assert instance.options["ignore_changes"] == ["ami"], "a newer image must not replace a running node"


def test_ec2_address_moves_in_one_call_and_is_never_disassociated(run: Run):
    association = the(run, "sao-paulo", "aws:ec2/eipAssociation:EipAssociation")
    assert association.state["allowReassociation"] is True, association.urn
    assert association.options["retain_on_delete"], association.urn


@pytest.mark.parametrize(
    ("node", "move_type"),
    [
        ("eu-central-1", "aws:lightsail/staticIpAttachment:StaticIpAttachment"),
        ("sao-paulo", "aws:ec2/eipAssociation:EipAssociation"),
    ],
)
def test_the_static_address_moves_only_after_the_new_instance_is_seeded(run: Run, node: str, move_type: str):
    move = the(run, node, move_type)
    seed = seed_of(run, node)
    instance = next(r for r in run.resources if r.name == f"{node}-instance")
    assert run.waits_for(move, seed), f"{move.urn} must wait for {seed.urn}"
    assert run.waits_for(seed, instance), seed.urn
    firewall = next(r for r in run.resources if r.name == f"{node}-firewall")
    assert run.waits_for(seed, firewall), "the seed reaches SSH only once the firewall allows it"


def test_a_seed_runs_again_only_for_a_new_instance(run: Run):
    for node in (*LIGHTSAIL_NODES, "sao-paulo"):
        seed = seed_of(run, node)
        assert seed.state["triggers"] == [f"{node}-instance-id"], seed.urn
        assert seed.state["create"].endswith("-m site_sync seed --handoff -"), seed.urn
        assert seed.secret_inputs == {"stdin"}, seed.urn


def test_a_seed_reaches_the_instance_at_its_own_address_with_its_pinned_bundle(run: Run):
    for node in (*LIGHTSAIL_NODES, "sao-paulo"):
        instance = next(r for r in run.resources if r.name == f"{node}-instance")
        (target,) = parse_handoff(seed_of(run, node).state["stdin"]).nodes
        temporary = instance.state.get("publicIpAddress") or instance.state.get("publicIp")
        assert target.address == temporary and temporary.startswith("198.51.100."), instance.urn
        user_data = instance.state.get("userData") or _gunzip(instance.state["userDataBase64"])
        assert target.bundle is not None
        pinned = unpack(user_data)[BUNDLE_DIGEST_FILE][0].strip()
        assert hashlib.sha256(target.bundle).hexdigest() == pinned, "user data pins the bundle the seed sends"


def _gunzip(text: str) -> str:
    return gzip.decompress(base64.b64decode(text)).decode()


@pytest.mark.parametrize("node", (*LIGHTSAIL_NODES, "sao-paulo"))
def test_dns_records_point_at_a_node_only_after_it_serves_at_that_address(run: Run, node: str):
    region = {"sao-paulo": "sa-east-1"}.get(node, node)
    records = [
        r
        for r in run.of_type("aws:route53/record:Record")
        if r.state.get("latencyRoutingPolicies", [{}])[0].get("region") == region
    ]
    assert records
    seed = seed_of(run, node)
    for record in records:
        assert run.waits_for(record, drain_of(run, node)), record.urn
        assert run.waits_for(record, seed), record.urn


def test_the_global_push_runs_once_every_node_holds_its_address(run: Run):
    push = run.named("site-deploy")
    for node in (*LIGHTSAIL_NODES, "sao-paulo"):
        assert run.waits_for(push, drain_of(run, node)), node


@pytest.mark.parametrize("node", (*LIGHTSAIL_NODES, "sao-paulo"))
def test_a_removed_node_leaves_dns_and_drains_before_its_instance_dies(run: Run, node: str):
    drain = drain_of(run, node)
    instance = next(r for r in run.resources if r.name == f"{node}-instance")
    assert drain.state["delete"] == f"sleep {DRAIN_SECONDS}" and DRAIN_SECONDS >= TTL, drain.urn
    # Deleted in reverse order: records first, then the drain (sleeping), then the instance.
    assert run.waits_for(drain, instance), drain.urn
    # Replaced together with the instance, so a replaced node's old IPv6 address drains too.
    assert drain.state["triggers"] == [f"{node}-instance-id"], drain.urn
    assert "create" not in drain.state, "the marker does nothing until it is deleted"


@pytest.mark.parametrize(
    ("node", "address_type"),
    [("eu-central-1", "aws:lightsail/staticIp:StaticIp"), ("sao-paulo", "aws:ec2/eip:Eip")],
)
def test_an_instance_is_deleted_before_its_static_address_is_released(run: Run, node: str, address_type: str):
    instance = next(r for r in run.resources if r.name == f"{node}-instance")
    address = the(run, node, address_type)
    assert run.waits_for(instance, address), f"{instance.urn} must depend on {address.urn}"


def test_a_changed_email_never_deactivates_the_acme_account(run: Run):
    (registration,) = run.of_type("acme:index/registration:Registration")
    assert registration.options["retain_on_delete"], registration.urn


def test_a_fixed_renewal_threshold_replaces_the_dynamic_one():
    fixed = run_main({**CONFIG, "certMinDaysRemaining": 14})
    (cert,) = fixed.of_type("acme:index/certificate:Certificate")
    assert cert.state["minDaysRemaining"] == 14 and "minDaysDynamic" not in cert.state, cert.urn


def test_a_dual_stack_node_has_an_ipv6_health_check_and_alarm(run: Run):
    checks = {c.name: c for c in run.of_type("aws:route53/healthCheck:HealthCheck")}
    for node in LIGHTSAIL_NODES:
        v6 = checks[f"dns-{node}-ipv6-health"]
        assert ":" in v6.state["ipAddress"], v6.urn
        aaaa = [
            r
            for r in run.of_type("aws:route53/record:Record")
            if r.state["type"] == "AAAA" and r.state["latencyRoutingPolicies"][0]["region"] == node
        ]
        assert aaaa and all(r.state["healthCheckId"] == f"dns-{node}-ipv6-health-id" for r in aaaa)
    alarms = {a.name for a in run.of_type("aws:cloudwatch/metricAlarm:MetricAlarm")}
    assert {f"monitoring-{n}-ipv6-unhealthy" for n in LIGHTSAIL_NODES} <= alarms


# ---------------------------------------------------------------- user data size, with real-size keys


def _keys(tmp_path: Path, kind: str, count: int) -> list[tuple[str, str]]:
    pairs = []
    for i in range(count):
        path = tmp_path / f"{kind}{i}"
        bits = ["-b", "4096"] if kind == "rsa" else []
        subprocess.run(["ssh-keygen", "-q", "-t", kind, *bits, "-N", "", "-C", f"ops{i}@example.com", "-f", str(path)])
        pairs.append((path.read_text(), Path(f"{path}.pub").read_text().strip()))
    return pairs


def test_user_data_stays_within_half_the_limit_with_three_rsa_4096_admin_keys(tmp_path: Path):
    (host,) = _keys(tmp_path, "ed25519", 1)
    admins = tuple(public for _, public in _keys(tmp_path, "rsa", 3))
    layout = NodeLayout(node_name="ap-southeast-1", domain="example.com", aliases=("www.example.com",))
    keys = {"deploy_public": host[1], "host_private": host[0], "host_public": host[1]}
    script = node_user_data(layout, admins, bundle_digest(render_bundle(layout)), "amd64", keys)
    size = len(script.encode())
    assert size <= USER_DATA_BUDGET, f"{size} bytes of user data; the budget is {USER_DATA_BUDGET}"


def test_too_many_admin_keys_are_refused_before_any_resource_with_the_cause(tmp_path: Path):
    # Key bodies as long and as incompressible as RSA-4096 ones (sshd never sees these).
    blob = b"\x00\x00\x00\x07ssh-rsa\x00\x00\x00\x03\x01\x00\x01\x00\x00\x02\x01"
    admins = [f"ssh-rsa {base64.b64encode(blob + os.urandom(512)).decode()} ops{i}@example.com" for i in range(20)]
    run = run_main({**CONFIG, "adminSshKeys": admins}, allow_error=True)
    assert run.error is not None and run.resources == [r for r in run.resources if r.type == "pulumi:pulumi:Stack"]
    message = str(run.error)
    assert "edgecdn:adminSshKeys" in message and f"over the {USER_DATA_LIMIT} bytes" in message
    assert "Pulumi.test.yaml" in message
