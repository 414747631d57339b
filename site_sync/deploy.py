"""Deploy, roll back and inspect a fleet: gather every node's status, plan, then act in phases.

A deploy, in named phases (Capistrano's, with a plan first):
  gather    every node in parallel: wait for it (a new node may still be booting), take its
            deploy lease (a second deploy is told "busy"), read its status, and send it the
            manifest, to which it answers which files it lacks (it links what it already
            holds itself) - one exchange;
  plan      one pure plan for the fleet (site_sync.plan), printed; --dry-run stops here;
  stage     every node in parallel: only the files it lacks travel, with `finalize` itself
            when they are few (one exchange), else by rsync over the node's one SSH
            connection first; `finalize` verifies them; the certificate is installed where
            its leaf differs;
  publish   only when enough nodes staged (all, or --min-nodes): each node switches, prunes
            old releases and ends the lease in one exchange; a node that cannot switch makes
            the ones that did switch go back, so all nodes serve one release;
  verify    each node's health marker over HTTPS must name the new release.
A rollback is publish + verify to a release every node holds.
"""

from __future__ import annotations

import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from edgecdn.contract import MAX_INLINE_BYTES, NodeStatus, leaf_fingerprint, pack_inline
from site_sync.build import Release, prepare_release
from site_sync.cache import lease_token, open_cache
from site_sync.handoff import Handoff, NodeTarget
from site_sync.plan import FleetPlan, NodePlan, PlanError, plan_deploy, plan_rollback
from site_sync.probe import check_health
from site_sync.progress import PlainProgress, Progress
from site_sync.release import scan_site
from site_sync.transport import (
    Agent,
    AgentRefusedError,
    Credentials,
    TransportError,
    credentials,
    new_lease_token,
    with_retries,
)

KEEP_RELEASES = 3
MAX_PARALLEL = 16
LEASE_SECONDS = 900
T = TypeVar("T")


class DeployError(Exception):
    """The command did not complete; the message says which nodes and what they serve now.

    `changed` is False when every node serves what it served before the command.
    """

    def __init__(self, message: str, changed: bool = False, busy: bool = False) -> None:
        super().__init__(message)
        self.changed = changed
        self.busy = busy


@dataclass(frozen=True)
class DeployOptions:
    """How a deploy runs; the defaults are what `pulumi up` uses."""

    wait_seconds: float = 600
    ca_file: str | None = None
    seed: bool = False
    dry_run: bool = False
    min_nodes: int | None = None
    follow_external_symlinks: bool = False
    cache_dir: Path | None = None


@dataclass
class NodeReport:
    """What happened on one node."""

    name: str
    before: str | None = None
    after: str | None = None
    files_sent: int = 0
    bytes_sent: int = 0
    certificate_installed: bool = False
    error: str | None = None


@dataclass
class Report:
    """What a command did, per node: printed as a summary or as JSON."""

    command: str
    release: str | None
    outcome: str = "ok"  # ok, unchanged, dry-run, failed, partial
    plan: list[str] = field(default_factory=list)
    nodes: dict[str, NodeReport] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        return {
            "command": self.command,
            "release": self.release,
            "outcome": self.outcome,
            "plan": self.plan,
            "nodes": {name: vars(node) for name, node in sorted(self.nodes.items())},
        }


def _parallel(
    fn: Callable[[NodeTarget], T], nodes: tuple[NodeTarget, ...]
) -> tuple[dict[str, T], dict[str, Exception]]:
    results: dict[str, T] = {}
    errors: dict[str, Exception] = {}
    if not nodes:
        return results, errors
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(nodes))) as pool:
        futures = {node.name: pool.submit(fn, node) for node in nodes}
        for name, future in futures.items():
            try:
                results[name] = future.result()
            except (TransportError, AgentRefusedError, OSError) as exc:
                errors[name] = exc
    return results, errors


def _describe(errors: dict[str, Exception]) -> str:
    return "\n".join(f"  - {name}: {exc}" for name, exc in sorted(errors.items()))


