"""Implicit signals (issue 10 §1, ARCHITECTURE.md "Implicit signals"): what a user's next request says about
their previous decision, one test per rule, through `EventBuffer` with an injected clock (no Ray).

Each decision is built as the router logs it: the refs come from the request's messages through
`deployments/conversation.py`, the answer ref from the answer text, `time` is when it was decided and the
answer was out at `time + latency_s`."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from factories import FakeHandle

from banditrouter.schemas import DecisionEvent, FeedbackEvent
from deployments import conversation
from deployments.conversation import text_ref
from learner.buffer import EventBuffer, implicit_event_id

THETA, T, LATENCY, GRACE = 0.9, 30.0, 2.0, 10.0


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _unit(v: np.ndarray) -> list[float]:
    return [float(a) for a in v / np.linalg.norm(v)]


class Embeddings:
    """A stand-in embedder: a fixed random unit vector per text, near ones for texts declared rewordings."""

    def __init__(self, dim: int = 16, seed: int = 0):
        self.rng, self.dim, self.known = np.random.default_rng(seed), dim, {}

    def __call__(self, text: str, like: str | None = None) -> list[float]:
        if text not in self.known:
            base = np.asarray(self.known[like]) if like else self.rng.normal(size=self.dim)
            noise = 0.05 * self.rng.normal(size=self.dim) if like else 0.0
            self.known[text] = _unit(base + noise)
        return self.known[text]


def routed(
    i: int,
    messages: list[dict],
    answer: str | None,
    t: float,
    emb: Embeddings,
    *,
    user: str = "u",
    context_turns: int = 1,
    outcome: str = "ok",
    like: str | None = None,
) -> dict:
    """The DecisionEvent the router would log for this request (answer None: the call failed)."""
    conv = conversation.parse(messages, context_turns)
    turn_x = emb(conv.turn, like)
    ctx = turn_x if conv.routing_text == conv.turn else emb(conv.routing_text)
    return DecisionEvent(
        decision_id=f"d{i}",
        request_id=f"r{i}",
        model="m",
        arm=0,
        propensity=0.5,
        policy="acqb",
        policy_version=0,
        preference=(1.0, 0.0),
        context=ctx,
        context_ref=None,
        cost_usd=0.0 if answer is None else 0.001,
        latency_s=LATENCY,
        pool_version="p",
        user=user,
        time=t,
        outcome=outcome,
        turn_ref=conv.turn_ref,
        answer_ref=None if answer is None else conversation.text_ref(answer),
        history_refs=conv.history_refs,
        turn_context=None if ctx is turn_x else turn_x,
    ).to_dict()


def failed(i: int, messages: list[dict], t: float, emb: Embeddings, kind: str = "timeout", **kw) -> list[dict]:
    """A failed call as the router delivers it: the decision and its own outcome event."""
    return [routed(i, messages, None, t, emb, outcome=kind, **kw), FeedbackEvent(f"d{i}", kind, 0.0).to_dict()]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def after(ev: dict, seconds: float) -> float:
    """`seconds` after `ev`'s answer was delivered."""
    return ev["time"] + ev["latency_s"] + seconds


def labels(buf: EventBuffer) -> dict[str, list[tuple[str, float]]]:
    """decision id -> [(kind, value)] of every outcome event, in log order."""
    out: dict[str, list[tuple[str, float]]] = {}
    for _, e in buf.log.read(0):
        if e["kind"] != "decision":
            out.setdefault(e["decision_id"], []).append((e["kind"], e["value"]))
    return out


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def buf(tmp_path, clock) -> EventBuffer:
    b = EventBuffer(tmp_path / "e.sqlite", THETA, T, clock=clock)
    yield b
    b.close()


@pytest.fixture
def emb() -> Embeddings:
    return Embeddings()


# -- the rules --------------------------------------------------------------------------------------------------
def test_regenerate_is_a_retrial(buf, clock, emb):
    """Same conversation re-sent, same last user turn, without the previous answer, within T -> retrial 0."""
    history = [user("hi"), assistant("hello!")]
    d0 = routed(0, [*history, user("What is the capital of France?")], "Lyon.", clock.t, emb)
    buf.append_decisions([d0])
    clock.t = after(d0, 5)
    d1 = routed(1, [*history, user("What is the capital of France?")], "Paris.", clock.t, emb)
    buf.append_decisions([d1])
    assert labels(buf) == {"d0": [("retrial", 0.0)]}
    assert buf.stats()["implicit"] == {"retrial": 1}


