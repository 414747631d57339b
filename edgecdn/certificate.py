"""SiteCertificate: one ACME certificate for every name, issued by the deployer, never a node.

DNS-01 through Route53 from the machine running `pulumi up`, so no node ever holds Route53
write access; an optional CAA record limits issuance to the configured CA. A later `pulumi up`
renews the certificate once a third of its lifetime is left (or certMinDaysRemaining days).
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws
import pulumi_tls as tls
import pulumiverse_acme as acme


@dataclass(frozen=True)
class SiteCertificateArgs:
    """Names, zone and CA for the certificate."""

    domain: str
    zone_id: str
    acme_email: str
    acme_server: str
    caa_issuer: str
    aliases: tuple[str, ...] = ()
    # None: renew when a third of the lifetime is left (the provider's min_days_dynamic).
    min_days_remaining: int | None = None
    manage_caa: bool = False


def caa_records(issuer: str) -> list[str]:
    """Only the configured CA may issue, and nobody may issue wildcards."""
    return [f'0 issue "{issuer}"', '0 issuewild ";"']


def join_chain(parts: dict[str, str]) -> str:
    """Leaf then issuer, as one PEM chain."""
    return "".join(part if part.endswith("\n") else part + "\n" for part in (parts["leaf"], parts["issuer"]))


def route53_challenge(zone_id: str) -> acme.CertificateDnsChallengeArgsDict:
    """DNS-01 through Route53, in the stack's hosted zone."""
    # Route53's API lives in us-east-1 whatever region the deployer uses.
    return {"provider": "route53", "config": {"AWS_HOSTED_ZONE_ID": zone_id, "AWS_REGION": "us-east-1"}}


class SiteCertificate(pulumi.ComponentResource):
    """The certificate chain (public) and its private key (secret)."""

    chain_pem: pulumi.Output[str]
    private_key_pem: pulumi.Output[str]
    not_after: pulumi.Output[str]

    def __init__(self, name: str, args: SiteCertificateArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("edgecdn:index:SiteCertificate", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)

        # Opt-in: a CAA record set on a name restricts issuance for every name below it too, and
        # Route53 refuses to create one where the zone already has CAA records for that name.
        caa = (
            [
                aws.route53.Record(
                    f"{name}-caa",
                    zone_id=args.zone_id,
                    name=args.domain,
                    type="CAA",
                    ttl=300,
                    records=caa_records(args.caa_issuer),
                    opts=child,
                )
            ]
            if args.manage_caa
            else []
        )
        provider = acme.Provider(f"{name}-acme", server_url=args.acme_server, opts=child)
        account_key = tls.PrivateKey(f"{name}-account-key", algorithm="ECDSA", ecdsa_curve="P256", opts=child)
        registration = acme.Registration(
            f"{name}-registration",
            account_key_pem=account_key.private_key_pem,
            email_address=args.acme_email,
            # A new email replaces the registration, which resolves to the same account (same key);
            # deleting the old one would deactivate that account and fail every later renewal.
            opts=pulumi.ResourceOptions(parent=self, provider=provider, retain_on_delete=True),
        )
        certificate = acme.Certificate(
            f"{name}-certificate",
            account_key_pem=registration.account_key_pem,
            common_name=args.domain,
            subject_alternative_names=list(args.aliases),
            key_type="P256",
            # Let's Encrypt shortens lifetimes to 64 days in 2027 and 45 in 2028, so a fixed number
            # of days would renew ever earlier; min_days_dynamic renews with a third left, whatever
            # the lifetime. A user's fixed value still wins.
            min_days_remaining=args.min_days_remaining,
            min_days_dynamic=True if args.min_days_remaining is None else None,
            dns_challenges=[route53_challenge(args.zone_id)],
            # The CAA record goes first: a CA refusal then shows before a rate-limited order.
            opts=pulumi.ResourceOptions(
                parent=self,
                provider=provider,
                depends_on=caa,
                additional_secret_outputs=["privateKeyPem", "certificateP12"],
            ),
        )
        self.chain_pem = pulumi.Output.all(leaf=certificate.certificate_pem, issuer=certificate.issuer_pem).apply(
            join_chain
        )
        self.private_key_pem = pulumi.Output.secret(certificate.private_key_pem)
        self.not_after = certificate.certificate_not_after
        self.register_outputs({"chainPem": self.chain_pem, "notAfter": self.not_after})