@dataclass
class Fleet:
    """The nodes of one command, each with its agent over a shared connection."""

    handoff: Handoff
    creds: Credentials
    lease: str | None
    progress: Progress
    agents: dict[str, Agent] = field(default_factory=dict)
    needed: dict[str, list[str]] = field(default_factory=dict)  # from the gather, per node
    leased: set[str] = field(default_factory=set)  # nodes where this command holds the lease
    connecting: ThreadPoolExecutor | None = None

    def agent(self, node: NodeTarget) -> Agent:
        """The node's agent (one connection per node for the whole command)."""
        if node.name not in self.agents:
            self.agents[node.name] = Agent(node, self.creds, self.lease)
        return self.agents[node.name]

    def retried(self, node: NodeTarget, what: str, action: Callable[[], T]) -> T:
        """Run an action on a node, retrying transport failures with backoff."""
        return with_retries(action, f"{node.name}: {what}", self.progress.log)

    def gather(
        self, wait_seconds: float, begin: tuple[str, bytes] | None = None, holding: frozenset[str] = frozenset()
    ) -> dict[str, NodeStatus]:
        """Every node's status (after taking its lease); DeployError naming each node that failed.

        With `begin` (a release id and its manifest), each node also begins the upload and
        answers which files it lacks (kept in `needed`), except the nodes known to be `holding`
        that release already: they are sent no manifest.
        """

        def one(node: NodeTarget) -> NodeStatus:
            self.progress.node(node.name, "connecting")
            agent = self.agent(node)
            status = self._leased_status(agent, None if node.name in holding else begin) if self.lease else None
            if status is None:
                # A new node may still be booting: wait for it, then take the lease.
                status = agent.wait_until_ready(wait_seconds, self.progress.log)
                if self.lease:
                    self.retried(node, "lease", lambda: agent.call("lease", str(LEASE_SECONDS)))
                    self.leased.add(node.name)
            self.progress.node(node.name, f"ready, serves {status['active'] or 'nothing'}")
            return status

        statuses, errors = _parallel(one, self.handoff.nodes)
        if errors:
            busy = any(isinstance(e, AgentRefusedError) and e.code == "busy" for e in errors.values())
            raise DeployError(
                "could not start: nothing was changed on any node:\n" + _describe(errors), changed=False, busy=busy
            )
        return statuses

    def _leased_status(self, agent: Agent, begin: tuple[str, bytes] | None) -> NodeStatus | None:
        """Take the lease and read the status in one exchange; None when the node is not up yet."""
        words: tuple[str, ...] = ("lease", str(LEASE_SECONDS))
        manifest = b""
        if begin is not None:
            words, manifest = (*words, begin[0]), begin[1]
        try:
            answer = agent.call(*words, stdin=manifest)
        except TransportError:
            return None
        except AgentRefusedError as exc:
            if exc.code == "busy" or (begin is not None and exc.code != "refused"):
                raise
            return None  # a booting node's bootstrap agent takes only status and its bundle
        self.leased.add(agent.node.name)
        upload = answer.get("upload")
        if isinstance(upload, dict) and isinstance(upload.get("needed"), list):
            self.needed[agent.node.name] = [str(p) for p in upload["needed"]]
        return agent.status({"ok": True, **answer.get("status", {})})

    def connect_all(self) -> Callable[[], None]:
        """Open every node's connection in the background; the function returned waits for them.

        The SSH handshake (about eight round trips) then overlaps reading and hashing the site.
        """
        pool = ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, max(len(self.handoff.nodes), 1)))
        for node in self.handoff.nodes:
            pool.submit(self.agent(node).connect)
        self.connecting = pool
        return lambda: pool.shutdown(wait=True)

    def release_leases(self) -> None:
        """End the leases and close the connections (best effort: a lease also expires by itself)."""
        if self.connecting is not None:
            self.connecting.shutdown(wait=True)  # a connection opened after its close would linger

        def one(node: NodeTarget) -> None:
            agent = self.agents[node.name]
            if node.name in self.leased:
                with suppress(TransportError, AgentRefusedError):
                    agent.call("unlease", timeout=30)
                    self.leased.discard(node.name)
            agent.close()

        _parallel(one, tuple(n for n in self.handoff.nodes if n.name in self.agents))


@contextmanager
def fleet(handoff: Handoff, progress: Progress, lease: bool = True, cache_dir: Path | None = None) -> Iterator[Fleet]:
    """Credentials, connections and leases (unless only reading) for the length of one command."""
    no_lease: tuple[str | None, Callable[[bool], None]] = (None, lambda released: None)
    leasing = lease_token(cache_dir, new_lease_token) if lease else nullcontext(no_lease)
    with credentials(handoff.deploy_key, handoff.nodes) as creds, leasing as held:
        token, settle = held
        nodes = Fleet(handoff, creds, token, progress)
        try:
            yield nodes
        finally:
            nodes.release_leases()
            settle(not nodes.leased)


