"""SitePush: after the nodes exist, push the release and the certificate to all of them.

One local command runs `python -m site_sync deploy`. Its secrets (the deploy key, the TLS key)
travel only in the handoff document on stdin; argv and environment carry none. It runs again
when the release, the certificate or any node changes, and never during preview.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import pulumi
import pulumi_command as command

from edgecdn.node_files import DEPLOY_USER, SSH_PORT
from site_sync.handoff import build_handoff


@dataclass(frozen=True)
class PushNode:
    """A node's address and identity, as the deployer needs them."""

    name: str
    region: str
    ipv4: pulumi.Input[str]
    host_public_key: pulumi.Input[str]
    instance_id: pulumi.Input[str]


@dataclass(frozen=True)
class SitePushArgs:
    """Everything the deploy needs: what to push, where, and the secrets to do it."""

    domain: str
    release_id: str
    site_dir: str
    project_dir: str
    nodes: tuple[PushNode, ...]
    deploy_private_key: pulumi.Input[str]
    certificate_chain: pulumi.Input[str]
    certificate_key: pulumi.Input[str]
    aliases: tuple[str, ...] = ()


def deploy_command(python: str) -> str:
    """The command line: no secrets, only where the handoff document comes from."""
    return shlex.join([python, "-m", "site_sync", "deploy", "--handoff", "-"])


def node_entries(names: Sequence[str], regions: Sequence[str], values: list) -> list[dict]:
    """Handoff node entries from resolved [ipv4, host key] pairs."""
    return [
        {
            "name": name,
            "region": region,
            "address": ipv4,
            "port": SSH_PORT,
            "user": DEPLOY_USER,
            "host_key": key.strip(),
        }
        for name, region, (ipv4, key) in zip(names, regions, zip(values[0::2], values[1::2], strict=True), strict=True)
    ]


class SitePush(pulumi.ComponentResource):
    """The deploy, run by `pulumi up` after the nodes and the certificate exist."""

    stdout: pulumi.Output[str]

    def __init__(self, name: str, args: SitePushArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("edgecdn:index:SitePush", name, None, opts)
        names = [n.name for n in args.nodes]
        regions = [n.region for n in args.nodes]
        addresses = [v for n in args.nodes for v in (n.ipv4, n.host_public_key)]
        nodes = pulumi.Output.all(*addresses).apply(lambda values: node_entries(names, regions, list(values)))
        handoff = pulumi.Output.all(nodes, args.deploy_private_key, args.certificate_chain, args.certificate_key).apply(
            lambda v: build_handoff(
                domain=args.domain,
                aliases=args.aliases,
                release_id=args.release_id,
                site_dir=args.site_dir,
                nodes=v[0],
                deploy_key=v[1],
                certificate_chain=v[2],
                certificate_key=v[3],
            )
        )
        identities = [[n.name, n.ipv4, n.host_public_key, n.instance_id] for n in args.nodes]
        push = command.local.Command(
            f"{name}-deploy",
            create=deploy_command(sys.executable),
            dir=args.project_dir,
            stdin=cast(pulumi.Output[str], pulumi.Output.secret(handoff)),
            # Replaced (so run again) when the release, the certificate or any node changes.
            triggers=[args.release_id, args.certificate_chain, identities],
            logging=command.local.Logging.NONE,
            add_previous_output_in_env=False,
            opts=pulumi.ResourceOptions(parent=self, additional_secret_outputs=["stdin"]),
        )
        self.stdout = push.stdout
        self.register_outputs({"stdout": self.stdout})
