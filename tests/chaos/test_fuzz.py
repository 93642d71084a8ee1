"""Property-based fuzzing of the edge app (a real local Ray, API keys on) from its own OpenAPI schema
(`/openapi.json`) with schemathesis: for every operation, schema-conforming (positive) and
schema-violating (negative) requests, sent with an admin key. Checks on every response: no 5xx
(schemathesis's `not_a_server_error`), and every error is the gateway's JSON error shape carrying the
request id that the `x-request-id` header carries.

Routes that read their body themselves (chat completions, feedback) declare no request body in the
schema FastAPI generates; where the app's schema has none, the test adds the JSON schema of the pydantic
model the gateway validates that body with (deployments/gateway/parsing.py), so bodies are generated too.
Bounded: MAX_EXAMPLES per operation and mode, derandomized (the same cases on every run), no shrinking.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import requests

BODY_MODELS = {("post", "/v1/chat/completions"): "ChatRequest", ("post", "/v1/feedback"): "FeedbackIn"}
MAX_EXAMPLES = {"/v1/chat/completions": 100}
DEFAULT_EXAMPLES = 40


def _schema_with_bodies(raw: dict) -> tuple[dict, list[str]]:
    """The app's schema, plus a JSON request body (from the gateway's pydantic models) on the operations
    that read the body themselves and declare none. Returns the schema and the operations it added to."""
    from deployments.gateway import parsing

    added = []
    components = raw.setdefault("components", {}).setdefault("schemas", {})
    for (method, path), model_name in BODY_MODELS.items():
        op = raw.get("paths", {}).get(path, {}).get(method)
        if op is None or "requestBody" in op:
            continue
        model = getattr(parsing, model_name)
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components[model_name] = schema
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model_name}"}}},
        }
        added.append(f"{method.upper()} {path}")
    return raw, added


def _problems(resp) -> list[str]:
    """What is wrong with one response, by the fuzz run's pass criteria (besides not_a_server_error)."""
    if resp.status_code < 400:
        return []
    headers = {k.lower(): (v[0] if isinstance(v, list) else v) for k, v in resp.headers.items()}
    try:
        body = json.loads(resp.content)
    except ValueError:
        return [f"{resp.status_code} not JSON: {resp.content[:200]!r}"]
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict) or not err.get("request_id"):
        return [f"{resp.status_code} error without a request id: {str(body)[:200]}"]
    if err["request_id"] != headers.get("x-request-id"):
        return [f"{resp.status_code} request id {err['request_id']!r} differs from the header {headers.get('x-request-id')!r}"]
    return []


def test_schemathesis_fuzz_no_5xx_and_every_error_has_a_request_id(edge_app, fresh_upstream, figures):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    fresh_upstream.set("backup", "ok")
    raw = requests.get(f"{edge_app.base}/openapi.json", timeout=30).json()
    raw, added = _schema_with_bodies(raw)
    schema = schemathesis.openapi.from_dict(raw)
    headers = edge_app.headers("admin")
    session = requests.Session()
    sent: Counter = Counter()
    statuses: Counter = Counter()
    failures: list[str] = []
    t0 = time.monotonic()
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) >= 8, [op.label for op in operations]

    def fuzz(op, mode) -> None:
        @settings(
            max_examples=MAX_EXAMPLES.get(op.path, DEFAULT_EXAMPLES),
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case):
            resp = case.call(base_url=edge_app.base, session=session, headers=headers, timeout=30)
            sent[f"{op.label} [{mode.value}]"] += 1
            statuses[resp.status_code] += 1
            problems = _problems(resp)
            try:
                case.validate_response(resp, checks=[not_a_server_error])
            except Exception as e:  # schemathesis's failure (FailureGroup): recorded, the run goes on
                problems.append(f"not_a_server_error: {type(e).__name__}: {str(e)[:200]}")
            for p in problems:
                failures.append(f"{op.label} [{mode.value}] {case.method} {case.formatted_path}: {p}")

        run()

    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(op, mode)
    total = sum(sent.values())
    elapsed = time.monotonic() - t0
    figures(
        generated_requests=total,
        operations=len(operations),
        per_operation=dict(sent),
        statuses={str(k): v for k, v in sorted(statuses.items())},
        server_errors=sum(v for k, v in statuses.items() if k >= 500),
        failures=len(failures),
        bodies_added_to_schema=added,
        fuzz_s=round(elapsed, 1),
    )
    assert total >= 200, sent
    assert not failures, failures[:20]