def _prepare(handoff: Handoff, site_dir: Path, options: DeployOptions, progress: Progress) -> Release:
    with open_cache(options.cache_dir) as cache:
        site = scan_site(site_dir, cache, options.follow_external_symlinks)
        for warning in site.warnings:
            progress.log(f"warning: {warning}")
        if site.left_out:
            shown = ", ".join(site.left_out[:5]) + (
                f" and {len(site.left_out) - 5} more" if len(site.left_out) > 5 else ""
            )
            progress.log(f"left out of the release (dotfiles are never published): {shown}")
        if site.release_id != handoff.release_id:
            raise DeployError(
                f"the site in {site_dir} is release {site.release_id}, but the deploy was planned for "
                f"{handoff.release_id}; the site changed since - run `pulumi up` again"
            )
        release = prepare_release(site, cache)
    progress.log(f"release {release.release_id}: {len(release.entries)} files, {release.total_bytes} bytes")
    return release


def deploy(
    handoff: Handoff, site_dir: Path, options: DeployOptions = DeployOptions(), progress: Progress | None = None
) -> Report:
    """Push the site and certificate to every node and switch them together (see the module header)."""
    progress = progress or PlainProgress(sys.stdout)
    chain = normalize_pem(handoff.certificate_chain)
    certificate = (normalize_pem(handoff.certificate_key) + chain).encode()
    with (
        fleet(handoff, progress, cache_dir=options.cache_dir) as nodes,
        tempfile.TemporaryDirectory(prefix="edgecdn-upload-") as upload_dir,
    ):
        connected = nodes.connect_all()
        release = _prepare(handoff, site_dir, options, progress)
        connected()
        report = Report("seed" if options.seed else "deploy", release.release_id)
        with open_cache(options.cache_dir) as cache:
            holding = frozenset(n.name for n in handoff.nodes if release.release_id in cache.releases_on(n.host_key))
        begin = None if options.dry_run else (release.release_id, release.manifest())
        statuses = nodes.gather(options.wait_seconds, begin, holding)
        _remember(options.cache_dir, handoff, {name: set(s["releases"]) for name, s in statuses.items()})
        for name, status in statuses.items():
            report.nodes[name] = NodeReport(name, before=status["active"], after=status["active"])
        try:
            plan = plan_deploy(
                handoff.nodes,
                statuses,
                release.release_id,
                leaf_fingerprint(chain),
                min_nodes=options.min_nodes,
                seed=options.seed,
            )
        except PlanError as exc:
            raise DeployError(str(exc)) from None
        report.plan = plan.describe()
        for line in report.plan:
            progress.log(line)
        if options.dry_run:
            report.outcome = "dry-run"
            return report
        if not plan.changes_anything:
            report.outcome = "unchanged"
            progress.log(f"every node already serves {release.release_id} with this certificate; nothing to do")
            return report
        _stage(nodes, plan, release, certificate, Path(upload_dir), report)
        staged = {p.node.name for p in plan.nodes if p.upload and report.nodes[p.node.name].error is None}
        _remember(
            options.cache_dir, handoff, {name: {*statuses[name]["releases"], release.release_id} for name in staged}
        )
        _publish(nodes, plan, release.release_id, report)
        touched = tuple(p.node for p in plan.nodes if report.nodes[p.node.name].error is None)
        _verify(nodes, touched, release.release_id, options.ca_file, report)
    if any(n.error for n in report.nodes.values()):
        report.outcome = "partial"
    return report


def _remember(cache_dir: Path | None, handoff: Handoff, held: dict[str, set[str]]) -> None:
    """Record what these nodes hold, so the next deploy of a release they hold sends no manifest."""
    keys = {n.name: n.host_key for n in handoff.nodes}
    with open_cache(cache_dir) as cache:
        for name, releases in held.items():
            cache.remember_releases(keys[name], releases)


