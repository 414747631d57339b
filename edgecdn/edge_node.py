"""EdgeNode: one edge server with a static IP, a firewall and a first-boot script.

A node never takes traffic before it can serve it, and an old instance serves until its
replacement has taken over, because of the order below (every step waits for the one before):

  instance -> firewall -> seed (release and certificate pushed through the instance's own,
  temporary address) -> static IP moved to it -> drain marker -> DNS records (LatencyDNS)

Pulumi replaces create-before-delete and deletes replaced resources at the end of the update,
so the old instance is deleted only after its successor holds the address. Two of the
provider's deletes would undo what the replacement just did, because they act by name
(terraform-provider-aws internal/service/lightsail/static_ip_attachment.go: DetachStaticIp by
static IP name; instance_public_ports.go: CloseInstancePublicPorts for each rule of the
instance); those resources are retained on delete instead, and the instance itself is deleted
before its static IP is released. The drain marker sleeps when it is deleted, so a removed node,
and a replaced node's old IPv6 address, leave DNS at least DRAIN_SECONDS before the instance dies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import pulumi
import pulumi_aws as aws
import pulumi_command as command
import pulumi_tls as tls

from edgecdn.config import ConfigError, EdgeConfig, NodeSpec, Problem
from edgecdn.latency_dns import TTL
from edgecdn.node.bootstrap import USER_DATA_LIMIT, check_user_data, render_bootstrap, user_data_base64, user_data_size
from edgecdn.node.caddy_release import CADDY_RELEASES
from edgecdn.node.files import NodeLayout, bundle_digest, render_bundle
from edgecdn.regions import EC2, NODE_ARCH, NODE_IMAGE, first_zone
from edgecdn.site_push import PushArgs, PushNode, handoff_output, push_command

DEBIAN_AMI_OWNER = "136693071363"  # Debian's official cloud images account
WEB_PORTS = (("tcp", 80), ("tcp", 443), ("udp", 443))
ANYWHERE_V4, ANYWHERE_V6 = "0.0.0.0/0", "::/0"
# Lightsail reads an empty ipv6_cidrs as "not given", whose meaning its API leaves open (the
# provider sends nothing for an empty set: instance_public_ports.go, expandPortInfo). SSH with
# no IPv6 block allowed is therefore sent as the discard-only prefix (RFC 6666), which no
# packet on the internet comes from.
NO_IPV6 = "100::/64"
# Resolvers may hold a record for its TTL; a node leaving DNS keeps serving twice that long.
DRAIN_SECONDS = 2 * TTL


@dataclass(frozen=True)
class EdgeNodeArgs:
    """What one node needs to know at boot, and what it is seeded with before it takes traffic."""

    spec: NodeSpec
    domain: str
    deploy_public_key: pulumi.Input[str]
    ssh_allowed_cidrs: tuple[str, ...]
    push: PushArgs
    aliases: tuple[str, ...] = ()
    admin_ssh_keys: tuple[str, ...] = ()


def split_cidrs(cidrs: Sequence[str]) -> tuple[list[str], list[str]]:
    """IPv4 and IPv6 blocks apart, as both firewalls want them."""
    v6 = [c for c in cidrs if ":" in c]
    return [c for c in cidrs if ":" not in c], v6


def lightsail_port_infos(ssh_cidrs: Sequence[str]) -> list[aws.lightsail.InstancePublicPortsPortInfoArgsDict]:
    """Lightsail public ports: web to everyone, SSH only from the allowed blocks, both families explicit."""
    infos: list[aws.lightsail.InstancePublicPortsPortInfoArgsDict] = [
        {"protocol": proto, "from_port": port, "to_port": port, "cidrs": [ANYWHERE_V4], "ipv6_cidrs": [ANYWHERE_V6]}
        for proto, port in WEB_PORTS
    ]
    v4, v6 = split_cidrs(ssh_cidrs)
    infos.append({"protocol": "tcp", "from_port": 22, "to_port": 22, "cidrs": v4, "ipv6_cidrs": v6 or [NO_IPV6]})
    return infos


def security_group_ingress(ssh_cidrs: Sequence[str]) -> list[aws.ec2.SecurityGroupIngressArgsDict]:
    """EC2 ingress rules: web to everyone, SSH only from the allowed blocks."""
    rules: list[aws.ec2.SecurityGroupIngressArgsDict] = [
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


# Outbound for package updates and the Caddy download.
EGRESS_ANYWHERE: aws.ec2.SecurityGroupEgressArgsDict = {
    "protocol": "-1",
    "from_port": 0,
    "to_port": 0,
    "cidr_blocks": [ANYWHERE_V4],
    "ipv6_cidr_blocks": [ANYWHERE_V6],
    "description": "package updates",
}
IMDS_V2_ONLY: aws.ec2.InstanceMetadataOptionsArgsDict = {
    "http_tokens": "required",
    "http_endpoint": "enabled",
    "http_put_response_hop_limit": 1,
}
ENCRYPTED_ROOT: aws.ec2.InstanceRootBlockDeviceArgsDict = {
    "volume_type": "gp3",
    "volume_size": 8,
    "encrypted": True,
    "delete_on_termination": True,
}


def ami_filters(backend: str) -> list[aws.ec2.GetAmiFilterArgsDict]:
    """The official Debian image for a backend's architecture."""
    return [
        {"name": "name", "values": [NODE_IMAGE[backend]]},
        {"name": "architecture", "values": [NODE_ARCH[backend].replace("amd64", "x86_64")]},
    ]


