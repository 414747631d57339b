"""Nested Pulumi inputs are typed with the SDKs' ArgsDict TypedDicts: a misspelled key fails mypy."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each line misspells one key of an input the program builds; mypy must name every one.
PROBE = """\
from edgecdn.certificate import route53_challenge
from edgecdn.edge_node import EGRESS_ANYWHERE, ENCRYPTED_ROOT, IMDS_V2_ONLY, ami_filters, lightsail_port_infos
from edgecdn.edge_node import security_group_ingress
from edgecdn.latency_dns import latency_policy

lightsail_port_infos([])[0]["ipv6_cidr"] = []
security_group_ingress([])[0]["cidr_block"] = []
EGRESS_ANYWHERE["descripton"] = "x"
IMDS_V2_ONLY["http_token"] = "required"
ENCRYPTED_ROOT["encrypt"] = True
ami_filters("ec2")[0]["value"] = []
latency_policy("eu-central-1")["regoin"] = "x"
route53_challenge("Z1")["conifg"] = {}
"""


def test_a_misspelled_key_in_a_nested_pulumi_input_fails_the_type_check(tmp_path: Path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "pyproject.toml", "--no-error-summary", str(probe)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    flagged = {int(m.group(1)) for m in re.finditer(r"probe\.py:(\d+): error: .*typeddict-unknown-key", result.stdout)}
    misspelled = {n for n, line in enumerate(PROBE.splitlines(), 1) if "] = " in line}
    assert flagged == misspelled, result.stdout + result.stderr