def test_window_runs_from_the_answer_to_the_users_send_not_to_the_decision(buf, clock, emb):
    """A regenerate sent 5 s after the answer that then waits T in the router's pool (decided T + 5 s after the
    answer) is still a retrial: the window runs from `answered_at` to `requested_at`, not between decisions."""
    q = [user("What is the capital of France?")]
    d0 = routed(0, q, "Lyon.", clock.t, emb)
    d0["requested_at"], d0["answered_at"] = d0["time"] - 1.0, d0["time"] + LATENCY
    buf.append_decisions([d0])
    sent = d0["answered_at"] + 5
    clock.t = sent + T  # decided after waiting T in the pool (still within the tracking's T + grace)
    d1 = routed(1, q, "Paris.", clock.t, emb)
    d1["requested_at"], d1["queue_wait_s"] = sent, T
    buf.append_decisions([d1])
    assert labels(buf) == {"d0": [("retrial", 0.0)]}


def test_reworded_regenerate_is_a_retrial_by_cosine(buf, clock, emb):
    """Not the same text, but the latest turns' embeddings have cosine >= theta."""
    d0 = routed(0, [user("capital of France?")], "Lyon.", clock.t, emb)
    buf.append_decisions([d0])
    clock.t = after(d0, 5)
    d1 = routed(1, [user("what's France's capital?")], "Paris.", clock.t, emb, like="capital of France?")
    assert d1["turn_ref"] != d0["turn_ref"] and np.dot(d0["context"], d1["context"]) >= THETA
    buf.append_decisions([d1])
    assert labels(buf) == {"d0": [("retrial", 0.0)]}


def test_same_turn_text_is_a_retrial_without_embeddings(buf, clock, emb):
    """Decisions logged with references only (no context): the same normalised latest turn is enough."""
    d0 = routed(0, [user("capital of  France?")], "Lyon.", clock.t, emb)
    clock.t = after(d0, 5)
    d1 = routed(1, [user("capital of France? ")], "Paris.", clock.t, emb)
    for d in (d0, d1):
        d["context"] = None
    buf.append_decisions([d0])
    buf.append_decisions([d1])
    assert labels(buf) == {"d0": [("retrial", 0.0)]}


def test_continuation_is_accepted(buf, clock, emb):
    """The next request carries the previous answer as an assistant turn -> accepted 1 at once, even when its
    latest turn is the same text ("go on" twice) and whitespace in the answer was re-wrapped by the client."""
    d0 = routed(0, [user("Tell me a story."), assistant("Once..."), user("go on")], "There  was a\nking.", clock.t, emb)
    buf.append_decisions([d0])
    clock.t = after(d0, 5)
    msgs = [user("Tell me a story."), assistant("Once..."), user("go on"), assistant("There was a king. "), user("go on")]
    d1 = routed(1, msgs, "And a queen.", clock.t, emb)
    assert d1["turn_ref"] == d0["turn_ref"]  # without the continuation rule this would be a regenerate
    buf.append_decisions([d1])
    assert labels(buf) == {"d0": [("accepted", 1.0)]}
    assert buf.stats()["implicit"] == {"continuation": 1}


def test_new_question_is_accepted(buf, clock, emb):
    """A different question (low similarity), previous answer not carried -> accepted 1 at once."""
    d0 = routed(0, [user("What is the capital of France?")], "Paris.", clock.t, emb)
    buf.append_decisions([d0])
    clock.t = after(d0, 5)
    d1 = routed(1, [user("How do I sort a list in Python?")], "sorted(xs)", clock.t, emb)
    assert np.dot(d0["context"], d1["context"]) < THETA
    buf.append_decisions([d1])
    assert labels(buf) == {"d0": [("accepted", 1.0)]}
    assert buf.stats()["implicit"] == {"new_question": 1}


