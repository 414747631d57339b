"""The whole program and each component under Pulumi mocks: what `pulumi up` would create."""

from __future__ import annotations

import json

import pytest
from pulumi_harness import (
    FAKE_PRIVATE_OPENSSH,
    FAKE_PRIVATE_PEM,
    PROJECT_DIR,
    Run,
    fake_ssh_public_key,
    run_main,
    run_pulumi,
    secret_paths,
    unwrap_secrets,
)

from edgecdn.config import NodeSpec
from edgecdn.edge_node import EdgeNode, EdgeNodeArgs
from edgecdn.latency_dns import LatencyDNS, LatencyDNSArgs, LatencyTarget
from edgecdn.monitoring import Monitoring, MonitoringArgs
from edgecdn.site_push import DEPLOYER_PYTHON, PushArgs
from site_sync.handoff import parse_handoff
from site_sync.release import release_id_of

CONFIG = {
    "domain": "example.com",
    "aliases": ["www.example.com"],
    "hostedZoneId": "Z0123456789ABCDEFGHIJ",
    "siteDir": "example-site",
    "nodes": [
        {"region": "eu-central-1"},
        {"region": "us-east-1"},
        {"region": "sa-east-1", "backend": "ec2", "name": "sao-paulo"},
    ],
    "sshAllowedCidrs": ["203.0.113.7/32", "2001:db8:1::/48"],
    "acmeEmail": "ops@example.com",
    "alertEmail": "alerts@example.com",
}
SECRET_MARKERS = ("FAKE-", "PRIVATE KEY")
PUSH = PushArgs(
    domain="example.com",
    release_id="0123456789abcdef0123",
    site_dir="site",
    deploy_private_key=FAKE_PRIVATE_OPENSSH.format(seed="deploy"),
    certificate_chain="-----BEGIN CERTIFICATE-----\nLEAF\n-----END CERTIFICATE-----\n",
    certificate_key=FAKE_PRIVATE_PEM.format(seed="tls"),
)


@pytest.fixture(scope="module")
def run() -> Run:
    return run_main(CONFIG)


def test_one_edge_node_per_configured_node_in_its_region(run: Run):
    nodes = run.of_type("edgecdn:index:EdgeNode")
    assert sorted(n.name for n in nodes) == ["eu-central-1", "sao-paulo", "us-east-1"]
    lightsail = run.of_type("aws:lightsail/instance:Instance")
    assert sorted(i.state["region"] for i in lightsail) == ["eu-central-1", "us-east-1"]
    for instance in lightsail:
        assert instance.state["blueprintId"] == "debian_12", instance.urn
        assert instance.state["bundleId"] == "nano_3_0", instance.urn
        assert instance.state["ipAddressType"] == "dualstack", instance.urn
        assert instance.state["availabilityZone"] == instance.state["region"] + "a", instance.urn
    (ec2,) = run.of_type("aws:ec2/instance:Instance")
    assert ec2.state["region"] == "sa-east-1" and ec2.state["instanceType"] == "t4g.nano", ec2.urn


def test_ec2_node_uses_official_debian_arm64_image_imdsv2_and_encrypted_gp3(run: Run):
    (ami_call,) = [c for c in run.calls if c.token == "aws:ec2/getAmi:getAmi"]
    assert ami_call.args["owners"] == ["136693071363"]
    assert ami_call.args["mostRecent"] is True and ami_call.args["region"] == "sa-east-1"
    assert {"name": "architecture", "values": ["arm64"]} in ami_call.args["filters"]
    (ec2,) = run.of_type("aws:ec2/instance:Instance")
    assert ec2.state["metadataOptions"]["httpTokens"] == "required", ec2.urn
    assert ec2.state["rootBlockDevice"]["encrypted"] is True, ec2.urn
    assert ec2.state["rootBlockDevice"]["volumeType"] == "gp3", ec2.urn
    assert ec2.state["userDataReplaceOnChange"] is True, ec2.urn
    (eip,) = run.of_type("aws:ec2/eip:Eip")
    assert "instance" not in eip.state and eip.state["region"] == "sa-east-1", eip.urn
    (association,) = run.of_type("aws:ec2/eipAssociation:EipAssociation")
    assert association.state["instanceId"] == "sao-paulo-instance-id", association.urn
    assert association.state["allocationId"] == eip.state["allocationId"], association.urn


