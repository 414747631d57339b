"""The policy pack: each policy passes edgecdn's own resources and fails the resources it exists to stop."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import pytest
from pulumi_harness import run_main
from test_program import CONFIG

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "policy"))
import edgecdn_policies as policies

SG = "aws:ec2/securityGroup:SecurityGroup"
PORTS = "aws:lightsail/instancePublicPorts:InstancePublicPorts"
EC2 = "aws:ec2/instance:Instance"
LIGHTSAIL = "aws:lightsail/instance:Instance"
RECORD = "aws:route53/record:Record"
COMMAND = "command:local:Command"
GOOD_EC2 = {
    "metadataOptions": {"httpTokens": "required"},
    "rootBlockDevice": {"encrypted": True},
    "userDataBase64": base64.b64encode(b"#!/bin/sh\n").decode(),
}


ANY6 = ["::/0"]


def sg(low: int, high: int, **blocks: list[str]) -> dict:
    return {"ingress": [{"fromPort": low, "toPort": high, **blocks}]}


KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"


@pytest.mark.parametrize(
    ("check", "resource_type", "props", "config", "problem"),
    [
        ("ssh_not_from_anywhere", SG, sg(22, 22, cidrBlocks=["0.0.0.0/0"]), {}, "0.0.0.0/0"),
        ("ssh_not_from_anywhere", SG, sg(0, 65535, ipv6CidrBlocks=["::/0"]), {}, "::/0"),
        ("ssh_not_from_anywhere", SG, sg(-1, -1, cidrBlocks=["0.0.0.0/0"]), {}, "port 22"),
        ("ssh_not_from_anywhere", PORTS, {"portInfos": [{"fromPort": 22, "toPort": 22, "ipv6Cidrs": ANY6}]}, {}, "::"),
        ("imdsv2_required", EC2, {**GOOD_EC2, "metadataOptions": {"httpTokens": "optional"}}, {}, "IMDSv2"),
        ("volumes_encrypted", EC2, {**GOOD_EC2, "rootBlockDevice": {}}, {}, "rootBlockDevice.encrypted"),
        ("volumes_encrypted", EC2, {**GOOD_EC2, "ebsBlockDevices": [{"encrypted": False}]}, {}, "ebsBlockDevices[0]"),
        ("latency_records_have_health_checks", RECORD, {"latencyRoutingPolicies": [{}]}, {}, "no healthCheckId"),
        ("private_keys_only_as_secrets", COMMAND, {"create": f"deploy --key '{KEY}'"}, {}, "create carries"),
        ("private_keys_only_as_secrets", COMMAND, {"environment": {"KEY": KEY}}, {}, "environment carries"),
        ("user_data_under_limit", LIGHTSAIL, {"userData": "x" * 16_385}, {}, "16385 bytes"),
        ("user_data_under_limit", EC2, {"userDataBase64": base64.b64encode(b"x" * 20_000).decode()}, {}, "20000 bytes"),
    ],
)  # fmt: skip
def test_each_policy_fails_what_it_exists_to_stop(check, resource_type, props, config, problem):
    problems = getattr(policies, check)(resource_type, props, config)
    assert problems and any(problem in p for p in problems), problems


@pytest.mark.parametrize(
    ("check", "resource_type", "props", "config"),
    [
        ("ssh_not_from_anywhere", SG, sg(22, 22, cidrBlocks=["203.0.113.0/24"]), {}),
        ("ssh_not_from_anywhere", SG, sg(443, 443, cidrBlocks=["0.0.0.0/0"]), {}),
        ("ssh_not_from_anywhere", SG, sg(22, 22, cidrBlocks=["0.0.0.0/0"]), {"allowSshFromAnywhere": True}),
        ("imdsv2_required", EC2, GOOD_EC2, {}),
        ("volumes_encrypted", EC2, GOOD_EC2, {}),
        ("latency_records_have_health_checks", RECORD, {"latencyRoutingPolicies": [{}], "healthCheckId": "hc"}, {}),
        ("private_keys_only_as_secrets", COMMAND, {"create": "deploy --handoff -", "stdin": KEY}, {}),
        ("user_data_under_limit", LIGHTSAIL, {"userData": "x" * 16_384}, {}),
    ],
)  # fmt: skip
def test_each_policy_passes_what_it_allows(check, resource_type, props, config):
    assert getattr(policies, check)(resource_type, props, config) == []


def test_edgecdns_own_stack_passes_every_policy():
    run = run_main(CONFIG)
    problems = [
        f"{name}: {resource.urn}: {problem}"
        for resource in run.resources
        for name, (_, check) in policies.POLICIES.items()
        for problem in check(resource.type, resource.state, {})
    ]
    assert not problems, problems
    assert {r.type for r in run.resources} >= {SG, PORTS, EC2, LIGHTSAIL, RECORD, COMMAND}, "every policy was exercised"


def test_the_pack_registers_every_policy():
    pack = pytest.importorskip("pulumi_policy")
    assert pack is not None
    names = [name for name in policies.POLICIES]
    assert names == [
        "ssh-not-from-anywhere",
        "imdsv2-required",
        "volumes-encrypted",
        "latency-records-have-health-checks",
        "private-keys-only-as-secrets",
        "user-data-under-limit",
    ]
