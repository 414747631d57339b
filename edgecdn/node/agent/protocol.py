"""The deploy agent's protocol: the verb table, the checks every request passes, and `main`.

The agent is the only program a node's deploy key may run (sshd's forced command). A request
arrives in SSH_ORIGINAL_COMMAND, or in argv when run locally by root's bootstrap or the lab.
Every verb and argument is checked against the table below before anything runs; no shell is
ever involved. State-changing verbs run one at a time under a lock; a verb's standard input is
read, bounded in size and time, before the lock is taken, so no client can hold a node. Each
request ends in one JSON answer, a distinct exit code and one audit line in the system journal;
never in a traceback.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import select
import shlex
import syslog
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from edgecdn.contract import (
    KEEP_RANGE,
    LEASE_PREFIX,
    LEASE_TOKEN,
    MAX_CERT_BYTES,
    MAX_INLINE_BYTES,
    MAX_LEASE_HOLD_SECONDS,
    MAX_LEASE_SECONDS,
    MAX_MANIFEST_BYTES,
    RELEASE_ID,
    RELEASE_ID_FORM,
    ExitCode,
    NodeStatus,
)
from edgecdn.node.agent import certs, store
from edgecdn.node.agent.common import AgentError, Answer, Paths, atomic_write

MAX_COMMAND = 4096
# A verb's standard input must arrive within this time, so a silent client cannot keep a request open.
INPUT_SECONDS = 60


@dataclass(frozen=True)
class Arg:
    """One positional argument: its name in the help, its pattern, and what a refusal says it should be."""

    name: str
    pattern: re.Pattern[str]
    expected: str


@dataclass(frozen=True)
class Request:
    """A checked request: the node's paths, the verb's arguments, its standard input and lease."""

    paths: Paths
    args: tuple[str, ...]
    stdin: bytes
    lease: str | None = None
    client: str = "local"


@dataclass(frozen=True)
class Verb:
    """One request the agent serves, declared: everything the checks, the help and the lock need."""

    summary: str
    run: Callable[[Request], Answer]
    args: tuple[Arg, ...] = ()
    optional: int = 0  # how many of the trailing args may be left out
    stdin_limit: int = 0  # bytes of standard input the verb reads; 0: it reads none
    stdin_from_args: int = 0  # it reads standard input only when given at least this many args
    changes_state: bool = True  # runs under the node's lock
    local_only: bool = False  # never reachable with the deploy key

    def usage(self, name: str) -> str:
        """The verb as a person would type it."""
        required = [a.name for a in self.args[: len(self.args) - self.optional]]
        optional = [f"[{a.name}]" for a in self.args[len(self.args) - self.optional :]]
        stdin = " < input" if self.stdin_limit else ""
        return " ".join([name, *required, *optional]) + stdin

    def reads_stdin(self, args: tuple[str, ...]) -> bool:
        """Whether this request comes with standard input."""
        return self.stdin_limit > 0 and len(args) >= self.stdin_from_args


RELEASE_ARG = Arg("ID", RELEASE_ID, f"a release id ({RELEASE_ID_FORM})")
KEEP_ARG = Arg(
    "N",
    re.compile(r"^[1-9][0-9]?$"),
    f"a number of releases to keep, {KEEP_RANGE.start} to {KEEP_RANGE.stop - 1}",
)
SECONDS_ARG = Arg("SECONDS", re.compile(r"^[1-9][0-9]{0,3}$"), f"a number of seconds, at most {MAX_LEASE_SECONDS}")
DEFAULT_KEEP = 3


def _lease_file(paths: Paths) -> Path:
    return paths.state / "lease.json"


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def current_lease(paths: Paths) -> dict[str, Any] | None:
    """The deploy lease that has not expired, if any."""
    try:
        lease = json.loads(_lease_file(paths).read_text())
        return lease if isinstance(lease, dict) and float(lease["expires"]) > time.time() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_lease(paths: Paths, token: str | None) -> None:
    """Refuse a change while another deploy holds the node (called under the state lock)."""
    lease = current_lease(paths)
    if lease is not None and (token is None or _token_digest(token) != lease.get("token")):
        held = time.time() - float(lease["since"])
        raise AgentError(
            f"another deploy (from {lease.get('client', 'unknown')}, {held:.0f} s ago) is changing this node; "
            f"try again when it is done (its lease ends within {float(lease['expires']) - time.time():.0f} s)",
            "busy",
        )


def _take_lease(request: Request) -> Answer:
    if request.lease is None:
        raise AgentError(f"lease needs a token: {LEASE_PREFIX}TOKEN lease SECONDS")
    seconds = int(request.args[0])
    if seconds > MAX_LEASE_SECONDS:
        raise AgentError(f"lease: {seconds} is not {SECONDS_ARG.expected}")
    now = time.time()
    previous = current_lease(request.paths)
    since = float(previous["since"]) if previous else now
    if now + seconds - since > MAX_LEASE_HOLD_SECONDS:
        raise AgentError(
            f"this deploy has held the node for {now - since:.0f} s; a lease may not run past "
            f"{MAX_LEASE_HOLD_SECONDS} s in a row, so other deploys get their turn (unlease, then lease again)",
            "busy",
        )
    lease = {"token": _token_digest(request.lease), "client": request.client, "since": since, "expires": now + seconds}
    atomic_write(_lease_file(request.paths), json.dumps(lease).encode(), 0o644)
    # The status comes along, and with a release id and its manifest the upload is begun too,
    # so a deploy learns what each node lacks in its first exchange.
    answer: Answer = {"lease": "held", "expires_in": seconds}
    if len(request.args) > 1:
        answer["upload"] = store.begin(request.paths, request.args[1], request.stdin)
    return {**answer, "status": dict(status(request.paths))}


def _drop_lease(request: Request) -> Answer:
    check_lease(request.paths, request.lease)  # only the holder ends a lease
    _lease_file(request.paths).unlink(missing_ok=True)
    return {"lease": "released"}


def _publish(request: Request) -> Answer:
    """Serve a release, then prune and end the lease: a deploy's last exchange with a node."""
    answer = store.activate(request.paths, request.args[0])
    try:
        answer["removed"] = store.prune(request.paths, int(request.args[1]))["removed"]
    except (AgentError, OSError) as exc:  # the switch stands; the next deploy prunes again
        answer["prune_error"] = str(exc)[:300]
    _lease_file(request.paths).unlink(missing_ok=True)
    return {**answer, "lease": "released"}