def node_user_data(
    layout: NodeLayout,
    admin_keys: tuple[str, ...],
    bundle_sha256: str,
    arch: str,
    keys: dict[str, str],
    caddy_releases: str = CADDY_RELEASES,
) -> str:
    """The user data from the deploy public key and the host private key; checked against the cap."""
    script = render_bootstrap(
        layout,
        keys["deploy_public"],
        keys["host_private"],
        admin_keys,
        bundle_sha256=bundle_sha256,
        arch=arch,
        caddy_releases=caddy_releases,
    )
    return check_user_data(script, layout.node_name)


def check_user_data_budget(config: EdgeConfig, stack_file: str = "Pulumi.<stack>.yaml") -> None:
    """ConfigError, before any resource exists, if a node's user data would exceed what AWS accepts."""
    for spec in config.nodes:
        layout = NodeLayout(node_name=spec.name, domain=config.domain, aliases=config.aliases)
        size = user_data_size(layout, config.admin_ssh_keys, NODE_ARCH[spec.backend])
        if size > USER_DATA_LIMIT:
            message = (
                f"node {spec.name}'s first-boot script would be {size} bytes, over the {USER_DATA_LIMIT} "
                "bytes AWS accepts as user data; list fewer admin keys or shorter ones (ssh-ed25519)"
            )
            raise ConfigError([Problem("adminSshKeys", message)], stack_file)


def first_or_none(values: Sequence[str] | None) -> str | None:
    """The first address of a list, or None when the instance has none."""
    return values[0] if values else None


def when_drained(values: dict[str, Any]) -> Any:
    """The address, once the drain marker (and so everything before it) exists."""
    return values["address"]


