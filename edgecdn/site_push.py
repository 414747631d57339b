"""Pushing the site from `pulumi up`: the fleet-wide deploy, and the seed of one new node.

Each push is one local command that runs `python -m site_sync`. Its secrets (the deploy key,
the TLS key) travel only in the handoff document on stdin; argv and environment carry none, so
its output can be shown in `pulumi up`. Nothing runs during preview.

The command line, the site path in the handoff and the working directory are the same on every
machine: a `pulumi up` from CI after one from a laptop does not re-run an unchanged deploy. With
no `dir`, pulumi-command runs the command in the provider's working directory, the Pulumi
project's (provider/pkg/provider/local/commandOutputs.go: `cmd.Dir, err = os.Getwd()`).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import pulumi
import pulumi_command as command

from edgecdn.node.files import DEPLOY_USER, SSH_PORT
from site_sync.handoff import NodeTarget, build_handoff


@dataclass(frozen=True)
class PushArgs:
    """What to push (the release, the certificate) and the key that may push it."""

    domain: str
    release_id: str
    site_dir: str  # relative to the project directory when the site is inside it
    deploy_private_key: pulumi.Input[str]
    certificate_chain: pulumi.Input[str]
    certificate_key: pulumi.Input[str]
    aliases: tuple[str, ...] = ()
    follow_external_symlinks: bool = False


@dataclass(frozen=True)
class PushNode:
    """A node's address and identity, as the deployer needs them."""

    name: str
    region: str
    ipv4: pulumi.Input[str]
    host_public_key: pulumi.Input[str]
    instance_id: pulumi.Input[str]
    bundle: bytes | None = None


# The Python of Pulumi.yaml's `virtualenv`, relative to the project, as the command line must
# not depend on the machine (a test checks that the two agree).
DEPLOYER_PYTHON = "venv/bin/python"


def site_path_for_handoff(site_dir: Path, project_dir: Path) -> str:
    """The site's path as the handoff carries it: relative to the project when inside it."""
    try:
        return site_dir.resolve().relative_to(project_dir.resolve()).as_posix()
    except ValueError:
        return str(site_dir)


def deployer_command(verb: str) -> str:
    """The command line: no secrets, only where the handoff document comes from."""
    return shlex.join([DEPLOYER_PYTHON, "-m", "site_sync", verb, "--handoff", "-"])


def node_entry(node: PushNode, resolved: dict[str, str]) -> NodeTarget:
    """A node's handoff entry once its address and host key are known."""
    return NodeTarget(
        name=node.name,
        region=node.region,
        address=resolved["address"],
        port=SSH_PORT,
        user=DEPLOY_USER,
        host_key=resolved["host_key"].strip(),
        bundle=node.bundle,
    )


def handoff_document(args: PushArgs, nodes: list[NodeTarget], secrets: dict[str, Any]) -> str:
    """The handoff from resolved node entries and secrets."""
    return build_handoff(
        domain=args.domain,
        aliases=args.aliases,
        release_id=args.release_id,
        site_dir=args.site_dir,
        nodes=nodes,
        deploy_key=secrets["deploy_key"],
        certificate_chain=secrets["chain"],
        certificate_key=secrets["key"],
        follow_external_symlinks=args.follow_external_symlinks,
    )


def handoff_output(args: PushArgs, nodes: list[PushNode]) -> pulumi.Output[str]:
    """The handoff document for these nodes, as a secret."""
    entries = [
        pulumi.Output.all(address=n.ipv4, host_key=n.host_public_key).apply(partial(node_entry, n)) for n in nodes
    ]
    handoff = pulumi.Output.all(
        nodes=pulumi.Output.all(*entries),
        deploy_key=args.deploy_private_key,
        chain=args.certificate_chain,
        key=args.certificate_key,
    ).apply(lambda v: handoff_document(args, list(v["nodes"]), v))
    return cast(pulumi.Output[str], pulumi.Output.secret(handoff))


def push_command(
    name: str, verb: str, handoff: pulumi.Output[str], triggers: list[Any], opts: pulumi.ResourceOptions
) -> command.local.Command:
    """A local command that runs the deployer with this handoff on stdin."""
    return command.local.Command(
        name,
        create=deployer_command(verb),
        stdin=handoff,
        triggers=triggers,
        # The deployer prints no secret (the handoff is its only secret input), so a user sees
        # its progress in `pulumi up`.
        logging=command.local.Logging.STDOUT_AND_STDERR,
        add_previous_output_in_env=False,
        opts=pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(additional_secret_outputs=["stdin"])),
    )


@dataclass(frozen=True)
class SitePushArgs:
    """The fleet-wide deploy: what to push, and every node at its static address."""

    push: PushArgs
    nodes: tuple[PushNode, ...]


class SitePush(pulumi.ComponentResource):
    """The deploy, run by `pulumi up` after every node holds its address."""

    stdout: pulumi.Output[str]
    handoff: pulumi.Output[str]

    def __init__(self, name: str, args: SitePushArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("edgecdn:index:SitePush", name, None, opts)
        identities = [[n.name, n.ipv4, n.host_public_key, n.instance_id] for n in args.nodes]
        # A secret: it holds the deploy key. `pulumi stack output --show-secrets handoff` gives it
        # to `python -m site_sync status|rollback --handoff -` on a user's machine.
        self.handoff = handoff_output(args.push, list(args.nodes))
        push = push_command(
            f"{name}-deploy",
            "deploy",
            self.handoff,
            # Replaced (so run again) when the release, the certificate or any node changes.
            [args.push.release_id, args.push.certificate_chain, identities],
            pulumi.ResourceOptions(parent=self),
        )
        self.stdout = push.stdout
        self.register_outputs({"stdout": self.stdout, "handoff": self.handoff})
