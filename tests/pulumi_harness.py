"""Run Pulumi programs against mocks and record what they register.

One fresh event loop per run; the recording monitor keeps every resource's inputs, which of
its properties were sent as secrets, and the stack outputs as the engine would store them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import runpy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
from google.protobuf import json_format
from pulumi.runtime import config as runtime_config
from pulumi.runtime.mocks import MockMonitor
from pulumi.runtime.settings import set_root_resource
from pulumi.runtime.stack import run_in_stack

PROJECT_DIR = Path(__file__).resolve().parent.parent
SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270"
SIG_KEY = "4dabf18193072939515e22adb298388d"
ZONE_NAME = "example.com."


def fake_ssh_public_key(seed: str) -> str:
    """A well-formed ssh-ed25519 public key line, distinct per seed."""
    blob = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + hashlib.sha256(seed.encode()).digest()
    return "ssh-ed25519 " + base64.b64encode(blob).decode() + "\n"


FAKE_PRIVATE_OPENSSH = "-----BEGIN OPENSSH PRIVATE KEY-----\nFAKE-{seed}-PRIVATE\n-----END OPENSSH PRIVATE KEY-----\n"
FAKE_PRIVATE_PEM = "-----BEGIN PRIVATE KEY-----\nFAKE-{seed}-PRIVATE\n-----END PRIVATE KEY-----\n"


class EdgeMocks(pulumi.runtime.Mocks):
    """Fake provider answers chosen by type token, addresses from the documentation ranges."""

    def __init__(self) -> None:
        self.counter = itertools.count(1)
        self.calls: list[pulumi.runtime.MockCallArgs] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict]:
        n = next(self.counter)
        outputs = dict(args.inputs)
        typ = args.typ
        if typ == "tls:index/privateKey:PrivateKey":
            outputs["publicKeyOpenssh"] = fake_ssh_public_key(args.name)
            outputs["privateKeyOpenssh"] = FAKE_PRIVATE_OPENSSH.format(seed=args.name)
            outputs["privateKeyPem"] = FAKE_PRIVATE_PEM.format(seed=args.name)
        elif typ == "aws:lightsail/instance:Instance":
            outputs.update(name=f"{args.name}-x", ipv6Addresses=[f"2001:db8::{n:x}"], publicIpAddress=f"198.51.100.{n}")
        elif typ == "aws:lightsail/staticIp:StaticIp":
            outputs.update(name=f"{args.name}-x", ipAddress=f"203.0.113.{n}")
        elif typ == "aws:lightsail/staticIpAttachment:StaticIpAttachment":
            outputs["ipAddress"] = f"203.0.113.{n}"
        elif typ == "aws:ec2/eip:Eip":
            outputs.update(publicIp=f"192.0.2.{n}", allocationId=f"eipalloc-{n:08x}")
        elif typ == "aws:ec2/instance:Instance":
            outputs["publicIp"] = f"198.51.100.{n}"
        elif typ == "acme:index/registration:Registration":
            outputs["registrationUrl"] = "https://acme.invalid/acct/1"
        elif typ == "acme:index/certificate:Certificate":
            outputs.update(
                certificatePem="-----BEGIN CERTIFICATE-----\nLEAF\n-----END CERTIFICATE-----\n",
                issuerPem="-----BEGIN CERTIFICATE-----\nISSUER\n-----END CERTIFICATE-----\n",
                privateKeyPem=FAKE_PRIVATE_PEM.format(seed="tls-key"),
                certificateNotAfter="2027-02-22T00:00:00Z",
            )
        elif typ == "aws:sns/topic:Topic":
            outputs["arn"] = f"arn:aws:sns:{args.inputs.get('region')}:123456789012:{args.name}"
        elif typ == "command:local:Command":
            outputs["stdout"] = "deployed"
        return f"{args.name}-id", outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict:  # type: ignore[override]
        self.calls.append(args)
        if args.token == "aws:route53/getZone:getZone":
            return {"name": ZONE_NAME, "zoneId": args.args.get("zoneId"), "privateZone": False}
        if args.token == "aws:ec2/getAmi:getAmi":
            return {"id": "ami-0123456789abcdef0", "architecture": "arm64", "name": "debian-13-arm64-20261101-1234"}
        return {}


def secret_paths(value: Any, path: str = "") -> set[str]:
    """Where a value (as the engine stores it) holds secrets."""
    if isinstance(value, dict):
        if value.get(SIG_KEY) == SECRET_SIG:
            return {path or "."}
        found: set[str] = set()
        for k, v in value.items():
            found |= secret_paths(v, f"{path}.{k}" if path else k)
        return found
    if isinstance(value, list):
        return set().union(*(secret_paths(v, f"{path}[{i}]") for i, v in enumerate(value))) if value else set()
    return set()


def unwrap_secrets(value: Any) -> Any:
    """The plain value, with secret wrappers removed (their secrecy is kept in secret_inputs)."""
    if isinstance(value, dict):
        if value.get(SIG_KEY) == SECRET_SIG:
            return unwrap_secrets(value.get("value"))
        return {k: unwrap_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap_secrets(v) for v in value]
    return value


class RecordingMonitor(MockMonitor):
    """A MockMonitor that also remembers secrets on the wire and the stack outputs."""

    def __init__(self, mocks: pulumi.runtime.Mocks) -> None:
        super().__init__(mocks)
        self.secret_inputs: dict[str, set[str]] = {}
        self.options: dict[str, dict[str, Any]] = {}
        self.stack_outputs: dict = {}

    def RegisterResource(self, request):
        response = super().RegisterResource(request)
        wire = json_format.MessageToDict(request.object)
        self.secret_inputs[response.urn] = secret_paths(wire)
        property_deps = {urn for deps in request.propertyDependencies.values() for urn in deps.urns}
        self.options[response.urn] = {
            "dependencies": set(request.dependencies) | property_deps,
            "retain_on_delete": request.retainOnDelete,
            "delete_before_replace": request.deleteBeforeReplace,
            "ignore_changes": list(request.ignoreChanges),
            "replace_on_changes": list(request.replaceOnChanges),
        }
        return response

    def RegisterResourceOutputs(self, request):
        if request.urn.split("::")[2] == "pulumi:pulumi:Stack":
            self.stack_outputs = json_format.MessageToDict(request.outputs)
        return super().RegisterResourceOutputs(request)


@dataclass
class Resource:
    """One registered resource as the tests see it."""

    urn: str
    type: str
    name: str
    state: dict
    secret_inputs: set[str]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def dependencies(self) -> set[str]:
        """URNs this resource waits for: depends_on and every resource its inputs came from."""
        return set(self.options.get("dependencies", set()))


@dataclass
class Run:
    """What a program registered."""

    resources: list[Resource]
    stack_outputs: dict
    calls: list = field(default_factory=list)
    error: BaseException | None = None

    def of_type(self, typ: str) -> list[Resource]:
        return [r for r in self.resources if r.type == typ]

    def by_urn(self, urn: str) -> Resource:
        return next(r for r in self.resources if r.urn == urn)

    def waits_for(self, later: Resource, earlier: Resource) -> bool:
        """Whether `later` is registered only after `earlier` exists, directly or through others."""
        seen: set[str] = set()
        todo = [later.urn]
        while todo:
            urn = todo.pop()
            for dep in self.by_urn(urn).dependencies if any(r.urn == urn for r in self.resources) else ():
                if dep == earlier.urn:
                    return True
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return False

    def named(self, name: str) -> Resource:
        matches = [r for r in self.resources if r.name == name]
        assert len(matches) == 1, f"expected one resource named {name}, got {[r.urn for r in matches]}"
        return matches[0]


def run_pulumi(
    program: Callable[[], None], config: dict[str, Any] | None = None, stack: str = "test", allow_error: bool = False
) -> Run:
    """Run `program` as a stack under mocks with `edgecdn:` config set; return what it registered.

    With allow_error, a failing program still returns what it registered, and the error.
    """
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    mocks = EdgeMocks()
    monitor = RecordingMonitor(mocks)
    error: BaseException | None = None
    try:
        pulumi.runtime.set_mocks(mocks, project="edgecdn", stack=stack, preview=False, monitor=monitor)
        # set_mocks makes a root stack of its own; the program gets a fresh one, as under the CLI.
        set_root_resource(None)  # type: ignore[arg-type]
        runtime_config.set_all_config(
            {f"edgecdn:{k}": v if isinstance(v, str) else json.dumps(v) for k, v in (config or {}).items()}
        )
        loop.run_until_complete(run_in_stack(program))
    except Exception as exc:
        if not allow_error:
            raise
        error = exc
    finally:
        runtime_config.set_all_config({})
        set_root_resource(None)  # type: ignore[arg-type]
        asyncio.set_event_loop(None)
        loop.close()
    resources = []
    for urn, reg in monitor.resources.items():
        typ = urn.split("::")[2].split("$")[-1]
        resources.append(
            Resource(
                urn,
                typ,
                urn.split("::")[3],
                unwrap_secrets(reg.state),
                monitor.secret_inputs.get(urn, set()),
                monitor.options.get(urn, {}),
            )
        )
    return Run(resources, monitor.stack_outputs, mocks.calls, error)


def run_main(config: dict[str, Any], allow_error: bool = False) -> Run:
    """Run the project's __main__.py with this stack configuration."""
    program = lambda: runpy.run_path(str(PROJECT_DIR / "__main__.py"), run_name="__main__")  # noqa: E731
    return run_pulumi(program, config, allow_error=allow_error)