def test_every_lightsail_node_has_a_static_ip_attached(run: Run):
    ips = run.of_type("aws:lightsail/staticIp:StaticIp")
    attachments = run.of_type("aws:lightsail/staticIpAttachment:StaticIpAttachment")
    assert len(ips) == len(attachments) == 2
    for attachment in attachments:
        assert attachment.state["staticIpName"].endswith("-ip-x"), attachment.urn
        assert attachment.state["instanceName"].endswith("-instance-x"), attachment.urn


def test_ssh_is_closed_to_the_world_and_web_is_open_on_lightsail(run: Run):
    for ports in run.of_type("aws:lightsail/instancePublicPorts:InstancePublicPorts"):
        infos = {(p["protocol"], p["fromPort"]): p for p in ports.state["portInfos"]}
        assert set(infos) == {("tcp", 80), ("tcp", 443), ("udp", 443), ("tcp", 22)}, ports.urn
        for key in [("tcp", 80), ("tcp", 443), ("udp", 443)]:
            assert infos[key]["cidrs"] == ["0.0.0.0/0"] and infos[key]["ipv6Cidrs"] == ["::/0"], ports.urn
        assert infos[("tcp", 22)]["cidrs"] == ["203.0.113.7/32"], ports.urn
        assert infos[("tcp", 22)]["ipv6Cidrs"] == ["2001:db8:1::/48"], ports.urn


def test_ssh_is_closed_to_the_world_and_web_is_open_on_ec2(run: Run):
    (group,) = run.of_type("aws:ec2/securityGroup:SecurityGroup")
    rules = {(r["protocol"], r["fromPort"]): r for r in group.state["ingress"]}
    assert set(rules) == {("tcp", 80), ("tcp", 443), ("udp", 443), ("tcp", 22)}, group.urn
    assert rules[("tcp", 22)]["cidrBlocks"] == ["203.0.113.7/32"], group.urn
    assert rules[("tcp", 22)]["ipv6CidrBlocks"] == ["2001:db8:1::/48"], group.urn
    assert rules[("udp", 443)]["cidrBlocks"] == ["0.0.0.0/0"], group.urn


def test_latency_records_one_per_region_name_and_type_each_with_a_health_check(run: Run):
    records = [r for r in run.of_type("aws:route53/record:Record") if r.state["type"] in ("A", "AAAA")]
    checks = {
        c.urn.split("::")[-1].removesuffix("-health").removeprefix("dns-"): c
        for c in run.of_type("aws:route53/healthCheck:HealthCheck")
    }
    seen = set()
    for record in records:
        (policy,) = record.state["latencyRoutingPolicies"]
        key = (policy["region"], record.state["name"], record.state["type"])
        assert key not in seen, f"two latency records for {key}: {record.urn}"
        seen.add(key)
        assert record.state["ttl"] <= 60, record.urn
        assert record.state["zoneId"] == "Z0123456789ABCDEFGHIJ", record.urn
        assert record.state["healthCheckId"].endswith("-health-id"), record.urn
        assert record.state["setIdentifier"].startswith("edgecdn-"), record.urn
    # Lightsail nodes are dual-stack (A + AAAA); the EC2 node has IPv4 only.
    assert len(records) == 2 * 2 * 2 + 2 * 1
    assert ("sa-east-1", "www.example.com", "AAAA") not in seen
    for record in records:
        family = "-ipv6" if record.state["type"] == "AAAA" else ""
        region = record.state["latencyRoutingPolicies"][0]["region"]
        node = {"sa-east-1": "sao-paulo"}.get(region, region)
        assert record.state["healthCheckId"] == f"dns-{node}{family}-health-id", record.urn
    ids_by_name_type: dict = {}
    for record in records:
        ids_by_name_type.setdefault((record.state["name"], record.state["type"]), []).append(
            record.state["setIdentifier"]
        )
    for key, ids in ids_by_name_type.items():
        assert len(ids) == len(set(ids)), f"set identifiers repeat for {key}"
    assert set(checks) == {"eu-central-1", "eu-central-1-ipv6", "us-east-1", "us-east-1-ipv6", "sao-paulo"}


