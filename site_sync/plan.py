"""Planning a deploy or a rollback: pure functions from every node's status to what each needs.

Nothing here talks to a node. `deploy` gathers the statuses, asks for a plan, prints it, and
only then carries it out (or stops there with --dry-run).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgecdn.contract import NodeStatus
from site_sync.handoff import NodeTarget


class PlanError(Exception):
    """No safe plan exists; the message says why and what to do."""


@dataclass(frozen=True)
class NodePlan:
    """What one node needs for this deploy."""

    node: NodeTarget
    upload: bool
    install_certificate: bool
    activate: bool
    was_active: str | None

    @property
    def steps(self) -> list[str]:
        """The phases this node takes part in, for the printed plan."""
        steps = ["upload" if self.upload else "already holds the release"]
        if self.install_certificate:
            steps.append("install certificate")
        steps.append(f"activate (now {self.was_active or 'nothing'})" if self.activate else "already serves it")
        return steps


@dataclass(frozen=True)
class FleetPlan:
    """The plan for every node, and how many must stage before any switches."""

    release_id: str
    nodes: tuple[NodePlan, ...]
    skipped: tuple[str, ...]  # nodes left alone (a seed skips nodes that serve already)
    required: int  # nodes that must stage before any activates

    @property
    def changes_anything(self) -> bool:
        """Whether carrying it out changes any node."""
        return any(p.upload or p.install_certificate or p.activate for p in self.nodes)

    def describe(self) -> list[str]:
        """The plan as lines for a person."""
        lines = [f"plan for release {self.release_id}:"]
        lines += [f"  {p.node.name}: {', '.join(p.steps)}" for p in self.nodes]
        lines += [
            f"  {name}: left alone (it already serves a release; a seed only fills new nodes)" for name in self.skipped
        ]
        if len(self.nodes) > 1:
            lines.append(f"  switch only when {self.required} of {len(self.nodes)} nodes have staged it")
        return lines


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


def plan_deploy(
    nodes: tuple[NodeTarget, ...],
    statuses: dict[str, NodeStatus],
    release_id: str,
    certificate_fingerprint: str,
    *,
    min_nodes: int | None = None,
    seed: bool = False,
) -> FleetPlan:
    """One plan for the fleet: per node what it lacks, and how many must stage before any switch."""
    chosen = [n for n in nodes if not (seed and statuses[n.name]["active"])]
    skipped = tuple(n.name for n in nodes if n not in chosen)
    plans = [plan_node(node, statuses[node.name], release_id, certificate_fingerprint) for node in chosen]
    required = len(plans) if min_nodes is None else min_nodes
    if not 1 <= required <= max(len(plans), 1):
        raise PlanError(f"--min-nodes must be between 1 and {len(plans)} (the nodes this deploy touches)")
    return FleetPlan(release_id, tuple(plans), skipped, required)


@dataclass(frozen=True)
class RollbackPlan:
    """Where each node goes back to."""

    target: str
    nodes: tuple[NodePlan, ...]

    def describe(self) -> list[str]:
        """The plan as lines for a person."""
        return [f"roll back to release {self.target}:"] + [
            f"  {p.node.name}: {'activate (now ' + str(p.was_active) + ')' if p.activate else 'already serves it'}"
            for p in self.nodes
        ]


def plan_rollback(nodes: tuple[NodeTarget, ...], statuses: dict[str, NodeStatus], to: str | None) -> RollbackPlan:
    """Every node back to one release: the named one, or the previous one they all agree on.

    Refused unless every node holds the target intact, so a rollback never leaves the fleet split.
    """
    if to is None:
        previous = {statuses[n.name]["previous"] for n in nodes}
        actives = {statuses[n.name]["active"] for n in nodes}
        if len(actives) == 1 and len(previous) == 1 and None not in previous:
            to = previous.pop()
        else:
            raise PlanError(
                "the nodes do not agree on one current and one previous release; name the release with --to "
                "(`python -m site_sync status` lists what each node holds)"
            )
    assert to is not None
    missing = [n.name for n in nodes if to not in statuses[n.name]["releases"]]
    if missing:
        raise PlanError(f"release {to} is not on {', '.join(missing)}; deploy it instead, or pick one they all hold")
    plans = tuple(
        NodePlan(n, False, False, statuses[n.name]["active"] != to, statuses[n.name]["active"]) for n in nodes
    )
    return RollbackPlan(to, plans)
