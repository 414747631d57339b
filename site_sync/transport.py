"""Talking to a node's deploy agent: ssh and rsync as argv lists, host keys pinned.

One SSH connection per node per command: the first call opens an OpenSSH ControlMaster in
the deploy's private temporary directory, and every later call and upload rides on it, so
each costs one or two round trips instead of a new handshake. The deploy key lives in that
directory for the length of the command and is never put on a command line; the only host
key accepted for a node is the one in the handoff. Transport failures (no answer, a dropped
connection) are retried with backoff a bounded number of times; a refusal never is.
"""

from __future__ import annotations

import json
import secrets
import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from edgecdn.contract import LEASE_PREFIX, NodeStatus, StatusError, parse_status
from site_sync.handoff import NodeTarget

Answer = dict[str, Any]  # an agent's JSON answer
T = TypeVar("T")

SSH_CONNECT_TIMEOUT = 10
COMMAND_TIMEOUT = 120
UPLOAD_TIMEOUT = 1800
RETRY_DELAYS = (1.0, 3.0, 9.0)  # seconds before each retry of a transport failure
# Already-compressed formats rsync should not compress again on the wire.
SKIP_COMPRESS = "br/gz/woff/woff2/png/jpg/jpeg/gif/webp/avif/mp4/webm/mp3/ogg/zip/zst/xz/bz2/7z/pdf/ico"

# What a booting node's bootstrap agent reports when the bundle it was sent did not install.
BUNDLE_FAILURES = {
    "refused": "the node refused its bundle: the digest is not the one its user data pins "
    "(the deployer and the stack come from different edgecdn versions; run `pulumi up`)",
    "failed": "the node could not install its bundle; `journalctl -u edgecdn-bundle` on the node says why",
}


class TransportError(Exception):
    """The node could not be reached, or the connection broke; retrying may help."""


class AgentRefusedError(Exception):
    """The agent answered and said no; retrying will not help."""

    def __init__(self, node: str, verb: str, message: str, code: str = "refused") -> None:
        super().__init__(f"{node}: {verb} refused: {message}")
        self.message = message
        self.code = code  # the agent's reason: refused, busy, quota, integrity, missing, reload, ...


@dataclass(frozen=True)
class Credentials:
    """Paths of the deploy key, the pinned known_hosts file and the connection sockets."""

    key_file: Path
    known_hosts: Path
    control_dir: Path | None = None


def known_hosts_line(node: NodeTarget) -> str:
    """The node's pinned host key as a known_hosts line."""
    host = node.address if node.port == 22 else f"[{node.address}]:{node.port}"
    return f"{host} {node.host_key}\n"


@contextmanager
def credentials(deploy_key: str, nodes: Sequence[NodeTarget]) -> Iterator[Credentials]:
    """Write the key and the pinned host keys to a 0700 temporary directory, removed after."""
    with tempfile.TemporaryDirectory(prefix="edgecdn-deploy-") as tmp:
        key_file = Path(tmp) / "deploy_key"
        key_file.touch(mode=0o600)
        key_file.write_text(deploy_key if deploy_key.endswith("\n") else deploy_key + "\n")
        known_hosts = Path(tmp) / "known_hosts"
        known_hosts.write_text("".join(known_hosts_line(n) for n in nodes))
        yield Credentials(key_file, known_hosts, Path(tmp))


