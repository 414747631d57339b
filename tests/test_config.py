"""Config validation: every bad input names its key; good input becomes a frozen EdgeConfig."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from pulumi_harness import PROJECT_DIR, run_main

from edgecdn.config import ConfigError, parse_config

GOOD = {
    "domain": "example.com",
    "aliases": ["www.example.com"],
    "hostedZoneId": "Z0123456789ABCDEFGHIJ",
    "siteDir": "example-site",
    "nodes": [{"region": "eu-central-1"}, {"region": "us-east-1", "backend": "ec2"}],
    "sshAllowedCidrs": ["203.0.113.7/32"],
    "acmeEmail": "ops@example.com",
}


def parse(overrides: dict, drop: tuple[str, ...] = (), zone: str | None = "example.com.") -> object:
    raw = {k: v for k, v in {**GOOD, **overrides}.items() if k not in drop}
    return parse_config(raw, PROJECT_DIR, "Pulumi.test.yaml", zone_name=zone)


def test_good_config_parses_with_defaults():
    config = parse({})
    assert config.domain == "example.com"
    assert config.names == ("example.com", "www.example.com")
    assert [(n.name, n.backend, n.size) for n in config.nodes] == [
        ("eu-central-1", "lightsail", "nano_3_0"),
        ("us-east-1", "ec2", "t4g.nano"),
    ]
    assert config.cert_min_days_remaining is None
    assert config.caa_issuer == "letsencrypt.org"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.domain = "other.com"  # type: ignore[misc]


def test_values_as_json_text_from_the_cli_are_decoded():
    config = parse({"nodes": '[{"region": "eu-west-1"}]', "certMinDaysRemaining": "14"})
    assert config.nodes[0].region == "eu-west-1"
    assert config.cert_min_days_remaining == 14


BAD = [
    ({}, ("domain",), "edgecdn:domain: missing"),
    ({}, ("hostedZoneId",), "edgecdn:hostedZoneId: missing"),
    ({}, ("siteDir",), "edgecdn:siteDir: missing"),
    ({}, ("nodes",), "edgecdn:nodes: missing"),
    ({}, ("sshAllowedCidrs",), "edgecdn:sshAllowedCidrs: missing"),
    ({}, ("acmeEmail",), "edgecdn:acmeEmail: missing"),
    ({"domain": "exa mple.com"}, (), "edgecdn:domain: 'exa mple.com' is not a valid DNS name"),
    ({"domain": "Example.com"}, (), "edgecdn:domain: 'Example.com' must be lower case"),
    ({"domain": "example.com."}, (), "must not end with a dot"),
    ({"domain": "other.org"}, (), "edgecdn:domain: 'other.org' is not in the hosted zone"),
    ({"aliases": ["www.other.org"]}, (), "edgecdn:aliases[0]: 'www.other.org' is outside the hosted zone"),
    ({"aliases": ["example.com"]}, (), "edgecdn:aliases[0]: 'example.com' is listed twice"),
    ({"hostedZoneId": "zone-1"}, (), "edgecdn:hostedZoneId: 'zone-1' is not a Route53 hosted zone id"),
    ({"nodes": []}, (), "edgecdn:nodes: is empty"),
    ({"nodes": [{"region": "eu-central-3"}]}, (), "edgecdn:nodes[0].region: 'eu-central-3' is not an AWS region"),
    ({"nodes": [{"region": "sa-east-1"}]}, (), "edgecdn:nodes[0].backend: lightsail is not offered in sa-east-1"),
    ({"nodes": [{"region": "eu-west-1", "backend": "gcp"}]}, (), "edgecdn:nodes[0].backend: 'gcp' is not a backend"),
    (
        {"nodes": [{"region": "eu-west-1"}, {"region": "eu-west-1", "name": "two"}]},
        (),
        "edgecdn:nodes[1].region: 'eu-west-1' already holds nodes[0]; Route53 allows one latency record per region",
    ),
    (
        {"nodes": [{"region": "eu-west-1", "name": "a"}, {"region": "eu-west-2", "name": "a"}]},
        (),
        "edgecdn:nodes[1].name: 'a' is already the name of nodes[0]",
    ),
    ({"nodes": [{"region": "eu-west-1", "name": "Bad_Name"}]}, (), "edgecdn:nodes[0].name: 'Bad_Name'"),
    ({"nodes": [{"region": "eu-west-1", "backend": "ec2", "size": "t3.micro"}]}, (), "is not an arm64 (Graviton)"),
    ({"nodes": [{"region": "eu-west-1", "size": "t4g.nano"}]}, (), "is not a Lightsail bundle id"),
    ({"nodes": [{"region": "eu-west-1", "zone": "a"}]}, (), "edgecdn:nodes[0].zone: unknown node key"),
    ({"nodes": ["eu-west-1"]}, (), "edgecdn:nodes[0]: expected an object"),
    ({"sshAllowedCidrs": ["10.0.0.1/24"]}, (), "did you mean 10.0.0.0/24?"),
    ({"sshAllowedCidrs": ["not-a-cidr"]}, (), "edgecdn:sshAllowedCidrs[0]: 'not-a-cidr' is not a CIDR block"),
    ({"sshAllowedCidrs": ["0.0.0.0/0"]}, (), "opens SSH to the whole internet"),
    ({"sshAllowedCidrs": ["::/0"]}, (), "opens SSH to the whole internet"),
    ({"sshAllowedCidrs": []}, (), "edgecdn:sshAllowedCidrs: is empty"),
    ({"sshAllowedCidrs": ["2001:db8::/32"]}, (), "needs at least one IPv4 block"),
    ({"acmeEmail": "ops-at-example.com"}, (), "edgecdn:acmeEmail: 'ops-at-example.com' is not an email address"),
    ({"alertEmail": "me@"}, (), "edgecdn:alertEmail: 'me@' is not an email address"),
    ({"adminSshKeys": ["ssh-ed25519 AAAA x\nssh-rsa B"]}, (), "edgecdn:adminSshKeys[0]: is not an OpenSSH public key"),
    ({"acmeServer": "http://ca.example/dir"}, (), "edgecdn:acmeServer: 'http://ca.example/dir' is not an https://"),
    ({"acmeServer": "https://ca.example/dir"}, (), "edgecdn:caaIssuer: missing for the ACME server"),
    ({"certMinDaysRemaining": 90}, (), "edgecdn:certMinDaysRemaining: 90 is out of range"),
    ({"certMinDaysRemaining": "soon"}, (), "edgecdn:certMinDaysRemaining: expected a int"),
    ({"siteDir": "no-such-dir"}, (), "edgecdn:siteDir: 'no-such-dir' does not exist"),
    ({"siteDir": "Pulumi.yaml"}, (), "edgecdn:siteDir: 'Pulumi.yaml' is not a directory"),
    ({"siteDir": "tests"}, (), "edgecdn:siteDir: 'tests' has no index.html"),
    ({"sshAlowedCidrs": ["203.0.113.7/32"]}, (), "edgecdn:sshAlowedCidrs: unknown key"),
]


@pytest.mark.parametrize(("overrides", "drop", "expected"), BAD, ids=[b[2][:60] for b in BAD])
def test_each_bad_input_gives_one_error_naming_the_key(overrides, drop, expected):
    with pytest.raises(ConfigError) as info:
        parse(overrides, drop)
    assert len(info.value.problems) == 1, str(info.value)
    assert expected in str(info.value)
    assert "Pulumi.test.yaml" in str(info.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        parse({"domain": "bad domain", "nodes": [], "acmeEmail": "x"}, drop=("hostedZoneId",))
    keys = sorted(p.key for p in info.value.problems)
    assert keys == ["acmeEmail", "domain", "hostedZoneId", "nodes"]
    assert "4 problems" in str(info.value)


def test_ssh_from_anywhere_needs_the_explicit_flag():
    config = parse({"sshAllowedCidrs": ["0.0.0.0/0", "::/0"], "allowSshFromAnywhere": True})
    assert config.ssh_allowed_cidrs == ("0.0.0.0/0", "::/0")


def test_unknown_ca_is_accepted_with_its_caa_identity():
    config = parse({"acmeServer": "https://ca.example/dir", "caaIssuer": "ca.example"})
    assert (config.acme_server, config.caa_issuer) == ("https://ca.example/dir", "ca.example")


def test_site_dir_relative_to_the_project(tmp_path: Path):
    (tmp_path / "public").mkdir()
    (tmp_path / "public" / "index.html").write_text("hi")
    raw = {**GOOD, "siteDir": "public"}
    assert parse_config(raw, tmp_path, zone_name="example.com").site_dir == tmp_path / "public"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"nodes": [{"region": "eu-west-1"}, {"region": "eu-west-1", "name": "b"}]}, "nodes[1].region"),
        ({"sshAllowedCidrs": ["0.0.0.0/0"]}, "sshAllowedCidrs[0]"),
        ({"domain": "other.org"}, "domain"),
    ],
)
def test_bad_config_stops_the_program_before_any_resource(overrides, key):
    run = run_main({**GOOD, **overrides}, allow_error=True)
    assert run.error is not None, "the program accepted a bad configuration"
    assert f"edgecdn:{key}" in str(run.error)
    assert "Pulumi.test.yaml" in str(run.error)
    assert run.resources == [], [r.urn for r in run.resources]


def test_good_config_does_register_resources():
    run = run_main(GOOD, allow_error=True)
    assert run.error is None and run.resources
