"""The edgecdn policy pack: `pulumi preview --policy-pack policy`."""

from edgecdn_policies import policy_pack

policy_pack()
