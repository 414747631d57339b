"""edgecdn's policies: each a pure check of one resource's properties, wrapped for pulumi-policy.

The checks take plain values (resource type, properties as the engine shows them, the pack's
config) and return what is wrong, so they are tested without the Pulumi engine.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterator, Mapping
from typing import Any

USER_DATA_LIMIT = 16 * 1024  # EC2's cap on user data; Lightsail launch scripts behave the same
ANYWHERE = {"0.0.0.0/0", "::/0"}
SSH_PORT = 22

Props = Mapping[str, Any]
Check = Callable[[str, Props, Mapping[str, Any]], list[str]]


def _covers_ssh(from_port: Any, to_port: Any) -> bool:
    try:
        low, high = int(from_port), int(to_port)
    except (TypeError, ValueError):
        return False
    return low == -1 or low <= SSH_PORT <= high or (low == 0 and high == 0)


def ssh_not_from_anywhere(resource_type: str, props: Props, config: Mapping[str, Any]) -> list[str]:
    """No SSH from the whole internet (IPv4 or IPv6) unless the stack's policy config allows it."""
    if config.get("allowSshFromAnywhere"):
        return []
    rules: list[tuple[Any, Any, list[str]]] = []
    if resource_type == "aws:ec2/securityGroup:SecurityGroup":
        for rule in props.get("ingress") or []:
            blocks = [*(rule.get("cidrBlocks") or []), *(rule.get("ipv6CidrBlocks") or [])]
            rules.append((rule.get("fromPort"), rule.get("toPort"), blocks))
    elif resource_type == "aws:ec2/securityGroupRule:SecurityGroupRule" and props.get("type") == "ingress":
        blocks = [*(props.get("cidrBlocks") or []), *(props.get("ipv6CidrBlocks") or [])]
        rules.append((props.get("fromPort"), props.get("toPort"), blocks))
    elif resource_type == "aws:lightsail/instancePublicPorts:InstancePublicPorts":
        for info in props.get("portInfos") or []:
            blocks = [*(info.get("cidrs") or []), *(info.get("ipv6Cidrs") or [])]
            rules.append((info.get("fromPort"), info.get("toPort"), blocks))
    return [
        f"port 22 is open to {block}; list your addresses in sshAllowedCidrs "
        "(or set allowSshFromAnywhere in the policy config if you mean it)"
        for low, high, blocks in rules
        if _covers_ssh(low, high)
        for block in blocks
        if block in ANYWHERE
    ]


def imdsv2_required(resource_type: str, props: Props, config: Mapping[str, Any]) -> list[str]:
    """EC2 instances answer metadata only with session tokens (IMDSv2)."""
    if resource_type != "aws:ec2/instance:Instance":
        return []
    if (props.get("metadataOptions") or {}).get("httpTokens") != "required":
        return ["metadataOptions.httpTokens must be 'required' (IMDSv2), so SSRF cannot read the user data"]
    return []


def volumes_encrypted(resource_type: str, props: Props, config: Mapping[str, Any]) -> list[str]:
    """Every EC2 disk is encrypted."""
    if resource_type != "aws:ec2/instance:Instance":
        return []
    problems = []
    if not (props.get("rootBlockDevice") or {}).get("encrypted"):
        problems.append("rootBlockDevice.encrypted must be true")
    problems += [
        f"ebsBlockDevices[{i}].encrypted must be true"
        for i, device in enumerate(props.get("ebsBlockDevices") or [])
        if not device.get("encrypted")
    ]
    return problems


def latency_records_have_health_checks(resource_type: str, props: Props, config: Mapping[str, Any]) -> list[str]:
    """A latency record without a health check keeps sending visitors to a dead node."""
    if resource_type != "aws:route53/record:Record" or not props.get("latencyRoutingPolicies"):
        return []
    if not props.get("healthCheckId"):
        return [f"latency record {props.get('name')} ({props.get('type')}) has no healthCheckId"]
    return []


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


# Properties Pulumi shows in clear in previews, logs and state (command lines, environment, tags).
_CLEAR_PROPS = ("create", "update", "delete", "environment", "triggers", "tags", "tagsAll", "dir")


def private_keys_only_as_secrets(resource_type: str, props: Props, config: Mapping[str, Any]) -> list[str]:
    """The TLS and deploy private keys travel only in secret inputs (stdin, user data), never in clear ones."""
    return [
        f"{name} carries a private key; pass it on stdin or in another secret input"
        for name in _CLEAR_PROPS
        if any("PRIVATE KEY-----" in text for text in _strings(props.get(name)))
    ]


def _user_data_bytes(resource_type: str, props: Props) -> int | None:
    if resource_type == "aws:lightsail/instance:Instance" and isinstance(props.get("userData"), str):
        return len(props["userData"].encode())
    if resource_type == "aws:ec2/instance:Instance" and isinstance(props.get("userDataBase64"), str):
        try:
            return len(base64.b64decode(props["userDataBase64"], validate=True))
        except (binascii.Error, ValueError):
            return None
    if resource_type == "aws:ec2/instance:Instance" and isinstance(props.get("userData"), str):
        return len(props["userData"].encode())
    return None


def user_data_under_limit(resource_type: str, props: Props, config: Mapping[str, Any]) -> list[str]:
    """User data fits in what AWS accepts (16 KB), so a node can boot at all."""
    size = _user_data_bytes(resource_type, props)
    if size is not None and size > USER_DATA_LIMIT:
        return [f"user data is {size} bytes, over the {USER_DATA_LIMIT} AWS accepts; list fewer admin keys"]
    return []


POLICIES: dict[str, tuple[str, Check]] = {
    "ssh-not-from-anywhere": ("No SSH from the whole internet (IPv4 or IPv6)", ssh_not_from_anywhere),
    "imdsv2-required": ("EC2 instances require IMDSv2", imdsv2_required),
    "volumes-encrypted": ("EC2 volumes are encrypted", volumes_encrypted),
    "latency-records-have-health-checks": (
        "Every latency-routed record has a health check",
        latency_records_have_health_checks,
    ),
    "private-keys-only-as-secrets": ("Private keys only in secret inputs", private_keys_only_as_secrets),
    "user-data-under-limit": ("User data under AWS's 16 KB limit", user_data_under_limit),
}


def policy_pack() -> Any:
    """The pack, as pulumi-policy runs it."""
    from pulumi_policy import (
        EnforcementLevel,
        PolicyConfigSchema,
        PolicyPack,
        ReportViolation,
        ResourceValidationArgs,
        ResourceValidationPolicy,
    )

    def wrap(check: Check) -> Callable[[ResourceValidationArgs, ReportViolation], None]:
        def validate(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
            config = args.get_config() if hasattr(args, "get_config") else {}
            for problem in check(args.resource_type, args.props, config or {}):
                report_violation(problem, None)

        return validate

    schema = PolicyConfigSchema(properties={"allowSshFromAnywhere": {"type": "boolean", "default": False}})
    policies = [
        ResourceValidationPolicy(
            name=name,
            description=description,
            validate=wrap(check),
            config_schema=schema if name == "ssh-not-from-anywhere" else None,
        )
        for name, (description, check) in POLICIES.items()
    ]
    return PolicyPack(name="edgecdn", enforcement_level=EnforcementLevel.MANDATORY, policies=policies)