def test_follow_up_in_a_long_chat_is_not_a_retrial(buf, clock, emb):
    """context_turns > 1: the routing contexts of two follow-ups share a long history (cosine 1 here), but
    the latest turns differ: the buffer compares the latest turns (`turn_context`), so it is a new question."""
    history = [user("long shared history " * 50), assistant("ok")]
    d0 = routed(0, [*history, user("first follow-up")], "a0", clock.t, emb, context_turns=4)
    d1_msgs = [*history, user("second, unrelated follow-up")]
    clock.t = after(d0, 5)
    d1 = routed(1, d1_msgs, "a1", clock.t, emb, context_turns=4)
    d1["context"] = d0["context"]  # the history dominates the routing text's embedding
    assert d0["turn_context"] is not None and np.dot(d0["turn_context"], d1["turn_context"]) < THETA
    buf.append_decisions([d0])
    buf.append_decisions([d1])
    assert labels(buf) == {"d0": [("accepted", 1.0)]}


def test_nothing_within_T_is_accepted(buf, clock, emb):
    """Accepted T + grace after the decision reached the buffer (a next request decided within T may still
    be on its way)."""
    d0 = routed(0, [user("capital of France?")], "Paris.", clock.t, emb)
    buf.append_decisions([d0])
    assert buf.sweep(now=clock.t + T + GRACE - 1) == 0 and labels(buf) == {}
    assert buf.sweep(now=clock.t + T + GRACE + 1) == 1
    assert labels(buf) == {"d0": [("accepted", 1.0)]}
    assert buf.stats()["implicit"] == {"no_request": 1}


def test_same_question_after_T_is_accepted_not_a_retrial(buf, clock, emb):
    """The window counts from the answer's delivery to the next decision; past T the same turn is a new ask.
    (The buffer has not swept yet: the decision arrived late, e.g. from a router's spill.)"""
    d0 = routed(0, [user("capital of France?")], "Paris.", clock.t, emb)
    buf.append_decisions([d0])
    d1 = routed(1, [user("capital of France?")], "Paris.", after(d0, T + 1), emb)
    buf.append_decisions([d1])
    assert labels(buf) == {"d0": [("accepted", 1.0)]}
    assert buf.stats()["implicit"] == {"late": 1}


def test_window_starts_when_the_answer_was_delivered(buf, clock, emb):
    """Decided T - 1 s after the answer came out: a retrial, though more than T after the first decision."""
    d0 = routed(0, [user("capital of France?")], "Lyon.", clock.t, emb)
    d0["latency_s"] = 20.0
    clock.t = after(d0, 0)  # the router logs a decision once it has answered
    buf.append_decisions([d0])
    clock.t = after(d0, T - 1)
    assert clock.t - d0["time"] > T
    buf.append_decisions([routed(1, [user("capital of France?")], "Paris.", clock.t, emb)])
    assert labels(buf) == {"d0": [("retrial", 0.0)]}


def test_request_sent_before_the_answer_labels_nothing(buf, clock, emb):
    """A request decided before the previous answer was delivered cannot react to it (a double submit): no
    label now; the earlier decision is accepted when its window ends."""
    d0 = routed(0, [user("capital of France?")], "Paris.", clock.t, emb)
    d1 = routed(1, [user("capital of France?")], "Paris.", clock.t + LATENCY / 2, emb)
    buf.append_decisions([d0])
    buf.append_decisions([d1])
    assert labels(buf) == {} and buf.stats()["implicit"] == {"concurrent": 1}
    buf.sweep(now=clock.t + T + GRACE + 1)
    assert labels(buf) == {"d0": [("accepted", 1.0)], "d1": [("accepted", 1.0)]}


# -- failures ---------------------------------------------------------------------------------------------------
def test_retry_after_a_failed_request_labels_no_older_decision(buf, clock, emb):
    """d0 answered; the user's next question d1 fails; the user retries it (d2, same messages). The retry is
    charged to d1 (which has its own timeout event), not to d0 (labelled once, by d1: a continuation), and
    d1 is never accepted."""
    d0 = routed(0, [user("capital of France?")], "Paris.", clock.t, emb)
    buf.append_decisions([d0])
    clock.t = after(d0, 5)
    msgs = [user("capital of France?"), assistant("Paris."), user("and of Spain?")]
    buf.append_decisions(failed(1, msgs, clock.t, emb))
    clock.t += LATENCY + 1
    buf.append_decisions([routed(2, msgs, "Madrid.", clock.t, emb)])
    assert labels(buf) == {"d0": [("accepted", 1.0)], "d1": [("timeout", 0.0)]}
    assert buf.stats()["implicit"] == {"continuation": 1, "after_failure": 1}
    buf.sweep(now=clock.t + T + GRACE + 1)
    assert labels(buf) == {"d0": [("accepted", 1.0)], "d1": [("timeout", 0.0)], "d2": [("accepted", 1.0)]}


