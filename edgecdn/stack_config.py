"""Reading the stack's `edgecdn:` configuration out of Pulumi, then validating it.

The validation itself is pure (edgecdn.config); this module only gathers raw values and asks
Route53 which zone `hostedZoneId` names, so names outside that zone are refused up front.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pulumi
import pulumi_aws as aws
from pulumi.runtime import config as runtime_config

from edgecdn.config import KEY_KINDS, NAMESPACE, ConfigError, EdgeConfig, Problem, parse_config


def raw_stack_values() -> dict[str, Any]:
    """Every `edgecdn:` key set for this stack, including ones edgecdn does not know."""
    prefix = f"{NAMESPACE}:"
    keys = {k for k in runtime_config.CONFIG.get() if k.startswith(prefix)}
    keys |= {k for k in runtime_config.get_config_env() if k.startswith(prefix)}
    keys |= {prefix + k for k in KEY_KINDS}
    values = {k.removeprefix(prefix): runtime_config.get_config(k) for k in keys}
    return {k: v for k, v in values.items() if v is not None}


def hosted_zone_name(zone_id: str) -> str:
    """The name of a public hosted zone; ConfigError when it cannot be used."""
    try:
        zone = aws.route53.get_zone(zone_id=zone_id)
    except Exception as exc:  # the provider raises plain exceptions for API errors
        raise ConfigError(
            [Problem("hostedZoneId", f"Route53 has no zone {zone_id!r} these AWS credentials can read ({exc})")],
            stack_file(),
        ) from None
    if zone.private_zone:
        raise ConfigError(
            [Problem("hostedZoneId", f"{zone_id!r} is a private zone; visitors need a public hosted zone")],
            stack_file(),
        )
    return zone.name


def stack_file() -> str:
    """The file a user edits to fix the configuration."""
    return f"Pulumi.{pulumi.get_stack()}.yaml"


def read_stack_config(project_dir: Path) -> EdgeConfig:
    """The validated configuration; raises ConfigError listing every problem."""
    raw = raw_stack_values()
    config = parse_config(raw, project_dir, stack_file())
    return parse_config(raw, project_dir, stack_file(), zone_name=hosted_zone_name(config.hosted_zone_id))
