"""The buffer and learner as Ray actors (named, detached, restarted by Ray when they die).

Routers and the ingress find them by name (`get_or_create`), so every replica on every node talks to the
same two actors. The learner runs its consume/update loop in a thread and answers `wait_for_weights`
long-polls from routers: a router asks "newer than version v?" and the call returns as soon as there is one,
so new weights reach every router replica without the learner knowing where the replicas are.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from banditrouter.config import AppConfig

BUFFER_NAME = "banditrouter-buffer"
LEARNER_NAME = "banditrouter-learner"
NAMESPACE = "banditrouter"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class BufferActor:
    def __init__(self, path: str, retrial_similarity: float, retrial_window_s: float):
        from learner.buffer import EventBuffer

        self.buffer = EventBuffer(path, retrial_similarity, retrial_window_s)
        self._last_sweep = time.time()

    def append_decisions(self, events: list[dict[str, Any]]) -> int:
        return self.buffer.append_decisions(events)

    def add_feedback(self, decision_id: str, score: Any, event_id: str | None = None) -> dict[str, Any]:
        from learner.buffer import FeedbackRefused

        try:
            return {"code": 200, **self.buffer.add_feedback(decision_id, score, event_id)}
        except FeedbackRefused as e:
            return {"code": e.status, "status": "refused", "reason": e.reason, "message": str(e)}

    def read(self, after: int, limit: int = 1000) -> list[tuple[int, dict[str, Any]]]:
        if time.time() - self._last_sweep > 1.0:
            self.buffer.sweep()
            self._last_sweep = time.time()
        return self.buffer.log.read(after, limit)

    def sweep(self, now: float | None = None) -> int:
        return self.buffer.sweep(now)

    def stats(self) -> dict[str, Any]:
        return self.buffer.stats()

    def event_ids(self) -> list[str]:
        return self.buffer.log.event_ids()


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=64)
class LearnerActor:
    """Async actor: `wait_for_weights` long-polls run concurrently; learning runs in a thread."""

    def __init__(self, cfg: AppConfig):
        from banditrouter.policies import load_checkpoint, untrained_like
        from learner.core import Learner, LearnerSettings

        lc = cfg.learning
        self.cfg = cfg
        policy = load_checkpoint(cfg.policy.checkpoint)
        if lc.cold_start:
            policy = untrained_like(policy)
        self.buffer = get_or_create_buffer(cfg)
        self.core = Learner(
            policy,
            lc.state_dir,
            LearnerSettings(
                batch_size=lc.batch_size,
                max_wait_s=lc.max_wait_s,
                train_on_implicit=lc.train_on_implicit,
                replay_steps=lc.replay_steps,
                replay_relabel=lc.replay_relabel,
            ),
        )
        self.lock = threading.Lock()
        from banditrouter.metrics import LearnerMetrics

        self.metrics = LearnerMetrics()
        self._last_stats = 0.0
        self.core.restore(lambda after, limit: ray.get(self.buffer.read.remote(after, limit)))
        self.published = self._publish()
        self.installs: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._loop, name="learner", daemon=True)
        self.thread.start()

    def _publish(self) -> tuple[int, dict[str, Any]]:
        return (self.core.policy.version, self.core.policy.state_dict())

    def _observe(self, rows) -> None:
        for _, ev in rows:
            if ev["kind"] != "decision":
                self.metrics.feedback.inc(1.0, tags={"kind": ev["kind"]})
        now = time.time()
        if now - self._last_stats > 1.0:
            self._last_stats = now
            try:
                st = ray.get(self.buffer.stats.remote())
            except Exception:
                return
            self.metrics.depth.set(st["last_seq"])
            self.metrics.lag.set(max(0, st["last_seq"] - self.core.seen))
            for reason, n in st["refused"].items():
                self.metrics.refused.set(n, tags={"reason": reason})

    def _loop(self) -> None:
        interval = self.cfg.learning.poll_interval_s
        while True:
            try:
                rows = ray.get(self.buffer.read.remote(self.core.seen, 2000))
            except Exception:  # the buffer is restarting; try again
                time.sleep(interval)
                continue
            try:
                self._step(rows)
            except Exception as e:  # never let the loop die silently: log, count, go on
                import logging

                logging.getLogger(__name__).exception("learner step failed: %s", e)
                self.core.counts["step_errors"] += 1
            if not rows:
                time.sleep(interval)

    def _step(self, rows) -> None:
        with self.lock:
            self.core.consume(rows)
            if self.core.ready():
                if self.core.update(commit=False) is not None:
                    # publish, then commit: routers do not wait for the disk. A crash in between re-derives
                    # the same events' update after restart (the commit has not moved the offset).
                    self.published = self._publish()
                    self.core.commit()
                    self.metrics.version.set(self.core.policy.version)
                    self.metrics.reward.set(float(np.mean(self.core.last_rewards)))
                    self.metrics.samples.inc(float(len(self.core.last_rewards)))
            elif self.core._uncommitted and not self.core.samples and not rows:
                self.core.commit()  # idle: record what was read (decisions without outcomes yet)
        self._observe(rows)

    # -- routers ----------------------------------------------------------------------------------------------
    async def wait_for_weights(self, known_version: int, timeout_s: float = 10.0) -> tuple[int, dict[str, Any]] | None:
        end = time.monotonic() + timeout_s
        while True:
            version, state = self.published
            if version != known_version:
                return version, state
            if time.monotonic() >= end:
                return None
            await asyncio.sleep(0.02)

    def report_install(self, replica: str, version: int, installed_at: float) -> None:
        caused = self.core.version_feedback_time.get(version)
        self.installs.append(
            {
                "replica": replica,
                "version": version,
                "time": installed_at,
                "staleness_s": None if caused is None else installed_at - caused,
            }
        )

    # -- operators --------------------------------------------------------------------------------------------
    def reset(self) -> int:
        """Cold start: replace the policy with an untrained one (version continues); routers install it."""
        from banditrouter.policies import untrained_like

        with self.lock:
            self.core.reset(untrained_like(self.core.policy))
            self.published = self._publish()
            return self.core.policy.version

    def stats(self) -> dict[str, Any]:
        st = [i["staleness_s"] for i in self.installs if i["staleness_s"] is not None]
        with self.lock:
            return {
                "policy": self.core.policy.name,
                "version": self.core.policy.version,
                "offset": self.core.offset,
                "seen": self.core.seen,
                "pending_decisions": len(self.core.pending),
                "waiting_samples": len(self.core.samples),
                "counts": dict(self.core.counts),
                "checkpoint": str(self.core.export_path),
                "staleness_p50_s": float(np.percentile(st, 50)) if st else None,
                "staleness_p95_s": float(np.percentile(st, 95)) if st else None,
                "installs": len(self.installs),
                "tau": self.core.policy.tau,
            }

    def installs_log(self) -> list[dict[str, Any]]:
        return list(self.installs)

    def consumed_ids(self) -> list[str]:
        with self.lock:
            return self.core.consumed_ids()

    def flush(self) -> dict[str, Any]:
        """Consume everything in the log now and commit (end of a run, tests)."""
        with self.lock:
            self.core.consume(ray.get(self.buffer.read.remote(self.core.seen, 1_000_000)))
            if self.core.samples:
                if self.core.update() is not None:
                    self.published = self._publish()
            self.core.commit(export=True)
        return self.stats()


def _get_or_create(actor_cls, name: str, *args):
    return actor_cls.options(name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached").remote(*args)


def get_or_create_buffer(cfg: AppConfig):
    lc = cfg.learning
    return _get_or_create(
        BufferActor, BUFFER_NAME, str(Path(lc.state_dir) / "events.sqlite"), lc.retrial_similarity, lc.retrial_window_s
    )


def get_or_create_learner(cfg: AppConfig):
    return _get_or_create(LearnerActor, LEARNER_NAME, cfg)


def kill_actors() -> None:
    """Remove the detached buffer and learner (tests, `banditrouter serve` on exit)."""
    for name in (LEARNER_NAME, BUFFER_NAME):
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except ValueError:
            pass