def test_regenerate_that_times_out_is_a_retrial_of_the_previous_answer(tmp_path, clock, emb):
    """d0 answered; 5 s later the user regenerates (d1: a retrial of d0) and d1 times out after 120 s; the
    retry d2 of the failed d1 labels nothing. Were failed decisions untracked, d2 would be compared with d0,
    more than T after d0's answer, and d0 accepted. (d1 reaches the buffer 120 s after it was decided: the
    grace covers the router's model timeout here.)"""
    buf = EventBuffer(tmp_path / "e.sqlite", THETA, T, retrial_grace_s=125.0, clock=clock)
    d0 = routed(0, [user("capital of France?")], "Lyon.", clock.t, emb)
    clock.t = after(d0, 0)  # the router logs a decision once it has answered
    buf.append_decisions([d0])
    clock.t = after(d0, 5)
    d1 = failed(1, [user("capital of France?")], clock.t, emb)
    d1[0]["latency_s"] = 120.0
    clock.t = after(d1[0], 0)
    buf.append_decisions(d1)
    clock.t += 1
    buf.append_decisions([routed(2, [user("capital of France?")], "Paris.", clock.t, emb)])
    assert labels(buf) == {"d0": [("retrial", 0.0)], "d1": [("timeout", 0.0)]}
    assert buf.stats()["implicit"] == {"retrial": 1, "after_failure": 1}


# -- duplicates, order, bounds ----------------------------------------------------------------------------------
def test_redelivered_decision_labels_nothing(buf, clock, emb):
    """At-least-once delivery: d0 and d1 (a retrial of d0) re-delivered, alone or in one batch, change
    nothing; a router re-emitting a decision under a fresh event id is not a retrial of itself."""
    d0 = routed(0, [user("capital of France?")], "Lyon.", clock.t, emb)
    buf.append_decisions([d0])
    clock.t = after(d0, 5)
    d1 = routed(1, [user("capital of France?")], "Paris.", clock.t, emb)
    buf.append_decisions([d1])
    before = buf.log.event_ids()
    assert buf.append_decisions([d1]) == 0 and buf.append_decisions([d0, d1, d1]) == 0
    assert buf.log.event_ids() == before
    d2 = routed(2, [user("capital of Spain?")], "Madrid.", after(d1, 1), emb)
    twin = {**d2, "event_id": "another-event-id"}
    buf.append_decisions([d2, twin])
    assert "d2" not in labels(buf) and buf.stats()["implicit"]["duplicate"] == 1
    assert labels(buf) == {"d0": [("retrial", 0.0)], "d1": [("accepted", 1.0)]}


def test_a_decision_gets_at_most_one_implicit_label(tmp_path, clock, emb, monkeypatch):
    """Implicit labels have the id `<decision_id>:implicit`: the log keeps the first whatever replays it.
    A restart replays the last T seconds of decisions through the same rules: nothing is labelled twice."""
    monkeypatch.setattr(time, "time", clock)  # the log stamps arrivals with wall time: make it the test's
    buf = EventBuffer(tmp_path / "e.sqlite", THETA, T, clock=clock)
    d0 = routed(0, [user("capital of France?")], "Lyon.", clock.t, emb)
    buf.append_decisions([d0])
    clock.t = after(d0, 5)
    buf.append_decisions([routed(1, [user("capital of France?")], "Paris.", clock.t, emb)])
    implicit = [e for _, e in buf.log.read(0) if e["kind"] in ("retrial", "accepted")]
    assert [e["event_id"] for e in implicit] == [implicit_event_id("d0")]
    del buf  # crash
    clock.t += 1
    again = EventBuffer(tmp_path / "e.sqlite", THETA, T, clock=clock)
    assert again.stats()["implicit"]["rebuilt"] == 2
    again.sweep(now=clock.t + T + 10)  # d1 accepted at expiry; d0's accepted would be a second label
    assert labels(again) == {"d0": [("retrial", 0.0)], "d1": [("accepted", 1.0)]}