def _stage(
    nodes: Fleet, plan: FleetPlan, release: Release, certificate: bytes, upload_dir: Path, report: Report
) -> None:
    manifest = release.manifest()
    sizes = {e["path"]: e["size"] for e in release.entries}

    def stage(node: NodeTarget) -> None:
        node_plan = next(p for p in plan.nodes if p.node is node)
        agent = nodes.agent(node)
        if node_plan.upload:
            nodes.progress.node(node.name, "comparing")
            needed = nodes.needed.get(node.name)
            if needed is None:  # a node that was still booting at the gather
                answer = nodes.retried(node, "begin", lambda: agent.call("begin", release.release_id, stdin=manifest))
                needed = [str(p) for p in answer.get("needed", [])]
            inline = b""
            if sum(sizes[p] for p in needed) <= MAX_INLINE_BYTES:
                # Few bytes: they go with finalize itself, one exchange instead of an rsync session.
                inline = pack_inline((p, release.sources[p].read_bytes()) for p in needed)
            elif needed:
                nodes.progress.node(node.name, f"uploading {len(needed)} files")
                source = upload_dir / node.name
                release.link_tree(needed, source)
                nodes.retried(node, "upload", lambda: agent.upload(source, release.release_id, needed))
            report.nodes[node.name].files_sent = len(needed)
            report.nodes[node.name].bytes_sent = sum(sizes[p] for p in needed)
            nodes.progress.node(node.name, f"verifying ({len(needed)} files sent)" if inline else "verifying")
            nodes.retried(
                node, "finalize", lambda: agent.call("finalize", release.release_id, stdin=inline, timeout=600)
            )
        if node_plan.install_certificate:
            nodes.retried(node, "install-cert", lambda: agent.call("install-cert", stdin=certificate))
            report.nodes[node.name].certificate_installed = True
        nodes.progress.node(node.name, "staged")

    _, errors = _parallel(stage, tuple(p.node for p in plan.nodes))
    for name, exc in errors.items():
        report.nodes[name].error = f"staging failed: {exc}"
        nodes.progress.node(name, "staging failed")
    staged = len(plan.nodes) - len(errors)
    if staged < plan.required:
        report.outcome = "failed"
        raise DeployError(
            f"staging failed on {len(errors)} of {len(plan.nodes)} nodes, so no node was switched; every node "
            f"still serves what it served before (running the deploy again resumes it):\n{_describe(errors)}"
        )
    if errors:
        nodes.progress.log(f"{staged} of {len(plan.nodes)} nodes staged (at least {plan.required} required); going on")


def _publish(nodes: Fleet, plan: FleetPlan, release_id: str, report: Report) -> None:
    """Switch every node that staged (switch, prune and end the lease in one exchange each)."""
    switching = tuple(p.node for p in plan.nodes if p.activate and report.nodes[p.node.name].error is None)

    def publish(node: NodeTarget) -> None:
        nodes.progress.node(node.name, "activating")
        answer = nodes.retried(
            node, "publish", lambda: nodes.agent(node).call("publish", release_id, str(KEEP_RELEASES))
        )
        nodes.leased.discard(node.name)
        report.nodes[node.name].after = release_id
        nodes.progress.node(node.name, f"serves {release_id}")
        if "prune_error" in answer:
            nodes.progress.log(
                f"{node.name}: pruning old releases failed ({answer['prune_error']}); the next deploy tries again"
            )

    _, errors = _parallel(publish, switching)
    if not errors:
        return
    for name, exc in errors.items():
        report.nodes[name].error = f"activation failed: {exc}"
    switched = [p for p in plan.nodes if p.node.name not in errors and report.nodes[p.node.name].after == release_id]
    left = _restore(nodes, [p for p in switched if p.activate], report)
    report.outcome = "partial" if left else "failed"
    outcome = (
        f"these nodes serve {release_id} and could not go back: {', '.join(left)}"
        if left
        else "every node that had switched went back to its previous release"
    )
    raise DeployError(f"activation failed:\n{_describe(errors)}\n{outcome}", changed=bool(left))


def _restore(nodes: Fleet, plans: list[NodePlan], report: Report) -> list[str]:
    """Switch nodes that did activate back to what they served; the names that could not go back."""
    left = []
    for plan in plans:
        name = plan.node.name
        if not plan.was_active:
            left.append(f"{name} (it served nothing before)")
            continue
        was = plan.was_active
        try:
            nodes.retried(plan.node, "switch back", partial(nodes.agent(plan.node).call, "activate", was))
            report.nodes[name].after = was
            nodes.progress.node(name, f"back on {was}")
        except (TransportError, AgentRefusedError) as exc:
            nodes.progress.log(f"{name}: could not switch back to {was}: {exc}")
            left.append(name)
    return left


