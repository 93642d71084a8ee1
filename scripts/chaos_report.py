"""Turn the chaos suite's recorded figures into the README's table (markdown on stdout).

    CHAOS_FIGURES=/tmp/chaos.json flock /tmp/ray.lock timeout 600 .venv/bin/python -m pytest tests/chaos -q
    .venv/bin/python scripts/chaos_report.py /tmp/chaos.json

Each row: scenario, its pass criteria (what the test asserts), the figures it measured, and whether it
passed. Parametrised cases of one scenario (malformed bodies) are folded into one row.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

SCENARIOS: list[tuple[str, str, str]] = [
    # (test name prefix, scenario, pass criteria)
    (
        "test_killing_a_model_replica_under_load",
        "kill a model replica under load",
        "<= 1% non-2xx; one served decision record per answered request",
    ),
    (
        "test_random_replica_killer_soak",
        "random replica killer soak (35 s)",
        "<= 1% non-2xx; one served decision per answer; p99 <= 10 s",
    ),
    ("test_saturation", "saturation", "only 200/503; 503 has Retry-After >= 1 s + error JSON; every 200 completes"),
    (
        "test_cancellation_storm",
        "cancellation storm (200 clients hang up)",
        "no slot held after; a burst of the admission bound all 200",
    ),
    ("test_backend_hang", "backend hang", "504 within model_timeout_s + 2 s; decision outcome timeout, cost > 0, score 0"),
    ("test_upstream_4xx", "upstream 4xx", "exactly one upstream call; error JSON with request id, no URL"),
    (
        "test_upstream_5xx",
        "upstream 5xx / dropped connection",
        "1 + max_retries calls, then fallback: 200, fallback true, logged as served",
    ),
    (
        "test_all_replicas_of_an_arm_down",
        "all replicas of an arm down",
        "every request 200 from the fallback, each within model_timeout_s + 1 s",
    ),
    ("test_stream_failing_midway", "stream fails midway", "ends with an error event (request id); decision logged as error"),
    ("test_upstream_without_usage", "upstream omits usage", "cost > 0 and usage marked estimated"),
    ("test_malformed_chat_body", "malformed chat bodies", "4xx + error JSON with the request id"),
    ("test_malformed_feedback", "malformed feedback", "4xx + error JSON with the request id"),
    ("test_overflowing_preferences", "preferences 1e308 + 1e308", "never a 5xx"),
    ("test_framework_errors", "framework errors, CSRF-shaped reset, long x-request-id", "error JSON; reset refused; id <= limit"),
    ("test_still_serving", "still serving after malformed input", "200"),
    ("test_rolling_update", "rolling update under load", "0 non-2xx; the changed config serves after"),
    (
        "test_unreachable_upstream",
        "unreachable upstream + slow (stopped) buffer",
        "all 200 within model_timeout_s; RSS growth <= 64 MB; no loss",
    ),
    ("test_schemathesis_fuzz", "schemathesis fuzz (OpenAPI, admin key)", "no 5xx; every error JSON carries the request id"),
    ("test_routed_requests_go_to_primary", "premise: ranked routing", "primary serves, one upstream call"),
]

SHOWN = (
    "requests",
    "ok",
    "non_2xx",
    "non_2xx_by",
    "p50_s",
    "p99_s",
    "max_s",
    "status_503",
    "retry_after_s",
    "kills",
    "killed_replicas",
    "upstream_calls_primary",
    "failed_call_records",
    "abandoned",
    "burst",
    "statuses",
    "status",
    "generated_requests",
    "server_errors",
    "failures",
    "fuzz_s",
    "rss_growth_mb",
    "fallbacks",
    "update_s",
    "cost_usd",
    "timeout_costs_usd",
    "error_events",
    "status_504",
    "primary_back_after_s",
    "case",
    "code",
)


def _figures(rows: list[dict]) -> str:
    parts = []
    for row in rows:
        shown = {k: row[k] for k in SHOWN if k in row}
        if isinstance(shown.get("burst"), dict):
            b = shown["burst"]
            shown["burst"] = f"{b.get('ok')}/{b.get('requests')} ok"
        parts.append(", ".join(f"{k} {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in shown.items()))
    return "; ".join(parts)


def table(figures: list[dict]) -> str:
    lines = ["| scenario | pass criteria | measured | result |", "|---|---|---|---|"]
    used = set()
    for prefix, scenario, criteria in SCENARIOS:
        rows = [f for f in figures if f["test"].startswith(prefix)]
        if not rows:
            continue
        used.update(id(r) for r in rows)
        outcomes = {r.get("outcome", "?") for r in rows}
        result = (
            "passed"
            if outcomes == {"passed"}
            else "FAILED: " + "; ".join(re.sub(r"\s+", " ", r.get("why", ""))[:160] for r in rows if r.get("outcome") != "passed")
        )
        lines.append(f"| {scenario} | {criteria} | {_figures(rows)} | {result} |")
    for r in figures:
        if id(r) not in used:
            lines.append(f"| {r['test']} | | {_figures([r])} | {r.get('outcome', '?')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figures", type=Path, help="the JSON file CHAOS_FIGURES named")
    args = parser.parse_args()
    print(table(json.loads(args.figures.read_text())))


if __name__ == "__main__":
    main()