def test_out_of_order_decision_labels_nothing(buf, clock, emb):
    """A decision older than the user's tracked one (delivered late, e.g. from another replica's spill)
    labels nothing and is not tracked: counted."""
    d0 = routed(0, [user("capital of France?")], "Lyon.", clock.t, emb)
    d1 = routed(1, [user("capital of France?")], "Paris.", after(d0, 5), emb)
    buf.append_decisions([d1])
    buf.append_decisions([d0])
    assert labels(buf) == {} and buf.stats()["implicit"] == {"out_of_order": 1}
    assert buf.stats()["awaiting_acceptance"] == 1
    buf.sweep(now=clock.t + T + 10)
    assert labels(buf) == {"d1": [("accepted", 1.0)]}


def test_per_user_state_is_bounded_and_evictions_counted(tmp_path, clock, emb):
    buf = EventBuffer(tmp_path / "e.sqlite", THETA, T, max_tracked_users=3, clock=clock)
    firsts = [routed(i, [user("capital of France?")], "Lyon.", clock.t, emb, user=f"u{i}") for i in range(5)]
    buf.append_decisions(firsts)
    st = buf.stats()
    assert st["tracked_users"] == 3 and st["awaiting_acceptance"] == 3
    assert st["dropped"] == {"user_state": 2, "awaiting_acceptance": 2}
    clock.t = after(firsts[0], 5)  # u0 was pushed out: its regenerate has nothing to label
    buf.append_decisions([routed(10, [user("capital of France?")], "Paris.", clock.t, emb, user="u0")])
    clock.t = after(firsts[4], 5)  # u4 is still tracked
    buf.append_decisions([routed(11, [user("capital of France?")], "Paris.", clock.t, emb, user="u4")])
    assert labels(buf) == {"d4": [("retrial", 0.0)]}
    clock.t += T + 10  # and the TTL empties it
    buf.sweep()
    assert buf.stats()["tracked_users"] == 0 and buf.stats()["awaiting_acceptance"] == 0


# -- restart ----------------------------------------------------------------------------------------------------
def test_tracking_survives_a_buffer_restart(tmp_path, clock, emb, monkeypatch):
    """The buffer dies between d0 and the user's regenerate: the rebuilt state still labels d0 a retrial."""
    monkeypatch.setattr(time, "time", clock)
    buf = EventBuffer(tmp_path / "e.sqlite", THETA, T, clock=clock)
    d0 = routed(0, [user("capital of France?")], "Lyon.", clock.t, emb)
    buf.append_decisions([d0])
    del buf
    clock.t = after(d0, 5)
    again = EventBuffer(tmp_path / "e.sqlite", THETA, T, clock=clock)
    again.append_decisions([routed(1, [user("capital of France?")], "Paris.", clock.t, emb)])
    assert labels(again) == {"d0": [("retrial", 0.0)]}


def test_labels_due_while_the_buffer_was_down_are_written_on_restart(tmp_path, clock, emb, monkeypatch):
    """d0 fell due while nothing touched the tracking state (only a decision without a user came) and the
    buffer died before its next sweep: the rebuild replays it and the closing sweep accepts it. Decisions
    older than 2T before the log's last event are not replayed (their labels were written long before)."""
    monkeypatch.setattr(time, "time", clock)
    buf = EventBuffer(tmp_path / "e.sqlite", THETA, T, clock=clock)
    ancient = routed(0, [user("an old question")], "a", clock.t, emb, user="w")
    buf.append_decisions([ancient])
    clock.t += 3 * T
    d1 = routed(1, [user("capital of France?")], "Paris.", clock.t, emb)
    buf.append_decisions([d1])  # tracking it expires `ancient`: accepted live
    clock.t += T + 5
    buf.append_decisions([routed(2, [user("anonymous")], "x", clock.t, emb, user=None)])
    assert labels(buf) == {"d0": [("accepted", 1.0)]}
    del buf  # crash before the sweep that would accept d1
    clock.t += 10 * T
    again = EventBuffer(tmp_path / "e.sqlite", THETA, T, clock=clock)
    assert again.stats()["implicit"] == {"rebuilt": 1, "no_request": 1}
    assert labels(again) == {"d0": [("accepted", 1.0)], "d1": [("accepted", 1.0)]}


