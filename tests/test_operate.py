"""verify and report against stubbed AWS: moto where it implements the calls, botocore's Stubber
with the API's real response shapes where it does not (TestDNSAnswer, health check status,
Lightsail port states). No network."""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from edgecdn import report, verify
from edgecdn.operate import ExitStatus, main, print_table
from edgecdn.verify import FAIL, OK, WARN, StackError, read_stack

OUTPUTS = {
    "domain": "example.com",
    "aliases": ["www.example.com"],
    "hostedZoneId": "Z0123456789ABCDEFGHIJ",
    "sshAllowedCidrs": ["203.0.113.0/24"],
    "nodes": [
        {"name": "frankfurt", "region": "eu-central-1", "backend": "lightsail", "instanceId": "edgecdn-frankfurt",
         "ipv4": "192.0.2.10", "ipv6": "2001:db8::10"},
        {"name": "virginia", "region": "us-east-1", "backend": "ec2", "instanceId": "i-0123456789abcdef0",
         "ipv4": "192.0.2.20", "ipv6": None},
    ],
    "healthCheckIds": {"frankfurt": "hc-f", "frankfurt-ipv6": "hc-f6", "virginia": "hc-v"},
}  # fmt: skip
STACK = read_stack(OUTPUTS)
REGIONS = ("us-east-1", "eu-west-1")


def route53_client() -> boto3.client:
    return boto3.client("route53", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")


def test_missing_outputs_are_named_with_what_to_do():
    with pytest.raises(StackError, match="lack hostedZoneId, healthCheckIds; run `pulumi up`"):
        read_stack({"domain": "example.com", "nodes": []})


def test_dns_routes_each_continent_to_its_nearest_node_or_says_which_it_got():
    client = route53_client()
    europe, america = verify.PROBES[2], verify.PROBES[0]
    with Stubber(client) as stub:
        for name in STACK.names:
            for record, probe, answer in (
                ("A", europe, "192.0.2.10"),
                ("A", america, "192.0.2.10"),  # Route53 sent America to Frankfurt
                ("AAAA", europe, "2001:db8::10"),
                ("AAAA", america, "2001:db8::10"),
            ):
                stub.add_response(
                    "test_dns_answer",
                    {"Nameserver": "ns-1.awsdns-01.org", "RecordName": name, "RecordType": record,
                     "RecordData": [answer], "ResponseCode": "NOERROR", "Protocol": "UDP"},
                    {"HostedZoneId": STACK.zone_id, "RecordName": name, "RecordType": record,
                     "EDNS0ClientSubnetIP": probe.subnet, "EDNS0ClientSubnetMask": "24"},
                )  # fmt: skip
        findings = verify.check_dns(client, STACK, (europe, america))
    levels = {(f.subject, f.level) for f in findings}
    assert ("example.com A from Europe (Deutsche Telekom, DE)", OK) in levels
    assert ("example.com A from North America (Comcast, US)", WARN) in levels
    assert ("www.example.com AAAA from North America (Comcast, US)", OK) in levels, "only Frankfurt has IPv6"
    warn = next(f for f in findings if f.level == WARN)
    assert warn.detail == "frankfurt; nearest is virginia"


def test_a_dns_answer_that_names_no_node_fails():
    client = route53_client()
    with Stubber(client) as stub:
        stub.add_response(
            "test_dns_answer",
            {"Nameserver": "ns", "RecordName": "example.com", "RecordType": "A", "RecordData": [],
             "ResponseCode": "NXDOMAIN", "Protocol": "UDP"},
        )  # fmt: skip
        single = verify.Stack("example.com", (), "Z1", (), STACK.nodes[1:], {}, None)
        (finding,) = verify.check_dns(client, single, verify.PROBES[:1])
    assert finding.level == FAIL and "NXDOMAIN" in finding.detail


def test_health_as_route53s_checkers_see_it_per_region():
    client = route53_client()

    def observation(region: str, status: str) -> dict:
        when = dt.datetime(2026, 11, 25, tzinfo=dt.UTC)
        return {"Region": region, "IPAddress": "15.177.0.1", "StatusReport": {"Status": status, "CheckedTime": when}}

    with Stubber(client) as stub:
        for check_id, statuses in (
            ("hc-f", ["Success: HTTP Status Code 200, OK"] * 2),
            ("hc-f6", ["Success: HTTP Status Code 200, OK", "Failure: Resolved IP is not reachable"]),
            ("hc-v", []),
        ):
            stub.add_response(
                "get_health_check_status",
                {
                    "HealthCheckObservations": [
                        observation(r, s) for r, s in zip(("us-east-1", "eu-west-1"), statuses, strict=False)
                    ]
                },
                {"HealthCheckId": check_id},
            )
        findings = {f.subject: f for f in verify.check_health(client, STACK)}
    assert findings["frankfurt"].level == OK
    assert findings["frankfurt-ipv6"].level == FAIL and "eu-west-1: Failure" in findings["frankfurt-ipv6"].detail
    assert findings["virginia"].level == FAIL and "no checker" in findings["virginia"].detail


@mock_aws
def test_firewalls_as_aws_holds_them_lightsail_stubbed_ec2_in_moto():
    ec2 = boto3.client("ec2", region_name="us-east-1")
    group = ec2.create_security_group(GroupName="edgecdn-virginia", Description="edgecdn")["GroupId"]
    web = [
        {"IpProtocol": proto, "FromPort": port, "ToPort": port, "IpRanges": [{"CidrIp": "0.0.0.0/0"}],
         "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}
        for proto, port in verify.WEB_PORTS
    ]  # fmt: skip
    ssh = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[*web, ssh])
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    instance = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, SecurityGroupIds=[group])["Instances"][0]
    lightsail = boto3.client("lightsail", region_name="eu-central-1")
    open_web = [
        {"fromPort": port, "toPort": port, "protocol": proto, "state": "open", "cidrs": ["0.0.0.0/0"],
         "ipv6Cidrs": ["::/0"]}
        for proto, port in verify.WEB_PORTS
    ]  # fmt: skip
    ssh_ok = {"fromPort": 22, "toPort": 22, "protocol": "tcp", "state": "open", "cidrs": ["203.0.113.0/24"],
              "ipv6Cidrs": ["100::/64"]}  # fmt: skip
    stack = read_stack(
        {**OUTPUTS, "nodes": [OUTPUTS["nodes"][0], {**OUTPUTS["nodes"][1], "instanceId": instance["InstanceId"]}]}
    )
    with Stubber(lightsail) as stub:
        stub.add_response(
            "get_instance_port_states", {"portStates": [*open_web, ssh_ok]}, {"instanceName": "edgecdn-frankfurt"}
        )
        clients = {"lightsail": lightsail, "ec2": ec2}
        findings = {f.subject: f for f in verify.check_firewalls(lambda service, region: clients[service], stack)}
    assert findings["frankfurt"].level == OK
    assert findings["virginia"].level == FAIL and "22 is open to 0.0.0.0/0" in findings["virginia"].detail