def status(paths: Paths) -> NodeStatus:
    """What this node serves and holds, in the contract's shape."""
    releases = store.releases_status(paths)
    return NodeStatus(
        ok=True,
        node=paths.layout["node_name"],
        active=releases["active"],
        intact=releases["intact"],
        previous=releases["previous"],
        releases=releases["releases"],
        staged=releases["staged"],
        certificate=certs.certificate_status(paths),
    )


def _prune(request: Request) -> Answer:
    keep = int(request.args[0]) if request.args else DEFAULT_KEEP
    if keep not in KEEP_RANGE:
        raise AgentError(f"prune: {keep} is not {KEEP_ARG.expected}")
    return store.prune(request.paths, keep)


VERBS: dict[str, Verb] = {
    "status": Verb("what the node serves and holds", lambda r: dict(status(r.paths)), changes_state=False),
    "begin": Verb(
        "open an upload of release ID (its manifest, JSON or gzip'd JSON, on stdin); answers the files still needed",
        lambda r: store.begin(r.paths, r.args[0], r.stdin),
        args=(RELEASE_ARG,),
        stdin_limit=MAX_MANIFEST_BYTES,
    ),
    "finalize": Verb(
        "check the uploaded release (and the files sent on stdin, if any) against its manifest; keep it, read-only",
        lambda r: store.finalize(r.paths, r.args[0], r.stdin),
        args=(RELEASE_ARG,),
        stdin_limit=MAX_INLINE_BYTES,
    ),
    "activate": Verb("serve a finalized release", lambda r: store.activate(r.paths, r.args[0]), args=(RELEASE_ARG,)),
    "publish": Verb(
        "serve a finalized release, keep the newest N releases and end this deploy's lease",
        _publish,
        args=(RELEASE_ARG, KEEP_ARG),
    ),
    "rollback": Verb("serve the previous release again", lambda r: store.rollback(r.paths)),
    "prune": Verb(f"keep the newest N releases (default {DEFAULT_KEEP})", _prune, args=(KEEP_ARG,), optional=1),
    "install-cert": Verb(
        "install a key and certificate chain (one PEM bundle on stdin)",
        lambda r: certs.install(r.paths, r.stdin),
        stdin_limit=MAX_CERT_BYTES,
    ),
    "lease": Verb(
        f"hold the node for one deploy (needs {LEASE_PREFIX}TOKEN first); others get 'busy' until it ends; "
        "with a release id, also begin its upload (its manifest on stdin)",
        _take_lease,
        args=(SECONDS_ARG, RELEASE_ARG),
        optional=1,
        stdin_limit=MAX_MANIFEST_BYTES,
        stdin_from_args=2,
    ),
    "unlease": Verb("end this deploy's lease", _drop_lease),
    "init": Verb("create the node's directories and first site config", lambda r: store.init(r.paths), local_only=True),
}