def _verify(
    nodes: Fleet, touched: tuple[NodeTarget, ...], release_id: str, ca_file: str | None, report: Report
) -> None:
    domain = nodes.handoff.domain

    def verify(node: NodeTarget) -> str | None:
        return check_health(node.address, domain, release_id, node.https_port, ca_file)

    problems, _ = _parallel(verify, touched)
    failing = {name: problem for name, problem in problems.items() if problem}
    for name, problem in failing.items():
        report.nodes[name].error = f"health check failed: {problem}"
    for node in touched:
        if node.name not in failing:
            nodes.progress.node(node.name, f"healthy, serves {release_id}")
    if failing:
        report.outcome = "partial"
        raise DeployError(
            "the release is active but these nodes fail their health check:\n"
            + "\n".join(f"  - {n}: {p}" for n, p in sorted(failing.items())),
            changed=True,
        )
    nodes.progress.log(f"all {len(touched)} nodes healthy over HTTPS as {domain}, serving {release_id}")


def rollback(
    handoff: Handoff, to: str | None, options: DeployOptions = DeployOptions(), progress: Progress | None = None
) -> Report:
    """Every node back to the previous (or the named) release: no upload, checked on every node first."""
    progress = progress or PlainProgress(sys.stdout)
    with fleet(handoff, progress, cache_dir=options.cache_dir) as nodes:
        statuses = nodes.gather(options.wait_seconds)
        try:
            plan = plan_rollback(handoff.nodes, statuses, to)
        except PlanError as exc:
            raise DeployError(str(exc)) from None
        report = Report("rollback", plan.target, plan=plan.describe())
        for name, status in statuses.items():
            report.nodes[name] = NodeReport(name, before=status["active"], after=status["active"])
        for line in report.plan:
            progress.log(line)
        if options.dry_run:
            report.outcome = "dry-run"
            return report
        fleet_plan = FleetPlan(plan.target, plan.nodes, (), len(plan.nodes))
        _publish(nodes, fleet_plan, plan.target, report)
        _verify(nodes, handoff.nodes, plan.target, options.ca_file, report)
    return report


@dataclass(frozen=True)
class FleetStatus:
    """What every node serves and holds, and whether they agree."""

    statuses: dict[str, NodeStatus]
    unreachable: dict[str, str]

    @property
    def agree(self) -> bool:
        """One release, intact, on every node, and every node answered."""
        actives = {s["active"] for s in self.statuses.values()}
        intact = all(s["intact"] for s in self.statuses.values())
        return not self.unreachable and len(actives) == 1 and None not in actives and intact

    def rows(self) -> list[dict[str, Any]]:
        """One row per node, for a table or JSON."""
        rows: list[dict[str, Any]] = []
        for name, s in sorted(self.statuses.items()):
            cert = s["certificate"]
            rows.append(
                {
                    "node": name,
                    "active": s["active"],
                    "intact": s["intact"],
                    "previous": s["previous"],
                    "releases": s["releases"],
                    "certificate_expires": cert["not_after"] if cert else None,
                }
            )
        rows += [{"node": name, "error": error} for name, error in sorted(self.unreachable.items())]
        return rows


def fleet_status(handoff: Handoff, wait_seconds: float = 30, progress: Progress | None = None) -> FleetStatus:
    """Every node's status (no lease: reading never blocks a deploy)."""
    progress = progress or PlainProgress(sys.stderr)
    with fleet(handoff, progress, lease=False) as nodes:
        statuses, errors = _parallel(
            lambda node: nodes.agent(node).wait_until_ready(wait_seconds, progress.log), handoff.nodes
        )
    return FleetStatus(statuses, {name: str(exc) for name, exc in errors.items()})


PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z ]+)-----\r?\n[A-Za-z0-9+/=\r\n]+-----END \1-----")


def normalize_pem(text: str) -> str:
    """PEM blocks one after another, each ending in one newline, as a node stores them."""
    return "".join(m.group(0) + "\n" for m in PEM_BLOCK.finditer(text))
