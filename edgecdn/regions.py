"""Which AWS regions can hold a node, on which backend, and the default sizes.

Route53 latency records name an AWS region, so a node is always placed in one. EC2 is in
every commercial region; Lightsail only in some. Opt-in regions (af-south-1, me-south-1, ...)
must be enabled in the account before a node can go there.
"""

from __future__ import annotations

LIGHTSAIL = "lightsail"
EC2 = "ec2"
BACKENDS = (LIGHTSAIL, EC2)

# Lightsail regions as listed in the Lightsail docs (regions-and-availability-zones).
_LIGHTSAIL_REGIONS = frozenset(
    {
        "us-east-1",
        "us-east-2",
        "us-west-2",
        "ca-central-1",
        "eu-west-1",
        "eu-west-2",
        "eu-west-3",
        "eu-central-1",
        "eu-north-1",
        "ap-south-1",
        "ap-northeast-1",
        "ap-northeast-2",
        "ap-southeast-1",
        "ap-southeast-2",
        "ap-southeast-3",
    }
)

# Commercial regions where Route53 accepts a latency record and EC2 runs.
_EC2_REGIONS = frozenset(
    _LIGHTSAIL_REGIONS
    | {
        "us-west-1",
        "ca-west-1",
        "sa-east-1",
        "mx-central-1",
        "eu-south-1",
        "eu-south-2",
        "eu-central-2",
        "il-central-1",
        "me-south-1",
        "me-central-1",
        "af-south-1",
        "ap-east-1",
        "ap-south-2",
        "ap-northeast-3",
        "ap-southeast-4",
        "ap-southeast-5",
        "ap-southeast-7",
    }
)

REGION_BACKENDS: dict[str, frozenset[str]] = {
    region: frozenset({EC2, LIGHTSAIL} if region in _LIGHTSAIL_REGIONS else {EC2}) for region in sorted(_EC2_REGIONS)
}

# Lightsail has no arm64 bundles; its smallest dual-stack bundle (public IPv4 and a transfer
# allowance included) is the cheapest way to serve a static site. EC2 gets the smallest Graviton type.
DEFAULT_SIZE = {LIGHTSAIL: "nano_3_0", EC2: "t4g.nano"}

# What a new node boots. EC2: Debian 13 (trixie), the newest official image of Debian's cloud
# team (account 136693071363). Lightsail: its newest Debian blueprint; Debian 12 gets security
# support through Debian LTS until June 2028. The bootstrap works on both.
NODE_IMAGE = {LIGHTSAIL: "debian_12", EC2: "debian-13-arm64-*"}
# The Debian architecture a backend's nodes run: it picks the pinned Caddy binary.
NODE_ARCH = {LIGHTSAIL: "amd64", EC2: "arm64"}


def first_zone(region: str) -> str:
    """The availability zone a node is placed in: every Lightsail and EC2 region has an "a"."""
    return f"{region}a"