def usage(local: bool = False) -> str:
    """The verbs a caller may use, from the table."""
    verbs = [verb.usage(name) for name, verb in VERBS.items() if local or not verb.local_only]
    return "verbs: " + ", ".join(verbs) + ("" if local else ", and rsync uploads to staging")


def split_lease(words: list[str]) -> tuple[str | None, list[str]]:
    """A request's lease token (a leading `lease=TOKEN` word), checked, and the rest."""
    if words and words[0].startswith(LEASE_PREFIX):
        token = words[0].removeprefix(LEASE_PREFIX)
        if not LEASE_TOKEN.match(token):
            raise AgentError(f"a lease token is 32 lower-case hex digits, not {token[:40]!r}")
        return token, words[1:]
    return None, words


def check_request(words: list[str], local: bool) -> tuple[Verb, tuple[str, ...]]:
    """The verb and its arguments, each checked against the table; refused otherwise."""
    if not words:
        raise AgentError(f"no request given; this key only runs the edgecdn deploy agent ({usage(local)})")
    name, args = words[0], tuple(words[1:])
    verb = VERBS.get(name)
    if verb is None or (verb.local_only and not local):
        raise AgentError(f"unknown request {name[:40]!r}; {usage(local)}")
    if not len(verb.args) - verb.optional <= len(args) <= len(verb.args):
        raise AgentError(f"{name} takes {verb.usage(name)!r}, not {' '.join(words)[:80]!r}")
    for value, arg in zip(args, verb.args, strict=False):
        if not arg.pattern.match(value):
            raise AgentError(f"{name}: {value[:40]!r} is not {arg.expected}")
    return verb, args