class EdgeNode(pulumi.ComponentResource):
    """A Debian server that serves the whole site, reachable at a static address."""

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
        self.has_ipv6 = spec.backend != EC2
        child = pulumi.ResourceOptions(parent=self)
        host_key = tls.PrivateKey(f"{name}-host-key", algorithm="ED25519", opts=child)
        layout = NodeLayout(node_name=spec.name, domain=args.domain, aliases=args.aliases)
        bundle = render_bundle(layout)
        keys = pulumi.Output.all(deploy_public=args.deploy_public_key, host_private=host_key.private_key_openssh)
        script = keys.apply(
            lambda k: node_user_data(
                layout, args.admin_ssh_keys, bundle_digest(bundle), NODE_ARCH[spec.backend], dict(k)
            )
        )
        user_data = cast(pulumi.Output[str], pulumi.Output.secret(script))
        tags = {"edgecdn:node": spec.name, "edgecdn:domain": args.domain}
        self.host_public_key = host_key.public_key_openssh.apply(str.strip)

        self._bundle = bundle
        if spec.backend == EC2:
            instance_id, static_address, moved, ipv6 = self._ec2(name, args, user_data, tags)
        else:
            instance_id, static_address, moved, ipv6 = self._lightsail(name, args, user_data, tags)
        drain = command.local.Command(
            f"{name}-drain",
            delete=f"sleep {DRAIN_SECONDS}",
            # Replaced with the instance: the old marker's delete then holds up the old instance's.
            triggers=[instance_id],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[moved]),
        )
        self.name = pulumi.Output.from_input(spec.name)
        self.region = pulumi.Output.from_input(spec.region)
        self.instance_id = instance_id
        self.ipv4 = pulumi.Output.all(address=static_address, drained=drain.id).apply(when_drained)
        self.ipv6 = pulumi.Output.all(address=ipv6, drained=drain.id).apply(when_drained)
        self.register_outputs(
            {
                "name": self.name,
                "region": self.region,
                "ipv4": self.ipv4,
                "ipv6": self.ipv6,
                "hostPublicKey": self.host_public_key,
            }
        )

    def _lightsail(
        self, name: str, args: EdgeNodeArgs, user_data: pulumi.Output[str], tags: dict[str, str]
    ) -> tuple[pulumi.Output[str], pulumi.Output[str], pulumi.Resource, pulumi.Output[str | None]]:
        spec = args.spec
        static_ip = aws.lightsail.StaticIp(f"{name}-ip", region=spec.region, opts=pulumi.ResourceOptions(parent=self))
        instance = aws.lightsail.Instance(
            f"{name}-instance",
            region=spec.region,
            availability_zone=first_zone(spec.region),
            blueprint_id=NODE_IMAGE[spec.backend],
            bundle_id=spec.size,
            ip_address_type="dualstack",
            user_data=user_data,
            tags=tags,
            # Deleted before its static IP is released (a removal), never the other way round.
            opts=pulumi.ResourceOptions(parent=self, depends_on=[static_ip], additional_secret_outputs=["userData"]),
        )
        firewall = aws.lightsail.InstancePublicPorts(
            f"{name}-firewall",
            region=spec.region,
            instance_name=instance.name,
            port_infos=lightsail_port_infos(args.ssh_allowed_cidrs),
            # Its delete closes the ports by instance name, undoing a replacement's rules.
            opts=pulumi.ResourceOptions(parent=self, retain_on_delete=True),
        )
        seed = self._seed(name, args, instance.id, instance.public_ip_address, firewall)
        attachment = aws.lightsail.StaticIpAttachment(
            f"{name}-ip-attachment",
            region=spec.region,
            static_ip_name=static_ip.name,
            instance_name=instance.name,
            # Its delete detaches the IP by name, from whichever instance holds it by then.
            opts=pulumi.ResourceOptions(parent=self, depends_on=[seed], retain_on_delete=True),
        )
        return instance.id, static_ip.ip_address, attachment, instance.ipv6_addresses.apply(first_or_none)

    def _ec2(
        self, name: str, args: EdgeNodeArgs, user_data: pulumi.Output[str], tags: dict[str, str]
    ) -> tuple[pulumi.Output[str], pulumi.Output[str], pulumi.Resource, pulumi.Output[str | None]]:
        spec = args.spec
        child = pulumi.ResourceOptions(parent=self)
        ami = aws.ec2.get_ami_output(
            most_recent=True,
            owners=[DEBIAN_AMI_OWNER],
            region=spec.region,
            filters=ami_filters(spec.backend),
            opts=pulumi.InvokeOutputOptions(parent=self),
        )
        firewall = aws.ec2.SecurityGroup(
            f"{name}-firewall",
            region=spec.region,
            description=f"edgecdn node {spec.name}: web from anywhere, ssh from allowed blocks",
            ingress=security_group_ingress(args.ssh_allowed_cidrs),
            egress=[EGRESS_ANYWHERE],
            tags=tags,
            opts=child,
        )
        eip = aws.ec2.Eip(f"{name}-ip", region=spec.region, domain="vpc", tags=tags, opts=child)
        instance = aws.ec2.Instance(
            f"{name}-instance",
            region=spec.region,
            ami=ami.id,
            instance_type=spec.size,
            vpc_security_group_ids=[firewall.id],
            associate_public_ip_address=True,
            user_data_base64=user_data.apply(user_data_base64),
            user_data_replace_on_change=True,
            metadata_options=IMDS_V2_ONLY,
            root_block_device=ENCRYPTED_ROOT,
            tags={**tags, "Name": f"edgecdn-{spec.name}"},
            # A newer Debian image must not replace a running node; unattended upgrades patch it.
            # A new size replaces the instance (seeded, then moved to) instead of the provider's
            # in-place stop, resize and start, which would leave the region dark for minutes.
            # Terminated before its Elastic IP is released (a removal), never the other way round.
            opts=pulumi.ResourceOptions(
                parent=self,
                depends_on=[eip],
                ignore_changes=["ami"],
                replace_on_changes=["instanceType"],
                additional_secret_outputs=["userData", "userDataBase64"],
            ),
        )
        seed = self._seed(name, args, instance.id, instance.public_ip, firewall)
        association = aws.ec2.EipAssociation(
            f"{name}-ip-association",
            region=spec.region,
            allocation_id=eip.allocation_id,
            instance_id=instance.id,
            # Moves the address from the old instance in one call (AssociateAddress AllowReassociation);
            # the old association's delete would disassociate it, so it is retained instead.
            allow_reassociation=True,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[seed], retain_on_delete=True),
        )
        return instance.id, eip.public_ip, association, pulumi.Output.from_input(None)

    def _seed(
        self,
        name: str,
        args: EdgeNodeArgs,
        instance_id: pulumi.Output[str],
        temporary_ip: pulumi.Output[str],
        firewall: pulumi.Resource,
    ) -> pulumi.Resource:
        """Push the bundle, release and certificate through the instance's own address (new instances only)."""
        node = PushNode(args.spec.name, args.spec.region, temporary_ip, self.host_public_key, instance_id, self._bundle)
        return push_command(
            f"{name}-seed",
            "seed",
            handoff_output(args.push, [node]),
            # A replaced instance is seeded again; otherwise a rerun finds the node serving and does nothing.
            [instance_id],
            pulumi.ResourceOptions(parent=self, depends_on=[firewall]),
        )
