"""Offline evaluation: grid points, AIQ, references (oracle, single models) and figures."""

from banditrouter.evaluation.metrics import (
    aiq,
    aiq_range,
    cost_range,
    evaluate_policy,
    oracle_arms,
    policy_aiq,
    policy_aiq_range,
    references,
    upper_hull,
)

__all__ = [
    "aiq",
    "aiq_range",
    "cost_range",
    "evaluate_policy",
    "oracle_arms",
    "policy_aiq",
    "policy_aiq_range",
    "references",
    "upper_hull",
]
