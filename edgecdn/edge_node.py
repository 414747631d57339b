"""EdgeNode: one edge server with a static IP, a firewall and a first-boot script."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import pulumi
import pulumi_aws as aws
import pulumi_tls as tls

from edgecdn.bootstrap import render_bootstrap, user_data_base64
from edgecdn.config import NodeSpec
from edgecdn.node_files import NodeLayout
from edgecdn.regions import EC2, LIGHTSAIL, first_zone

DEBIAN_AMI_OWNER = "136693071363"  # Debian's official cloud images account
DEBIAN_AMI_NAME = "debian-12-arm64-*"
LIGHTSAIL_BLUEPRINT = "debian_12"
WEB_PORTS = (("tcp", 80), ("tcp", 443), ("udp", 443))
ANYWHERE_V4, ANYWHERE_V6 = "0.0.0.0/0", "::/0"


@dataclass(frozen=True)
class EdgeNodeArgs:
    """What one node needs to know at boot."""

    spec: NodeSpec
    domain: str
    deploy_public_key: pulumi.Input[str]
    ssh_allowed_cidrs: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    admin_ssh_keys: tuple[str, ...] = ()


def split_cidrs(cidrs: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """IPv4 and IPv6 blocks apart, as both firewalls want them."""
    v6 = [c for c in cidrs if ":" in c]
    return [c for c in cidrs if ":" not in c], v6


def lightsail_port_infos(ssh_cidrs: tuple[str, ...]) -> list[Any]:
    """Lightsail public ports: web to everyone, SSH only from the allowed blocks."""
    infos: list[dict] = [
        {"protocol": proto, "from_port": port, "to_port": port, "cidrs": [ANYWHERE_V4], "ipv6_cidrs": [ANYWHERE_V6]}
        for proto, port in WEB_PORTS
    ]
    v4, v6 = split_cidrs(ssh_cidrs)
    ssh: dict = {"protocol": "tcp", "from_port": 22, "to_port": 22, "cidrs": v4}
    if v6:
        ssh["ipv6_cidrs"] = v6
    infos.append(ssh)
    return infos


def security_group_ingress(ssh_cidrs: tuple[str, ...]) -> list[Any]:
    """EC2 ingress rules: web to everyone, SSH only from the allowed blocks."""
    rules: list[dict] = [
        {
            "protocol": proto,
            "from_port": port,
            "to_port": port,
            "cidr_blocks": [ANYWHERE_V4],
            "ipv6_cidr_blocks": [ANYWHERE_V6],
            "description": f"web {proto}/{port}",
        }
        for proto, port in WEB_PORTS
    ]
    v4, v6 = split_cidrs(ssh_cidrs)
    rules.append(
        {
            "protocol": "tcp",
            "from_port": 22,
            "to_port": 22,
            "cidr_blocks": v4,
            "ipv6_cidr_blocks": v6,
            "description": "ssh for the deployer and admins",
        }
    )
    return rules


def node_user_data(layout: NodeLayout, admin_keys: tuple[str, ...], keys: list[str]) -> str:
    """The bootstrap script from [deploy public key, host private key, host public key]."""
    deploy_public, host_private, host_public = keys
    return render_bootstrap(layout, deploy_public, host_private, host_public, admin_keys)


def first_or_none(values: Sequence[str] | None) -> str | None:
    """The first address of a list, or None when the instance has none."""
    return values[0] if values else None


class EdgeNode(pulumi.ComponentResource):
    """A Debian 12 server that serves the whole site, reachable at a static address."""

    name: pulumi.Output[str]
    region: pulumi.Output[str]
    ipv4: pulumi.Output[str]
    ipv6: pulumi.Output[str | None]
    host_public_key: pulumi.Output[str]
    instance_id: pulumi.Output[str]

    def __init__(self, name: str, args: EdgeNodeArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("edgecdn:index:EdgeNode", name, None, opts)
        spec = args.spec
        self.spec = spec
        self.has_ipv6 = spec.backend == LIGHTSAIL
        child = pulumi.ResourceOptions(parent=self)
        host_key = tls.PrivateKey(f"{name}-host-key", algorithm="ED25519", opts=child)
        layout = NodeLayout(node_name=spec.name, domain=args.domain, aliases=args.aliases)
        script = pulumi.Output.all(
            args.deploy_public_key, host_key.private_key_openssh, host_key.public_key_openssh
        ).apply(lambda keys: node_user_data(layout, args.admin_ssh_keys, list(keys)))
        user_data = cast(pulumi.Output[str], pulumi.Output.secret(script))
        tags = {"edgecdn:node": spec.name, "edgecdn:domain": args.domain}

        if spec.backend == EC2:
            ipv4, ipv6, instance_id = self._ec2(name, args, user_data, tags)
        else:
            ipv4, ipv6, instance_id = self._lightsail(name, args, user_data, tags)

        self.name = pulumi.Output.from_input(spec.name)
        self.region = pulumi.Output.from_input(spec.region)
        self.ipv4 = ipv4
        self.ipv6 = ipv6
        self.instance_id = instance_id
        self.host_public_key = host_key.public_key_openssh.apply(str.strip)
        self.register_outputs(
            {
                "name": self.name,
                "region": self.region,
                "ipv4": self.ipv4,
                "ipv6": self.ipv6,
                "hostPublicKey": self.host_public_key,
            }
        )

    def _lightsail(self, name: str, args: EdgeNodeArgs, user_data: pulumi.Output[str], tags: dict):
        spec = args.spec
        child = pulumi.ResourceOptions(parent=self)
        instance = aws.lightsail.Instance(
            f"{name}-instance",
            region=spec.region,
            availability_zone=first_zone(spec.region),
            blueprint_id=LIGHTSAIL_BLUEPRINT,
            bundle_id=spec.size,
            ip_address_type="dualstack",
            user_data=user_data,
            tags=tags,
            opts=pulumi.ResourceOptions(parent=self, additional_secret_outputs=["userData"]),
        )
        static_ip = aws.lightsail.StaticIp(f"{name}-ip", region=spec.region, opts=child)
        attachment = aws.lightsail.StaticIpAttachment(
            f"{name}-ip-attachment",
            region=spec.region,
            static_ip_name=static_ip.name,
            instance_name=instance.name,
            opts=child,
        )
        aws.lightsail.InstancePublicPorts(
            f"{name}-firewall",
            region=spec.region,
            instance_name=instance.name,
            port_infos=lightsail_port_infos(args.ssh_allowed_cidrs),
            opts=child,
        )
        ipv6 = instance.ipv6_addresses.apply(first_or_none)
        return attachment.ip_address, ipv6, instance.id

    def _ec2(self, name: str, args: EdgeNodeArgs, user_data: pulumi.Output[str], tags: dict):
        spec = args.spec
        child = pulumi.ResourceOptions(parent=self)
        ami = aws.ec2.get_ami_output(
            most_recent=True,
            owners=[DEBIAN_AMI_OWNER],
            region=spec.region,
            filters=[
                {"name": "name", "values": [DEBIAN_AMI_NAME]},
                {"name": "architecture", "values": ["arm64"]},
            ],
            opts=pulumi.InvokeOutputOptions(parent=self),
        )
        firewall = aws.ec2.SecurityGroup(
            f"{name}-firewall",
            region=spec.region,
            description=f"edgecdn node {spec.name}: web from anywhere, ssh from allowed blocks",
            ingress=security_group_ingress(args.ssh_allowed_cidrs),
            egress=[
                {
                    "protocol": "-1",
                    "from_port": 0,
                    "to_port": 0,
                    "cidr_blocks": [ANYWHERE_V4],
                    "ipv6_cidr_blocks": [ANYWHERE_V6],
                    "description": "package updates",
                }
            ],
            tags=tags,
            opts=child,
        )
        instance = aws.ec2.Instance(
            f"{name}-instance",
            region=spec.region,
            ami=ami.id,
            instance_type=spec.size,
            vpc_security_group_ids=[firewall.id],
            user_data_base64=user_data.apply(user_data_base64),
            user_data_replace_on_change=True,
            metadata_options={"http_tokens": "required", "http_endpoint": "enabled", "http_put_response_hop_limit": 1},
            root_block_device={
                "volume_type": "gp3",
                "volume_size": 8,
                "encrypted": True,
                "delete_on_termination": True,
            },
            tags={**tags, "Name": f"edgecdn-{spec.name}"},
            # A newer Debian image must not replace a running node; unattended upgrades patch it.
            opts=pulumi.ResourceOptions(
                parent=self, ignore_changes=["ami"], additional_secret_outputs=["userData", "userDataBase64"]
            ),
        )
        eip = aws.ec2.Eip(f"{name}-ip", region=spec.region, domain="vpc", instance=instance.id, tags=tags, opts=child)
        return eip.public_ip, pulumi.Output.from_input(None), instance.id