def ssh_options(creds: Credentials, node: NodeTarget) -> list[str]:
    """ssh options: only our key, only the pinned host key, never a prompt, one shared connection."""
    shared = (
        [
            "-o", "ControlMaster=auto",
            # %C: a hash of the connection's host, port and user; short enough for a socket path.
            "-o", f"ControlPath={creds.control_dir}/cm-%C",
            "-o", "ControlPersist=120",
        ]
        if creds.control_dir is not None
        else []
    )  # fmt: skip
    return [
        "ssh",
        "-F", "/dev/null",
        "-i", str(creds.key_file),
        "-o", "IdentitiesOnly=yes",
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={creds.known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "HostKeyAlgorithms=ssh-ed25519",
        "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT}",
        "-o", "ServerAliveInterval=15",
        "-o", "LogLevel=ERROR",
        *shared,
        "-p", str(node.port),
        "-l", node.user,
    ]  # fmt: skip


def new_lease_token() -> str:
    """A deploy's lease token: random, never reused."""
    return secrets.token_hex(16)


def with_retries(
    action: Callable[[], T], what: str, log: Callable[[str], None], delays: Sequence[float] = RETRY_DELAYS
) -> T:
    """Run action; on a TransportError wait and try again, at most len(delays) more times."""
    for attempt, delay in enumerate([*delays, None]):
        try:
            return action()
        except TransportError as exc:
            if delay is None:
                raise
            log(f"{what}: {exc}; retry {attempt + 1} of {len(delays)} in {delay:.0f} s")
            time.sleep(delay)
    raise AssertionError("unreachable")


class Agent:
    """One node's deploy agent, over this command's shared connection."""

    def __init__(self, node: NodeTarget, creds: Credentials, lease: str | None = None) -> None:
        self.node = node
        self.creds = creds
        self.lease = lease

    def call(self, *words: str, stdin: bytes = b"", timeout: float = COMMAND_TIMEOUT, leased: bool = True) -> Answer:
        """Run one agent verb once; the JSON answer, AgentRefusedError, or TransportError.

        Reads (`status`) and a booting node's bootstrap agent take no lease: `leased=False`.
        """
        request = [f"{LEASE_PREFIX}{self.lease}", *words] if self.lease and leased else list(words)
        argv = [*ssh_options(self.creds, self.node), self.node.address, "--", *request]
        try:
            result = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise TransportError(f"{self.node.name}: {words[0]} took longer than {timeout:.0f} s") from None
        answer = _json_line(result.stdout)
        if answer is None:
            detail = result.stderr.decode(errors="replace").strip() or f"ssh exit status {result.returncode}"
            raise TransportError(f"{self.node.name} ({self.node.address}): {detail.splitlines()[-1][:300]}")
        if not answer.get("ok"):
            message, code = str(answer.get("message", "no reason given")), str(answer.get("error", "refused"))
            raise AgentRefusedError(self.node.name, words[0], message, code)
        return answer

    def status(self, answer: Answer | None = None) -> NodeStatus:
        """The node's status in the contract's shape (asked for, unless an answer is given)."""
        try:
            return parse_status(self.call("status", timeout=30, leased=False) if answer is None else answer)
        except StatusError as exc:
            raise AgentRefusedError(self.node.name, "status", str(exc)) from None

    def wait_until_ready(self, seconds: float, log: Callable[[str], None] = lambda line: None) -> NodeStatus:
        """Poll `status` until the deploy agent answers; hand a booting node its bundle on the way.

        A new node may still be booting (SSH not up yet), or answer through its bootstrap agent
        until it has installed the node bundle that its user data pins.
        """
        deadline = time.monotonic() + seconds
        delay = 2.0
        sent_bundle = False
        last = "no answer yet"
        while True:
            try:
                status = self.call("status", timeout=30, leased=False)
                if not status.get("bootstrapping"):
                    return self.status(status)
                state = status.get("bundle")
                last = f"bootstrapping, bundle {state}"
                if sent_bundle and state in BUNDLE_FAILURES:
                    raise AgentRefusedError(self.node.name, "install-bundle", BUNDLE_FAILURES[str(state)])
                if state in ("waiting", *BUNDLE_FAILURES) and not sent_bundle:
                    if self.node.bundle is None:
                        raise AgentRefusedError(
                            self.node.name, "status", "the node waits for its bundle, but the handoff carries none"
                        )
                    self.call("install-bundle", stdin=self.node.bundle, timeout=60, leased=False)
                    sent_bundle = True
                    log(f"{self.node.name}: node bundle sent; the node installs it")
                    delay = 2.0
            except TransportError as exc:
                last = str(exc)
            if time.monotonic() + delay > deadline:
                raise TransportError(f"{self.node.name}: not ready after {seconds:.0f} s; last seen: {last}")
            log(f"{self.node.name}: waiting for the node ({last}); {deadline - time.monotonic():.0f} s left")
            time.sleep(delay)
            delay = min(delay * 1.5, 15.0)

    def upload(self, source: Path, release_id: str, paths: list[str]) -> None:
        """rsync these paths (relative to source, links followed) into the node's staging area."""
        remote_host = f"[{self.node.address}]" if ":" in self.node.address else self.node.address
        argv = [
            "rsync", "--files-from=-", "--from0", "--copy-links", "--chmod=D755,F644", "--timeout=60",
            "--compress", f"--skip-compress={SKIP_COMPRESS}",
            "-e", shlex.join(ssh_options(self.creds, self.node)),
            f"{source}/", f"{remote_host}:{release_id}/",
        ]  # fmt: skip
        listing = b"".join(p.encode() + b"\0" for p in paths)
        try:
            result = subprocess.run(argv, input=listing, capture_output=True, timeout=UPLOAD_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise TransportError(f"{self.node.name}: upload took longer than {UPLOAD_TIMEOUT} s") from None
        if result.returncode != 0:
            refused = _json_line(result.stdout)
            if refused is not None and not refused.get("ok"):
                raise AgentRefusedError(self.node.name, "upload", str(refused.get("message")))
            detail = result.stderr.decode(errors="replace").strip().splitlines()
            raise TransportError(f"{self.node.name}: upload failed: {(detail or ['rsync failed'])[-1][:300]}")

    def connect(self) -> None:
        """Open the shared connection ahead of the first request (no command runs); errors are left to it."""
        if self.creds.control_dir is None:
            return
        # -f: ssh goes to the background once authenticated, as the master; its output goes nowhere,
        # since a pipe it held open would keep this call waiting for as long as the master lives.
        argv = [*ssh_options(self.creds, self.node), "-N", "-f", self.node.address]
        quiet = subprocess.DEVNULL
        with suppress(subprocess.TimeoutExpired):
            subprocess.run(argv, stdin=quiet, stdout=quiet, stderr=quiet, timeout=2 * SSH_CONNECT_TIMEOUT, check=False)

    def close(self) -> None:
        """Close the shared connection, if one is open."""
        if self.creds.control_dir is None:
            return
        argv = [*ssh_options(self.creds, self.node), "-O", "exit", self.node.address]
        subprocess.run(argv, capture_output=True, timeout=15, check=False)


def _json_line(stdout: bytes) -> Answer | None:
    for line in reversed(stdout.decode(errors="replace").strip().splitlines()):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                return None
            return value if isinstance(value, dict) else None
    return None