def test_lightsail_ports_closed_behind_pulumis_back_are_found():
    lightsail = boto3.client("lightsail", region_name="eu-central-1", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(lightsail) as stub:
        stub.add_response("get_instance_port_states", {"portStates": []})
        (finding,) = verify.check_firewalls(lambda service, region: lightsail, verify.Stack(
            "example.com", (), "Z1", (), STACK.nodes[:1], {}, None))  # fmt: skip
    assert finding.level == FAIL and "tcp/443 is not open to 0.0.0.0/0, ::/0" in finding.detail


def test_https_findings_from_what_each_node_presents():
    class Page:
        def __init__(self, status: int) -> None:
            self.status, self.headers = status, {"x-edge-release": "0123456789abcdef0123"}

    now = dt.datetime(2026, 11, 25, tzinfo=dt.UTC)
    soon = "Dec  5 00:00:00 2026 GMT"
    later = "Feb 20 00:00:00 2027 GMT"
    certs = {"192.0.2.10": later, "2001:db8::10": soon, "192.0.2.20": later}
    findings = verify.check_https(
        STACK,
        lambda address, name, path: Page(404 if address == "192.0.2.20" and name.startswith("www") else 200),
        lambda address, name: {"notAfter": certs[address]},
        now,
    )
    by = {f.subject: f for f in findings}
    assert by["frankfurt 192.0.2.10 as example.com"].level == OK
    assert "expires in 10 days" in by["frankfurt 2001:db8::10 as www.example.com"].detail
    assert by["virginia 192.0.2.20 as www.example.com"].detail == "/ answered 404"


@mock_aws
def test_report_tabulates_medians_and_p90_and_lists_missing_metrics(tmp_path):
    cloudwatch = boto3.client("cloudwatch", region_name="us-east-1")
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    for minute in range(9):
        for check_id, region, ms in (("hc-f", "eu-west-1", 20 + minute), ("hc-v", "us-east-1", 5 + minute)):
            cloudwatch.put_metric_data(
                Namespace="AWS/Route53",
                MetricData=[{
                    "MetricName": "TimeToFirstByte", "Value": ms, "Unit": "Milliseconds",
                    "Timestamp": now - dt.timedelta(minutes=minute + 1),
                    "Dimensions": [{"Name": "HealthCheckId", "Value": check_id}, {"Name": "Region", "Value": region}],
                }],
            )  # fmt: skip
    args = argparse.Namespace(hours=1, png=str(tmp_path / "chart.png"), html=str(tmp_path / "page.html"), json=False)
    out = io.StringIO()
    code = report.run(args, OUTPUTS, out, print_table, cloudwatch=cloudwatch, now=now)
    text = out.getvalue()
    assert code == 0, text
    assert "frankfurt" in text and "24 / 28" in text and "9 / 13" in text
    assert "missing (22): frankfurt from us-east-1" in text
    assert (tmp_path / "chart.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    page = (tmp_path / "page.html").read_text()
    assert "<table>" in page and 'src="data:image/png;base64,' in page and "frankfurt-ipv6 from us-east-1" in page


def test_percentiles_are_nearest_rank():
    values = list(range(1, 11))
    assert report.percentile(values, 0.9) == 9 and report.percentile(values, 0.5) == 5
    assert report.percentile([7.0], 0.9) == 7.0


def test_bad_outputs_exit_2_naming_the_problem(capsys):
    assert main(["verify", "--outputs", "-"], stdin=io.StringIO("[]")) == ExitStatus.BAD_INPUT
    assert main(["report", "--outputs", "-"], stdin=io.StringIO(json.dumps({"domain": "x"}))) == ExitStatus.BAD_INPUT
    assert "healthCheckIds" in capsys.readouterr().err
