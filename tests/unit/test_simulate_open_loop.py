"""`banditrouter simulate --rate R --retrials` against a fake service (no Ray): Poisson arrivals, users who
re-send the same conversation as the same user when the answer did not satisfy them (a Bernoulli draw on the
logged score) or on a 503, no explicit feedback, and the figures online.json reports."""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import pytest

from banditrouter.data.log import RoutingLog

MODELS = ("bad", "good")


class FakeService:
    """Answers the first request of each user with `bad` (logged score 0: never satisfies), the next with
    `good` (score 1); the very first request of all gets a 503 with Retry-After instead."""

    def __init__(self):
        self.chats: list[dict] = []
        self.feedback: list[dict] = []
        self.seen_users: dict[str, int] = {}
        self.port = None
        self._ready = threading.Event()

    def start(self):
        threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True).start()
        assert self._ready.wait(10)
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self):
        from aiohttp import web

        async def chat(request):
            body = await request.json()
            self.chats.append(body)
            if len(self.chats) == 1:
                return web.json_response({"error": {"type": "overloaded"}}, status=503, headers={"Retry-After": "2"})
            n = self.seen_users.get(body["user"], 0)
            self.seen_users[body["user"]] = n + 1
            model = "bad" if n == 0 else "good"
            routing = {"decision_id": f"d{len(self.chats)}", "model": model, "policy_version": len(self.chats),
                       "cost_usd": 0.0, "queue_length": n, "queue_wait_s": 0.01 * n}  # fmt: skip
            return web.json_response({"routing": routing, "choices": []})

        async def feedback(request):
            self.feedback.append(await request.json())
            return web.json_response({"status": "recorded"})

        async def health(request):
            return web.json_response({"learning": True, "models": list(MODELS), "tau": 1.0, "policy": "fake"})

        learner = {"seen": 1, "waiting_samples": 0, "staleness_p50_s": 0.1, "staleness_p95_s": 0.2,
                   "checkpoint": "x.pt", "policy": "fake"}  # fmt: skip

        async def stats(request):
            return web.json_response({"learner": learner, "buffer": {"last_seq": 1, "events": {}}})

        async def flush(request):  # the learner's stats after its final commit
            return web.json_response(learner)

        app = web.Application()
        app.add_routes(
            [
                web.post("/v1/chat/completions", chat),
                web.post("/v1/feedback", feedback),
                web.get("/health", health),
                web.get("/v1/learner/stats", stats),
                web.post("/v1/learner/flush", flush),
            ]
        )
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        await asyncio.Event().wait()


@pytest.fixture()
def fake_log(monkeypatch):
    import banditrouter.data

    n = 50
    log = RoutingLog(
        name="fake",
        prompt_ids=tuple(f"p{i}" for i in range(n)),
        prompts=tuple(f"question {i}?" for i in range(n)),
        models=MODELS,
        scores=np.column_stack([np.zeros(n), np.ones(n)]),
        costs=np.full((n, 2), 0.001),
    )
    monkeypatch.setattr(banditrouter.data, "load_dataset", lambda *a, **k: log)
    return log


def test_unsatisfied_users_resend_the_same_conversation_and_no_feedback_is_posted(tmp_path, fake_log):
    from banditrouter.simulate import RetrialUsers, run_open_loop

    svc = FakeService()
    url = svc.start()
    n = 30
    res = run_open_loop(
        url, "fake", "train", n, 40.0, tmp_path, retrials=True, seed=1, w_cost=0.0,
        users=RetrialUsers(max_retries=3, delay_s=(0.01, 0.02), patience_s=5), progress=False,
    )  # fmt: skip
    assert not svc.feedback and res["feedback"] is False  # implied by --rate with --retrials
    # every conversation: answered by `bad` (score 0, never satisfying) -> re-sent -> `good` (score 1)
    assert res["retrial_rate"] == 1.0 and res["windows"][0]["retrial_rate"] == 1.0
    assert res["windows"][0]["first_answer_satisfied"] == 0.0 and res["windows"][0]["gave_up"] == 0.0
    assert res["status_503"] == 1 and res["attempts"] == 2 * n + 1
    by_user: dict[str, list[dict]] = {}
    for body in svc.chats:
        by_user.setdefault(body["user"], []).append(body)
    assert len(by_user) == n  # one user per original request
    for bodies in by_user.values():
        # a regenerate: the same messages (no assistant turn), the same user, the same preference
        assert all(b == bodies[0] for b in bodies[1:])
        assert [m["role"] for m in bodies[0]["messages"]] == ["user"]
        assert bodies[0]["routing"]["preference"] == {"quality": 1.0, "cost": 0.0}
    first_503 = json.loads((tmp_path / "attempts.jsonl").read_text().splitlines()[0])
    assert "retry_after" in first_503
    assert res["queue_length_max"] == 1 and res["staleness_p95_s"] == 0.2
    assert (tmp_path / "online.png").exists()


def test_satisfaction_is_a_bernoulli_draw_on_the_logged_score(tmp_path, fake_log):
    """With feedback on and no retrials, each request is sent once; the share satisfied matches the score."""
    from banditrouter.simulate import RetrialUsers, run_open_loop

    fake_log.scores[:, 0] = 0.3  # `bad` now satisfies 30% of the time
    svc = FakeService()
    url = svc.start()
    res = run_open_loop(
        url, "fake", "train", 400, 400.0, tmp_path, retrials=False, seed=2, w_cost=0.5,
        users=RetrialUsers(max_retries=0, patience_s=5), progress=False,
    )  # fmt: skip
    assert res["feedback"] is True and len(svc.feedback) == 399  # one 503, no re-sends
    assert all(f["score"] == pytest.approx(0.3) for f in svc.feedback)
    assert res["retrial_rate"] == 0.0
    sat = [json.loads(line)["satisfied"] for line in (tmp_path / "attempts.jsonl").read_text().splitlines()]
    assert 0.22 < np.mean(sat) < 0.38


def test_open_loop_refuses_bad_settings(tmp_path, fake_log):
    from banditrouter.simulate import RetrialUsers, SimulationError, run_open_loop

    with pytest.raises(SimulationError):
        run_open_loop("http://127.0.0.1:9", "fake", "train", 5, 0.0, tmp_path)
    with pytest.raises(SimulationError):
        RetrialUsers(delay_s=(2.0, 1.0))
    with pytest.raises(SimulationError):
        run_open_loop("http://127.0.0.1:9", "fake", "train", 5, 1.0, tmp_path, w_cost=1.5)