# -- what the router logs for the buffer to read ------------------------------------------------------------------
ROUTER_MODELS = ("cheap", "strong")


def _router(tmp_path, complete, log: list):
    from banditrouter.config import load_config
    from banditrouter.policies import make_policy, save_checkpoint
    from deployments.router import Router

    ckpt = save_checkpoint(make_policy("linucb", ROUTER_MODELS, 8, tau=0.01), tmp_path / "p.pt")
    cfg = load_config({"policy": {"name": "linucb", "checkpoint": str(ckpt)}, "models": [{"name": m} for m in ROUTER_MODELS]})

    async def embed(text):
        log.append(("embed start", text, time.time()))
        await asyncio.sleep(0.05)
        log.append(("embed end", text, time.time()))
        v = np.random.default_rng(len(text)).normal(size=8)
        return (v / np.linalg.norm(v)).astype(np.float32)

    return Router.func_or_class(cfg, FakeHandle(__call__=embed), {m: FakeHandle(complete=complete) for m in ROUTER_MODELS})


def test_router_logs_the_decision_time_the_latest_turn_and_refs(tmp_path):
    """The decision is stamped before the model call (not after the completion); the latest turn is embedded
    beside the routing text, concurrently; the refs are those of the turn, the answer and the history."""
    from deployments.backends import CompletionResult
    from deployments.router import RouteRequest

    log: list = []

    async def complete(creq):
        log.append(("call", creq.prompt, time.time()))
        await asyncio.sleep(0.2)
        return CompletionResult(text="Madrid  is the capital.\n", cost_usd=0.001, input_tokens=1, output_tokens=1, latency_s=0.2)

    router = _router(tmp_path, complete, log)
    messages = [user("capital of France?"), assistant("Paris."), user("and of Spain?")]
    conv = conversation.parse(messages, context_turns=2)
    req = RouteRequest("r1", messages, conv.routing_text, (1.0, 0.0), user="u", turn=conv.turn, history_refs=conv.history_refs)
    asyncio.run(router.route(req))
    ev = router.sink.recent(1)[0]
    call_at = next(t for kind, _, t in log if kind == "call")
    assert ev["time"] <= call_at and ev["latency_s"] == 0.2
    starts = [(text, t) for kind, text, t in log if kind == "embed start"]
    ends = [t for kind, _, t in log if kind == "embed end"]
    assert {text for text, _ in starts} == {"and of Spain?\ncapital of France?", "and of Spain?"}
    assert max(t for _, t in starts) < min(ends)  # both embeddings in flight at once
    assert ev["turn_ref"] == text_ref("and of Spain?") and ev["turn_ref"] != text_ref(conv.routing_text)
    assert ev["answer_ref"] == text_ref("Madrid is the capital.")
    assert list(ev["history_refs"]) == [text_ref("Paris.")]
    assert ev["turn_context"] is not None and not np.allclose(ev["turn_context"], ev["context"])

    # one user turn: the routing text is the latest turn, embedded once, and `context` serves as its embedding
    log.clear()
    single = conversation.parse([user("capital of France?")], context_turns=2)
    asyncio.run(router.route(RouteRequest("r2", [user("capital of France?")], single.routing_text, (1.0, 0.0), turn=single.turn)))
    ev = router.sink.recent(1)[0]
    assert [kind for kind, _, _ in log].count("embed start") == 1 and ev["turn_context"] is None


def test_router_logs_no_answer_ref_for_a_failed_call(tmp_path):
    from deployments.backends import BackendError
    from deployments.router import RouteRequest

    async def complete(creq):
        raise BackendError("upstream down")

    router = _router(tmp_path, complete, [])
    with pytest.raises(BackendError):
        asyncio.run(router.route(RouteRequest("r1", [user("q")], "q", (1.0, 0.0), user="u", turn="q")))
    decision, outcome = router.sink.recent(2)
    assert decision["outcome"] == "error" and decision["answer_ref"] is None and decision["turn_ref"] == text_ref("q")
    assert outcome["kind"] == "error"