def test_health_checks_fetch_the_marker_over_https_with_sni(run: Run):
    for check in run.of_type("aws:route53/healthCheck:HealthCheck"):
        s = check.state
        assert s["type"] == "HTTPS_STR_MATCH", check.urn
        assert s["fqdn"] == "example.com" and s["enableSni"] is True, check.urn
        assert s["resourcePath"] == "/.well-known/edgecdn/health", check.urn
        assert s["searchString"] == "edgecdn-ok", check.urn
        assert (s["requestInterval"], s["failureThreshold"], s["measureLatency"]) == (30, 3, True), check.urn
        assert s["port"] == 443 and s["ipAddress"], check.urn


def test_caa_is_opt_in_and_then_allows_only_the_configured_ca(run: Run):
    assert [r for r in run.of_type("aws:route53/record:Record") if r.state["type"] == "CAA"] == []
    with_caa = run_main({**CONFIG, "manageCaa": True})
    (caa,) = [r for r in with_caa.of_type("aws:route53/record:Record") if r.state["type"] == "CAA"]
    assert caa.state["records"] == ['0 issue "letsencrypt.org"', '0 issuewild ";"'], caa.urn
    (cert,) = with_caa.of_type("acme:index/certificate:Certificate")
    assert with_caa.waits_for(cert, caa), "the CAA record must exist before the order"


def test_one_certificate_for_all_names_by_dns01_through_route53(run: Run):
    (cert,) = run.of_type("acme:index/certificate:Certificate")
    assert cert.state["commonName"] == "example.com", cert.urn
    assert cert.state["subjectAlternativeNames"] == ["www.example.com"], cert.urn
    assert cert.state["minDaysDynamic"] is True and "minDaysRemaining" not in cert.state, cert.urn
    (challenge,) = cert.state["dnsChallenges"]
    assert challenge["provider"] == "route53" and challenge["config"]["AWS_HOSTED_ZONE_ID"] == "Z0123456789ABCDEFGHIJ"
    (provider,) = run.of_type("pulumi:providers:acme")
    assert provider.state["serverUrl"] == "https://acme-v02.api.letsencrypt.org/directory"


def test_alarms_live_in_us_east_1_and_notify_on_failure_and_recovery(run: Run):
    alarms = run.of_type("aws:cloudwatch/metricAlarm:MetricAlarm")
    assert len(alarms) == 5, "one per health check: IPv4 for every node, IPv6 for the dual-stack ones"
    (topic,) = run.of_type("aws:sns/topic:Topic")
    assert topic.state["region"] == "us-east-1"
    for alarm in alarms:
        s = alarm.state
        assert s["region"] == "us-east-1", alarm.urn
        assert (s["namespace"], s["metricName"]) == ("AWS/Route53", "HealthCheckStatus"), alarm.urn
        assert s["dimensions"]["HealthCheckId"].endswith("-health-id"), alarm.urn
        assert s["alarmActions"] == s["okActions"] == [topic.state["arn"]], alarm.urn
    (subscription,) = run.of_type("aws:sns/topicSubscription:TopicSubscription")
    assert subscription.state["protocol"] == "email" and subscription.state["endpoint"] == "alerts@example.com"


def test_no_email_subscription_without_alert_email():
    run = run_main({k: v for k, v in CONFIG.items() if k != "alertEmail"})
    assert run.of_type("aws:sns/topicSubscription:TopicSubscription") == []
    assert len(run.of_type("aws:cloudwatch/metricAlarm:MetricAlarm")) == 5


