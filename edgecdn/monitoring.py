"""Monitoring: one alarm per node health check, sent to an SNS topic (and email, if set)."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

# Route53 publishes health-check metrics only in us-east-1, so alarms and their topic live there.
METRICS_REGION = "us-east-1"


@dataclass(frozen=True)
class MonitoringArgs:
    """Which health checks to watch and where to send alerts."""

    domain: str
    health_check_ids: dict[str, pulumi.Input[str]]
    alert_email: str | None = None


class Monitoring(pulumi.ComponentResource):
    """Alarms that fire when a node turns unhealthy and again when it recovers."""

    topic_arn: pulumi.Output[str]

    def __init__(self, name: str, args: MonitoringArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("edgecdn:index:Monitoring", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        topic = aws.sns.Topic(f"{name}-alerts", region=METRICS_REGION, opts=child)
        if args.alert_email:
            aws.sns.TopicSubscription(
                f"{name}-email",
                region=METRICS_REGION,
                topic=topic.arn,
                protocol="email",
                endpoint=args.alert_email,
                opts=child,
            )
        for node, check_id in args.health_check_ids.items():
            aws.cloudwatch.MetricAlarm(
                f"{name}-{node}-unhealthy",
                region=METRICS_REGION,
                alarm_description=f"edgecdn node {node} of {args.domain} fails its Route53 health check",
                namespace="AWS/Route53",
                metric_name="HealthCheckStatus",
                dimensions={"HealthCheckId": check_id},
                statistic="Minimum",
                period=60,
                evaluation_periods=2,
                threshold=1,
                comparison_operator="LessThanThreshold",
                # No data means the check itself is gone or broken: treat it as down.
                treat_missing_data="breaching",
                alarm_actions=[topic.arn],
                ok_actions=[topic.arn],
                opts=child,
            )
        self.topic_arn = topic.arn
        self.register_outputs({"topicArn": self.topic_arn})
