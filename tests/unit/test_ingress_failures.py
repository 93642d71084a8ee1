"""How the ingress answers each failure a dispatch can raise (`deployments.ingress._failure`): status, code,
Retry-After, and what the key is charged."""

from __future__ import annotations

import pytest

from banditrouter.config import load_config


@pytest.fixture(scope="module")
def cfg():
    return load_config({"models": [{"name": "a"}, {"name": "b"}]})


def test_an_unavailable_router_replica_is_a_503_with_retry_after_and_charges_nothing(cfg):
    from ray.serve.exceptions import ReplicaUnavailableError

    from deployments.ingress import _failure

    err, spent = _failure(ReplicaUnavailableError("replica gone"), "router", 0.5, cfg)
    assert (err.status, err.code, spent) == (503, "unavailable", 0.0) and err.retry_after_s >= 1
    assert "replica gone" not in err.message  # Ray's text stays in the log


def test_an_upstream_timeout_is_a_504_charged_at_the_bound_and_a_refusal_a_400(cfg):
    from deployments.backends import BackendError
    from deployments.ingress import _failure

    err, spent = _failure(BackendError("the upstream of model 'a' did not answer within 60 s", status=504), "a", 0.5, cfg)
    assert (err.status, err.code, spent) == (504, "model_timeout", 0.5)
    err, spent = _failure(BackendError("refused (400): too long", status=400, client_error=True), "a", 0.5, cfg)
    assert (err.status, err.code, spent) == (400, "upstream_refused", 0.0)


def test_tool_calls_and_the_finish_reason_reach_the_openai_shaped_message():
    """An upstream's tool calls (forwarded `tools`) must be where OpenAI clients read them:
    choices[0].message.tool_calls with the upstream's finish_reason, not only in the backend info."""
    import json

    from deployments.backends import CompletionResult
    from deployments.ingress import Ingress

    cls = Ingress.func_or_class
    ingress = object.__new__(cls)
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    result = CompletionResult("", 0.001, 10, 5, 0.1, {"backend": "openai", "finish_reason": "tool_calls", "tool_calls": [call]})
    body = json.loads(cls._completion(ingress, result, "a", None).body)
    choice = body["choices"][0]
    assert choice["message"]["tool_calls"] == [call] and choice["finish_reason"] == "tool_calls"
    assert "tool_calls" not in body["backend"]
    plain = CompletionResult("four", 0.001, 10, 5, 0.1, {"backend": "replay"})
    choice = json.loads(cls._completion(ingress, plain, "a", None).body)["choices"][0]
    assert choice == {"index": 0, "message": {"role": "assistant", "content": "four"}, "finish_reason": "stop"}


def test_a_client_that_leaves_mid_stream_closes_the_in_process_routers_stream():
    """With `router.fused: true` the ingress iterates the router's own async generator, which holds a model
    slot until it is closed: a client that goes away mid-stream must close it at once (not whenever the
    garbage collector gets to it), and the ticket is still settled."""
    import asyncio
    import gc

    from deployments.ingress import Ingress

    cls = Ingress.func_or_class
    ingress = object.__new__(cls)
    seen = {"closed": False, "settled": None}

    async def router_stream():
        try:
            for tok in ("a", "b", "c"):
                yield tok
        finally:
            seen["closed"] = True  # where the router gives back the model slot

    class Ticket:
        async def settle(self, cost):
            seen["settled"] = cost

    async def client():
        items = router_stream()
        events = cls._sse(ingress, "r1", "c1", "m", None, items, {"model": "m"}, Ticket(), 0.5)
        await events.__anext__()  # the role chunk
        await events.__anext__()  # "a"
        gc.disable()  # a reference cycle or a late collection must not be what frees the slot
        try:
            await events.aclose()  # the client disconnected
            return seen["closed"]
        finally:
            gc.enable()

    closed_at_once = asyncio.run(client())
    assert closed_at_once, "the router's stream (and its model slot) was left open after the client left"
    assert seen["settled"] == 0.5