def pushes(run: Run) -> list:
    return [c for c in run.of_type("command:local:Command") if "stdin" in c.state]


def test_deploy_commands_get_secrets_only_on_stdin(run: Run):
    for command in pushes(run):
        assert command.secret_inputs == {"stdin"}, command.urn
        argv_and_env = json.dumps(
            [command.state["create"], command.state.get("environment"), command.state["triggers"]]
        )
        for marker in SECRET_MARKERS:
            assert marker not in argv_and_env, command.urn
    push = run.named("site-deploy")
    assert push.state["logging"] == "stdoutAndStderr" and push.state["addPreviousOutputInEnv"] is False, push.urn
    handoff = parse_handoff(push.state["stdin"])
    assert handoff.release_id == release_id_of(PROJECT_DIR / "example-site")
    assert handoff.deploy_key == FAKE_PRIVATE_OPENSSH.format(seed="deploy-key")
    assert handoff.certificate_key == FAKE_PRIVATE_PEM.format(seed="tls-key")
    assert [(n.name, n.port, n.user) for n in handoff.nodes] == [
        ("eu-central-1", 22, "edgecdn"),
        ("us-east-1", 22, "edgecdn"),
        ("sao-paulo", 22, "edgecdn"),
    ]
    assert handoff.nodes[0].host_key == fake_ssh_public_key("eu-central-1-host-key").strip()


def test_the_deploy_command_is_the_same_on_every_machine(run: Run):
    """CI after a laptop must not re-run an unchanged deploy: nothing machine- or checkout-specific."""
    for command in pushes(run):
        assert command.state["create"] == f"venv/bin/python -m site_sync {command.name.rsplit('-', 1)[1]} --handoff -"
        assert "dir" not in command.state, "the project directory, wherever it is checked out"
        assert parse_handoff(command.state["stdin"]).site_dir == "example-site", command.urn
    virtualenv = yaml_value((PROJECT_DIR / "Pulumi.yaml").read_text(), "virtualenv")
    assert f"{virtualenv}/bin/python" == DEPLOYER_PYTHON, "the command runs the Python of Pulumi.yaml's virtualenv"


def yaml_value(text: str, key: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.strip().startswith(f"{key}:"))


def test_deploy_reruns_when_release_certificate_or_nodes_change(run: Run):
    push = run.named("site-deploy")
    release, chain, identities = push.state["triggers"]
    assert release == release_id_of(PROJECT_DIR / "example-site")
    assert "BEGIN CERTIFICATE" in chain and "PRIVATE" not in chain
    assert [i[0] for i in identities] == ["eu-central-1", "us-east-1", "sao-paulo"]
    assert all(i[3].endswith("-instance-id") for i in identities), "instance ids trigger a redeploy"


def test_user_data_with_the_host_key_is_secret(run: Run):
    for instance in run.of_type("aws:lightsail/instance:Instance"):
        assert instance.secret_inputs == {"userData"}, instance.urn
    (ec2,) = run.of_type("aws:ec2/instance:Instance")
    assert ec2.secret_inputs == {"userDataBase64"}, ec2.urn