def read_input(stream: BinaryIO, limit: int, seconds: float = INPUT_SECONDS) -> bytes:
    """At most `limit` bytes of standard input, which must end within `seconds`."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        data = stream.read(limit + 1)  # an in-memory stream: it cannot stall
    else:
        deadline, chunks, size = time.monotonic() + seconds, [], 0
        while size <= limit:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise AgentError(f"the input did not arrive within {seconds:.0f} s")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    if len(data) > limit:
        raise AgentError(f"input is larger than {limit} bytes")
    return data


@contextlib.contextmanager
def state_lock(paths: Paths) -> Iterator[None]:
    """One state-changing request at a time; a second deployer is told the node is busy."""
    paths.state.mkdir(parents=True, exist_ok=True)
    with open(paths.state / "lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AgentError(
                "another deploy is changing this node right now; try again when it is done", "busy"
            ) from None
        yield


def dispatch(words: list[str], paths: Paths, stdin: BinaryIO, local: bool, client: str = "local") -> Answer:
    """Check one request, read its input, and run it (under the lock and lease if it changes state)."""
    lease, words = split_lease(words)
    verb, args = check_request(words, local)
    data = read_input(stdin, verb.stdin_limit) if verb.reads_stdin(args) else b""
    request = Request(paths, args, data, lease, client)
    if not verb.changes_state:
        return verb.run(request)
    with state_lock(paths):
        check_lease(paths, lease)
        return verb.run(request)


def audit(words: list[str], outcome: str, env: Mapping[str, str]) -> None:
    """One line per request to the system journal: what was asked, from where, and how it ended."""
    client = (env.get("SSH_CONNECTION") or "local").split(" ")[0]
    request = " ".join(words)[:200].encode("unicode_escape", "replace").decode()
    syslog.openlog("edgecdn-agent", 0, syslog.LOG_AUTH)
    syslog.syslog(syslog.LOG_INFO, f"client={client} request={request!r} outcome={outcome}")


def receive_upload(paths: Paths, command: str, env: Mapping[str, str]) -> None:
    """Hand an rsync upload to rrsync, confined to the staging directory, write-only (never returns)."""
    rrsync = paths.layout["rrsync_bin"]
    argv = [rrsync, "-wo", "-munge", str(paths.staging)]
    os.execve(rrsync, argv, {**env, "SSH_ORIGINAL_COMMAND": command})  # noqa: S606 - fixed path, no shell


def _remote_words(paths: Paths, env: Mapping[str, str]) -> list[str]:
    original = env.get("SSH_ORIGINAL_COMMAND", "")
    if len(original) > MAX_COMMAND:
        raise AgentError("request is too long")
    try:
        words = shlex.split(original)
    except ValueError:
        raise AgentError("request is not a well-formed command line") from None
    if words[:2] == ["rsync", "--server"]:
        if "--sender" in words:
            raise AgentError("downloads are not allowed; the deploy key only uploads")
        audit(words, "upload", env)
        receive_upload(paths, original, env)
    return words


def main(
    argv: list[str],
    env: Mapping[str, str],
    stdin: BinaryIO,
    stdout: TextIO,
    *,
    layout_file: Path,
    stderr: TextIO | None = None,
) -> int:
    """Serve one request and print one JSON answer; the exit code says how it ended."""
    os.umask(0o022)
    words: list[str] = []
    try:
        paths = Paths(json.loads(layout_file.read_text()))
        # Remote whenever sshd ran us (with the deploy key's forced command), whatever else is set.
        remote = "SSH_CONNECTION" in env
        words = _remote_words(paths, env) if remote else list(argv)
        client = (env.get("SSH_CONNECTION") or "local").split(" ")[0]
        result = dispatch(words, paths, stdin, local=not remote, client=client)
        print(json.dumps({**result, "ok": True}), file=stdout)
        audit(words, "ok", env)
        return ExitCode.OK
    except AgentError as exc:
        print(json.dumps({"ok": False, "error": exc.code, "message": str(exc)}), file=stdout)
        # Also on stderr, where rsync and a person at a terminal look.
        if stderr is not None:
            print(f"edgecdn agent: {exc}", file=stderr)
        audit(words, f"refused:{exc.code}", env)
        return ExitCode.BUSY if exc.code == "busy" else ExitCode.REFUSED
    except Exception as exc:  # the boundary answers in JSON whatever happens, never with a traceback
        answer = {"ok": False, "error": "internal", "message": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(json.dumps(answer), file=stdout)
        audit(words, f"internal:{type(exc).__name__}", env)
        return ExitCode.INTERNAL
