"""Offline evaluation: grid points, AIQ, references (oracle, single models) and figures."""

from banditrouter.evaluation.metrics import (
    aiq,
    cost_range,
    evaluate_policy,
    oracle_arms,
    policy_aiq,
    references,
    upper_hull,
)

__all__ = ["aiq", "cost_range", "evaluate_policy", "oracle_arms", "policy_aiq", "references", "upper_hull"]