def test_stack_outputs_hold_no_secret_in_clear(run: Run):
    secret = secret_paths(run.stack_outputs)
    assert secret == {"handoff"}, "the handoff (it holds the deploy key) is the one secret output"
    text = json.dumps({k: v for k, v in run.stack_outputs.items() if k not in secret})
    for marker in SECRET_MARKERS:
        assert marker not in text
    handoff = parse_handoff(unwrap_secrets(run.stack_outputs["handoff"]))
    assert handoff == parse_handoff(run.named("site-deploy").state["stdin"]), "status and rollback reach the same nodes"
    out = run.stack_outputs
    assert out["url"] == "https://example.com/"
    assert out["releaseId"] == release_id_of(PROJECT_DIR / "example-site")
    assert [n["name"] for n in out["nodes"]] == ["eu-central-1", "us-east-1", "sao-paulo"]
    assert out["nodes"][2]["ipv6"] is None and out["nodes"][0]["ipv6"].startswith("2001:db8::")
    assert set(out["healthCheckIds"]) == {
        "eu-central-1",
        "eu-central-1-ipv6",
        "us-east-1",
        "us-east-1-ipv6",
        "sao-paulo",
    }
    assert all(line.split(" ", 1)[1].startswith("ssh-ed25519 ") for line in out["knownHosts"])
    cost = out["estimatedMonthlyCost"]
    assert cost["totalUsd"] == round(sum(i["usd"] for i in cost["items"]), 2)
    assert cost["excludes"]


def test_edge_node_alone_exposes_its_addresses_and_host_key():
    captured = {}

    def program():
        node = EdgeNode(
            "solo",
            EdgeNodeArgs(
                spec=NodeSpec(name="solo", region="eu-west-2"),
                domain="example.com",
                deploy_public_key=fake_ssh_public_key("deploy"),
                ssh_allowed_cidrs=("198.51.100.0/24",),
                push=PUSH,
            ),
        )
        node.ipv4.apply(lambda v: captured.setdefault("ipv4", v))
        node.ipv6.apply(lambda v: captured.setdefault("ipv6", v))
        node.host_public_key.apply(lambda v: captured.setdefault("host", v))

    run = run_pulumi(program)
    assert captured["ipv4"].startswith("203.0.113.") and captured["ipv6"].startswith("2001:db8::")
    assert captured["host"] == fake_ssh_public_key("solo-host-key").strip()
    (instance,) = run.of_type("aws:lightsail/instance:Instance")
    assert instance.urn.endswith("edgecdn:index:EdgeNode$aws:lightsail/instance:Instance::solo-instance")
    script = instance.state["userData"]
    assert script.startswith("#!/bin/sh") and "node solo" in script
    (ports,) = run.of_type("aws:lightsail/instancePublicPorts:InstancePublicPorts")
    ssh = next(p for p in ports.state["portInfos"] if p["fromPort"] == 22)
    assert ssh["cidrs"] == ["198.51.100.0/24"], ports.urn
    assert ssh["ipv6Cidrs"] == ["100::/64"], "no IPv6 block allowed is said explicitly (discard-only prefix)"


def test_latency_dns_alone_skips_aaaa_without_ipv6():
    def program():
        LatencyDNS(
            "dns",
            LatencyDNSArgs(
                zone_id="Z1",
                domain="example.com",
                targets=(
                    LatencyTarget("a", "eu-west-1", "192.0.2.1", "2001:db8::1"),
                    LatencyTarget("b", "us-west-2", "192.0.2.2"),
                ),
            ),
        )

    run = run_pulumi(program)
    types = sorted((r.state["setIdentifier"], r.state["type"]) for r in run.of_type("aws:route53/record:Record"))
    assert types == [("edgecdn-a-eu-west-1", "A"), ("edgecdn-a-eu-west-1", "AAAA"), ("edgecdn-b-us-west-2", "A")]
    checks = {c.state["ipAddress"] for c in run.of_type("aws:route53/healthCheck:HealthCheck")}
    assert checks == {"192.0.2.1", "2001:db8::1", "192.0.2.2"}, "each address family has its own check"


def test_monitoring_alone_makes_one_alarm_per_check():
    run = run_pulumi(
        lambda: Monitoring("mon", MonitoringArgs(domain="example.com", health_check_ids={"a": "hc-1", "b": "hc-2"}))
    )
    alarms = run.of_type("aws:cloudwatch/metricAlarm:MetricAlarm")
    assert sorted(a.state["dimensions"]["HealthCheckId"] for a in alarms) == ["hc-1", "hc-2"]
    assert all(a.state["treatMissingData"] == "breaching" for a in alarms)
