"""The deploy: stage the release and the certificate on every node, then switch them all.

Plan first (pure): from each node's status, decide what it needs. Then carry it out:
  1. stage: upload + finalize the release and install the certificate where needed, all nodes
     in parallel; a node that fails here leaves every node serving what it served before;
  2. activate: only when every node has the release staged; a node that fails to switch makes
     the ones that did switch go back to their previous release;
  3. verify: each node's health check over HTTPS must name the new release.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from edgecdn.contract import NodeStatus, leaf_fingerprint
from site_sync.build import build_release
from site_sync.handoff import Handoff, NodeTarget
from site_sync.probe import check_health
from site_sync.release import left_out_paths
from site_sync.transport import Agent, AgentRefusedError, Credentials, TransportError, credentials

KEEP_RELEASES = 3
MAX_PARALLEL = 8


class DeployError(Exception):
    """The deploy did not complete; the message says which nodes and what they serve now."""

    def __init__(self, message: str, partial: bool = False) -> None:
        super().__init__(message)
        self.partial = partial


@dataclass(frozen=True)
class NodePlan:
    """What one node needs for this deploy."""

    node: NodeTarget
    upload: bool
    install_certificate: bool
    activate: bool
    was_active: str | None


def plan_node(node: NodeTarget, status: NodeStatus, release_id: str, certificate_fingerprint: str) -> NodePlan:
    """Decide the steps for a node from its reported status."""
    certificate = status["certificate"]
    return NodePlan(
        node=node,
        upload=release_id not in status["releases"],
        install_certificate=certificate is None or certificate["fingerprint"] != certificate_fingerprint,
        activate=status["active"] != release_id,
        was_active=status["active"],
    )


@dataclass
class DeployResult:
    """What happened, per node."""

    release_id: str
    plans: list[NodePlan] = field(default_factory=list)


def _parallel(fn: Callable[[NodeTarget], object], nodes: tuple[NodeTarget, ...]) -> dict[str, BaseException]:
    errors: dict[str, BaseException] = {}
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(nodes))) as pool:
        futures = {node.name: pool.submit(fn, node) for node in nodes}
        for name, future in futures.items():
            exc = future.exception()
            if exc is not None:
                errors[name] = exc
    return errors


def _describe(errors: dict[str, BaseException]) -> str:
    return "\n".join(f"  - {name}: {exc}" for name, exc in sorted(errors.items()))


def deploy(
    handoff: Handoff,
    site_dir: Path,
    *,
    wait_seconds: float = 600,
    ca_file: str | None = None,
    log: Callable[[str], None] = print,
    seed: bool = False,
) -> DeployResult:
    """Push the site and certificate to every node and switch them together.

    With `seed`, only nodes that serve nothing yet are deployed to (a new or replaced node,
    before it takes its address); a node that already serves a release is left as it is.
    """
    chain = normalize_pem(handoff.certificate_chain)
    fingerprint = leaf_fingerprint(chain)
    certificate = normalize_pem(handoff.certificate_key) + chain
    with (
        tempfile.TemporaryDirectory(prefix="edgecdn-release-") as build_dir,
        credentials(handoff.deploy_key, handoff.nodes) as creds,
    ):
        release = build_release(site_dir, Path(build_dir))
        if release.release_id != handoff.release_id:
            raise DeployError(
                f"the site in {site_dir} is release {release.release_id}, but the deploy was planned for "
                f"{handoff.release_id}; the site changed since - run `pulumi up` again"
            )
        result = DeployResult(release.release_id)
        log(f"release {release.release_id}: {len(release.entries)} files, {len(handoff.nodes)} nodes")
        left_out = left_out_paths(site_dir)
        if left_out:
            shown = ", ".join(left_out[:5]) + (f" and {len(left_out) - 5} more" if len(left_out) > 5 else "")
            log(f"  left out of the release (dotfiles are never published): {shown}")
        plans: dict[str, NodePlan] = {}

        def stage(node: NodeTarget) -> None:
            agent = Agent(node, creds)
            status = agent.wait_until_ready(wait_seconds, log)
            if seed and status["active"]:
                log(f"  {node.name}: already serves {status['active']}; a seed leaves it alone")
                return
            plan = plan_node(node, status, release.release_id, fingerprint)
            plans[node.name] = plan
            if plan.upload:
                agent.call("begin", release.release_id, str(sum(e.size for e in release.entries)))
                agent.upload(release.root, release.release_id)
                agent.call("finalize", release.release_id, stdin=release.manifest_json().encode())
            if plan.install_certificate:
                agent.call("install-cert", stdin=certificate.encode())
            log(
                f"  {node.name}: staged ({'uploaded' if plan.upload else 'already there'}"
                f"{', certificate installed' if plan.install_certificate else ''})"
            )

        errors = _parallel(stage, handoff.nodes)
        if errors:
            raise DeployError(
                "staging failed, so no node was switched; every node still serves what it served before:\n"
                + _describe(errors)
            )

        def activate(node: NodeTarget) -> None:
            if node.name in plans and plans[node.name].activate:
                Agent(node, creds).call("activate", release.release_id)

        errors = _parallel(activate, handoff.nodes)
        if errors:
            left = _restore(plans, errors, creds, log)
            outcome = (
                f"these nodes now serve {release.release_id} and could not go back: {', '.join(left)}"
                if left
                else "every node that had switched went back to its previous release"
            )
            raise DeployError(f"activation failed:\n{_describe(errors)}\n{outcome}", partial=bool(left))
        touched = tuple(node for node in handoff.nodes if node.name in plans)
        log(f"  {len(touched)} of {len(handoff.nodes)} nodes serve {release.release_id}")

        for node in touched:
            try:
                Agent(node, creds).call("prune", str(KEEP_RELEASES))
            except (TransportError, AgentRefusedError) as exc:
                log(f"  {node.name}: pruning old releases failed ({exc}); the next deploy tries again")

        problems = {
            node.name: problem
            for node in touched
            if (problem := check_health(node.address, handoff.domain, release.release_id, node.https_port, ca_file))
        }
        if problems:
            raise DeployError(
                "the release is active but these nodes fail their health check:\n"
                + "\n".join(f"  - {n}: {p}" for n, p in sorted(problems.items())),
                partial=True,
            )
        log(f"  all nodes healthy over HTTPS as {handoff.domain}")
        result.plans = list(plans.values())
        return result


PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z ]+)-----\r?\n[A-Za-z0-9+/=\r\n]+-----END \1-----")


def normalize_pem(text: str) -> str:
    """PEM blocks one after another, each ending in one newline, as a node stores them."""
    return "".join(m.group(0) + "\n" for m in PEM_BLOCK.finditer(text))


def _restore(
    plans: dict[str, NodePlan], failed: dict[str, BaseException], creds: Credentials, log: Callable[[str], None]
) -> list[str]:
    """Switch nodes that did activate back to what they served; the names that could not go back."""
    left = []
    for name, plan in sorted(plans.items()):
        if name in failed or not plan.activate:
            continue
        if not plan.was_active:
            left.append(f"{name} (it served nothing before)")
            continue
        try:
            Agent(plan.node, creds).call("activate", plan.was_active)
        except (TransportError, AgentRefusedError) as exc:
            log(f"  {name}: could not switch back to {plan.was_active}: {exc}")
            left.append(name)
    return left
