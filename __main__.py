"""edgecdn: wiring only. config -> certificate -> nodes -> DNS + monitoring -> push -> exports."""

from pathlib import Path

import pulumi
import pulumi_tls as tls

from edgecdn.certificate import SiteCertificate, SiteCertificateArgs
from edgecdn.config import ConfigError
from edgecdn.edge_node import EdgeNode, EdgeNodeArgs, check_user_data_budget
from edgecdn.latency_dns import LatencyDNS, LatencyDNSArgs, LatencyTarget
from edgecdn.monitoring import Monitoring, MonitoringArgs
from edgecdn.pricing import estimate_monthly_cost
from edgecdn.site_push import PushArgs, PushNode, SitePush, SitePushArgs, site_path_for_handoff
from edgecdn.stack_config import read_stack_config, stack_file
from site_sync.cache import open_cache
from site_sync.release import SiteError, release_id_of

PROJECT_DIR = Path(__file__).resolve().parent

try:
    config = read_stack_config(PROJECT_DIR)
    check_user_data_budget(config, stack_file())
    with open_cache() as cache:  # hashes cached by path and stat: seconds, not minutes, for a big site
        release_id = release_id_of(config.site_dir, cache, config.follow_external_symlinks)
except (ConfigError, SiteError) as exc:
    raise pulumi.RunError(f"edgecdn: {exc}") from None

deploy_key = tls.PrivateKey("deploy-key", algorithm="ED25519")

certificate = SiteCertificate(
    "site",
    SiteCertificateArgs(
        domain=config.domain,
        aliases=config.aliases,
        zone_id=config.hosted_zone_id,
        acme_email=config.acme_email,
        acme_server=config.acme_server,
        caa_issuer=config.caa_issuer,
        min_days_remaining=config.cert_min_days_remaining,
        manage_caa=config.manage_caa,
    ),
)
push_args = PushArgs(
    domain=config.domain,
    aliases=config.aliases,
    release_id=release_id,
    site_dir=site_path_for_handoff(config.site_dir, PROJECT_DIR),
    follow_external_symlinks=config.follow_external_symlinks,
    deploy_private_key=deploy_key.private_key_openssh,
    certificate_chain=certificate.chain_pem,
    certificate_key=certificate.private_key_pem,
)

nodes = [
    EdgeNode(
        spec.name,
        EdgeNodeArgs(
            spec=spec,
            domain=config.domain,
            aliases=config.aliases,
            deploy_public_key=deploy_key.public_key_openssh,
            ssh_allowed_cidrs=config.ssh_allowed_cidrs,
            admin_ssh_keys=config.admin_ssh_keys,
            push=push_args,
        ),
    )
    for spec in config.nodes
]

dns = LatencyDNS(
    "dns",
    LatencyDNSArgs(
        zone_id=config.hosted_zone_id,
        domain=config.domain,
        aliases=config.aliases,
        targets=tuple(
            LatencyTarget(node.spec.name, node.spec.region, node.ipv4, node.ipv6 if node.has_ipv6 else None)
            for node in nodes
        ),
    ),
)

Monitoring(
    "monitoring",
    MonitoringArgs(domain=config.domain, health_check_ids=dict(dns.health_check_ids), alert_email=config.alert_email),
)

push = SitePush(
    "site",
    SitePushArgs(
        push=push_args,
        nodes=tuple(
            PushNode(node.spec.name, node.spec.region, node.ipv4, node.host_public_key, node.instance_id)
            for node in nodes
        ),
    ),
    opts=pulumi.ResourceOptions(depends_on=nodes),
)

pulumi.export("url", f"https://{config.domain}/")
# What `python -m edgecdn verify` checks against.
pulumi.export("domain", config.domain)
pulumi.export("aliases", list(config.aliases))
pulumi.export("hostedZoneId", config.hosted_zone_id)
pulumi.export("sshAllowedCidrs", list(config.ssh_allowed_cidrs))
pulumi.export("releaseId", release_id)
# Secret: for `python -m site_sync status|rollback --handoff -` (see the README).
pulumi.export("handoff", push.handoff)
pulumi.export(
    "nodes",
    [
        {
            "name": n.name,
            "region": n.region,
            "backend": n.spec.backend,
            "instanceId": n.instance_id,
            "ipv4": n.ipv4,
            "ipv6": n.ipv6,
        }
        for n in nodes
    ],
)
pulumi.export("knownHosts", [pulumi.Output.concat(n.ipv4, " ", n.host_public_key) for n in nodes])
pulumi.export("healthCheckIds", dns.health_check_ids)
pulumi.export("certificateNotAfter", certificate.not_after)
pulumi.export("estimatedMonthlyCost", estimate_monthly_cost(config))
