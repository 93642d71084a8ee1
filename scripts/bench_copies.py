"""Per-request CPU of the copies the router makes of a prompt's embedding, before and after issue 13's "fewer
copies" lever; prints JSON.

Per routed request the router (deployments/router.py) turns the 384-d float32 embedding into
1. the decision event's `context` (a list of floats: the event schema), and
2. that event's dict, once per consumer: the event sink (`MemorySink`; `JsonlSink` makes a second one for its
   line) and, with online learning on, the decision shipper.
Before: `[float(v) for v in x]` and `dataclasses.asdict` (it deep-copies the list item by item). After:
`x.tolist()` and `DecisionEvent.to_dict` (one shallow copy of each list field). Both give the same dicts
(checked here).

The `CompletionRequest` the router sends the model replica carries the context too. `--ray` times Ray's own
serialiser on it (the sender's side) with the context as a list (what the router sends) and as the float32
array, the form the issue suggested (it starts a local Ray).

    .venv/bin/python scripts/bench_copies.py                # 2000 repeats, median of 5 rounds
    .venv/bin/python scripts/bench_copies.py --ray

One thread; wall time per request on a shared machine is an upper bound. Compare with the ingress's CPU per
routed request (README, "Routing overhead").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time

import numpy as np

from banditrouter.schemas import DecisionEvent
from deployments.backends import CompletionRequest


def _event(context: list[float]) -> DecisionEvent:
    return DecisionEvent(
        decision_id="d" * 32,
        request_id="r" * 32,
        model="gpt-4-1106-preview",
        arm=3,
        propensity=1.0,
        policy="barp",
        policy_version=7,
        preference=(0.7, 0.3),
        context=context,
        context_ref="c" * 64,
        cost_usd=0.0012,
        latency_s=0.4,
        pool_version="p" * 12,
        user="u1",
        time=1_800_000_000.0,
        event_id="e" * 32,
        turn_ref="t" * 16,
        answer_ref="a" * 16,
        history_refs=("h" * 16,),
    )


def _request(context) -> CompletionRequest:
    return CompletionRequest(
        request_id="r" * 32, messages=[{"role": "user", "content": "x" * 200}], prompt="x" * 200, context=context
    )


def before(x: np.ndarray, dicts: int) -> list[dict]:
    ev = _event([float(v) for v in x])
    return [dataclasses.asdict(ev) for _ in range(dicts)]


def after(x: np.ndarray, dicts: int) -> list[dict]:
    ev = _event(x.tolist())
    return [ev.to_dict() for _ in range(dicts)]


def ray_serialise(x: np.ndarray, repeats: int, rounds: int) -> dict:
    """Microseconds for Ray's serialiser to serialise the CompletionRequest (the sender's side), per form."""
    import ray

    from banditrouter.ray_local import init_local_ray

    init_local_ray(log_to_driver=False)
    try:
        ctx = ray._private.worker.global_worker.get_serialization_context()

        out = {}
        for name, form in (("list", lambda: x.tolist()), ("array", lambda: x)):

            def send(_x, _d, form=form):
                return ctx.serialize(_request(form()))

            out[f"context_as_{name}_us"] = round(_per_call_us(send, x, 0, repeats, rounds), 1)
        return out
    finally:
        ray.shutdown()


def _per_call_us(fn, x: np.ndarray, dicts: int, repeats: int, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn(x, dicts)
        times.append((time.perf_counter() - t0) / repeats * 1e6)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2000, help="requests timed per round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; the median round is reported")
    ap.add_argument("--ray", action="store_true", help="also time Ray's serialiser on the CompletionRequest (sender side)")
    args = ap.parse_args()
    if args.repeats < 1 or args.rounds < 1:
        ap.error("--repeats and --rounds must be at least 1")
    x = np.random.default_rng(0).normal(size=384).astype(np.float32)
    x /= np.linalg.norm(x)
    same_event = before(x, 1) == after(x, 1)
    out: dict = {"embedding_dim": int(x.size), "same_event_dict": same_event}
    for dicts, case in ((1, "memory_sink_learning_off"), (3, "jsonl_sink_and_learning_on")):
        b = _per_call_us(before, x, dicts, args.repeats, args.rounds)
        a = _per_call_us(after, x, dicts, args.repeats, args.rounds)
        out[case] = {"event_dicts": dicts, "before_us": round(b, 1), "after_us": round(a, 1), "saved_us": round(b - a, 1)}
    if args.ray:
        out["completion_request_through_ray"] = ray_serialise(x, args.repeats, args.rounds)
    out["machine"] = {"platform": platform.platform(), "python": platform.python_version()}
    print(json.dumps(out, indent=2))
    if not same_event:
        raise SystemExit("the new event dicts differ from the old ones")


if __name__ == "__main__":
    main()
