"""The buffer and learner as Ray actors (named, detached, restarted by Ray when they die).

Routers and the ingress find them by name (`get_or_create`), so every replica on every node talks to the
same two actors. The learner runs its consume/update loop in a thread and answers `wait_for_weights`
long-polls from routers: a router asks "newer than version v?" and the call returns as soon as there is one,
so new weights reach every router replica without the learner knowing where the replicas are.

The learner is an async actor: its event loop serves the long-polls, so nothing on the loop may block. The
learner thread holds `lock` through an update, pickling, commit and save; every method that needs the lock
(or reads the log) hands that work to a thread (`asyncio.to_thread`). `published` is one tuple swapped by
reference, read without the lock. Each version is put in the object store once (`ray.put`) and pollers get
its reference, so 64 pollers do not pickle 64 copies of LinUCB's 13 MB of matrices. What is published is the
policy's `serving_state_dict()`: what a router needs to decide (ACQB: theta, chol_inv, cost_beta, counters,
without the H and cost Gram matrices it learns with); commits and the .pt export keep the full state.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import ray

from banditrouter.config import AppConfig
from banditrouter.threads import limit_blas_threads

BUFFER_NAME = "banditrouter-buffer"
LEARNER_NAME = "banditrouter-learner"
NAMESPACE = "banditrouter"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class BufferActor:
    """The one owner of the event log (`learner.buffer.EventBuffer`). Calls are retried across a restart
    (`max_task_retries=-1`); every append is idempotent by event id, so a retried call is harmless."""

    def __init__(
        self,
        path: str,
        retrial_similarity: float,
        retrial_window_s: float,
        feedback_hold_s: float = 30.0,
        max_held_feedback: int = 10_000,
        max_tracked_users: int = 100_000,
        retrial_grace_s: float = 10.0,
    ):
        limit_blas_threads()
        from learner.buffer import EventBuffer

        self.buffer = EventBuffer(
            path,
            retrial_similarity,
            retrial_window_s,
            feedback_hold_s=feedback_hold_s,
            max_held_feedback=max_held_feedback,
            max_tracked_users=max_tracked_users,
            retrial_grace_s=retrial_grace_s,
        )
        self._last_sweep = time.time()

    def append_decisions(self, events: list[dict[str, Any]]) -> int:
        """Decisions, and the error/timeout outcomes routers observe, in batches from router replicas."""
        return self.buffer.append_decisions(events)

    def add_feedback(
        self, decision_id: str, score: Any, event_id: str | None = None, key_id: str | None = None, user: str | None = None
    ) -> dict[str, Any]:
        """{"code": 200 recorded/duplicate | 202 held | 4xx refused, ...}: the status the ingress answers.
        `key_id` / `user`: who sends it; another key's or user's decision is refused 403 `not_owner`."""
        from learner.buffer import FeedbackRefused

        try:
            out = self.buffer.add_feedback(decision_id, score, event_id, key_id=key_id, user=user)
            return {"code": 202 if out["status"] == "held" else 200, **out}
        except FeedbackRefused as e:
            return {"code": e.status, "status": "refused", "reason": e.reason, "message": str(e)}

    def read(self, after: int, limit: int = 1000) -> list[tuple[int, dict[str, Any]]]:
        if time.time() - self._last_sweep > 1.0:
            self.buffer.sweep()
            self._last_sweep = time.time()
        return self.buffer.log.read(after, limit)

    def sweep(self, now: float | None = None) -> int:
        return self.buffer.sweep(now)

    def log_id(self) -> str:
        """The log's identity (a new file has a new one): the learner checks it against its commit."""
        return self.buffer.log.log_id()

    def compact(self, below_seq: int, older_than_s: float) -> int:
        """Retention: delete consumed events (seq < below_seq, the learner's safe floor) older than older_than_s."""
        return self.buffer.log.compact(below_seq, older_than_s)

    def first_seq(self) -> int:
        return self.buffer.log.first_seq()

    def stats(self) -> dict[str, Any]:
        return self.buffer.stats()

    def event_ids(self) -> list[str]:
        return self.buffer.log.event_ids()


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=1024)
class LearnerActor:
    """Async actor: `wait_for_weights` long-polls run concurrently on its loop (up to `max_concurrency`
    calls at once: every router replica keeps one open); learning runs in a thread."""

    def __init__(self, cfg: AppConfig):
        limit_blas_threads()
        from banditrouter.policies import load_checkpoint, untrained_like
        from learner.core import Learner, LearnerSettings

        lc = cfg.learning
        self.cfg = cfg
        policy = load_checkpoint(cfg.policy.checkpoint, expect=cfg.policy.name)
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
                learn_from_failures=lc.learn_from_failures,
                pending_horizon_s=lc.pending_horizon_s,
                max_pending=lc.max_pending,
            ),
        )
        self.lock = threading.Lock()
        from banditrouter.metrics import LearnerMetrics

        self.metrics = LearnerMetrics()
        self._last_stats = 0.0
        self._last_compact = self._last_commit = time.monotonic()
        self.core.restore(self._read, ray.get(self.buffer.log_id.remote()))
        self._event_loop: asyncio.AbstractEventLoop | None = None  # the actor's loop, once a poller is on it
        self._changed = asyncio.Event()  # set (and replaced) on every publish; pollers wait on it
        self.published: tuple[int, ray.ObjectRef] = self._publish()
        self.installs: deque[dict[str, Any]] = deque(maxlen=lc.installs_kept)
        self.thread = threading.Thread(target=self._loop, name="learner", daemon=True)
        self.thread.start()

    def _publish(self) -> tuple[int, ray.ObjectRef]:
        """The current policy as (version, object ref), put in the object store once; wakes the pollers.
        Runs in the learner thread (or a worker thread): it only schedules the wake-up on the loop, which the
        first poller recorded (with no poller yet, there is no one to wake)."""
        published = (self.core.policy.version, ray.put(self.core.policy.serving_state_dict()))
        self.published = published
        loop = self._event_loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the loop is closed: the actor is going away
                pass
        return published

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

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

    def _read(self, after: int, limit: int) -> list[tuple[int, dict[str, Any]]]:
        return ray.get(self.buffer.read.remote(after, limit))

    def _loop(self) -> None:
        interval = self.cfg.learning.poll_interval_s
        buffer_lost = False
        while True:
            try:
                if buffer_lost:  # it may have come back with another file: check before reading on
                    log_id = ray.get(self.buffer.log_id.remote())
                    with self.lock:
                        self.core.check_log(self._read, log_id)
                    buffer_lost = False
                # from one event before `seen`: the first row proves the log still holds what was read
                rows = self._read(self.core.read_after(), 2000)
            except Exception:  # the buffer is restarting; try again
                buffer_lost = True
                time.sleep(interval)
                continue
            new = 0
            try:
                new = self._step(rows)
                self._retention()
            except Exception as e:  # never let the loop die silently: log, count, go on
                import logging

                logging.getLogger(__name__).exception("learner step failed: %s", e)
                self.core.counts["step_errors"] += 1
            if not new:
                time.sleep(interval)

    def _retention(self) -> None:
        """Every `compact_every_s`: the buffer deletes consumed events older than `retention_s` below the
        learner's safe floor (committed, and no longer needed to rebuild pending decisions or replay); the
        learner forgets the consumed ids of what was deleted."""
        lc = self.cfg.learning
        if lc.retention_s is None or time.monotonic() - self._last_compact < lc.compact_every_s:
            return
        self._last_compact = time.monotonic()
        with self.lock:
            floor = self.core.compaction_floor()
        deleted = ray.get(self.buffer.compact.remote(floor, lc.retention_s))
        if deleted:
            first = ray.get(self.buffer.first_seq.remote())
            with self.lock:
                self.core.prune_consumed(first)
            self.core.counts["compacted_events"] += deleted

    def _step(self, rows) -> int:
        with self.lock:
            seen = self.core.seen
            new = self.core.consume(rows, self._read)
            if self.core.ready():
                if self.core.update(commit=False) is not None:
                    # publish, then commit: routers do not wait for the disk. A crash in between re-derives
                    # the same events' update after restart (the commit has not moved the offset).
                    self._publish()
                    self.core.commit()
                    self._last_commit = time.monotonic()
                    self.metrics.version.set(self.core.policy.version)
                    self.metrics.reward.set(float(np.mean(self.core.last_rewards)))
                    self.metrics.samples.inc(float(len(self.core.last_rewards)))
            elif (
                self.core._uncommitted
                and not self.core.samples
                and (not new or time.monotonic() - self._last_commit >= self.cfg.learning.commit_every_s)
            ):
                # record what was read (decisions without outcomes yet): when idle, and at least every
                # commit_every_s under traffic that brings no learnable outcome (else the offset, the
                # compaction floor and the uncommitted list would stand still while the log grows)
                self.core.commit()
                self._last_commit = time.monotonic()
        self._observe([(s, ev) for s, ev in rows if s > seen])
        return new

    # -- routers ----------------------------------------------------------------------------------------------
    async def wait_for_weights(self, known_version: int, timeout_s: float = 10.0) -> tuple[int, ray.ObjectRef] | None:
        """(version, object ref of its serving state dict) as soon as the published version differs from
        `known_version`; None after `timeout_s`. Waits on an event the publisher sets: no polling, no lock."""
        self._event_loop = asyncio.get_running_loop()
        end = time.monotonic() + timeout_s
        while True:
            changed = self._changed  # taken before reading `published`: a publish after the read sets it
            version, ref = self.published
            if version != known_version:
                return version, ref
            remaining = end - time.monotonic()
            if remaining <= 0:
                return None
            try:  # the 1 s slice only matters for a publish made before the loop was known
                await asyncio.wait_for(changed.wait(), timeout=min(remaining, 1.0))
            except asyncio.TimeoutError:
                pass

    async def report_install(self, replica: str, version: int, installed_at: float) -> None:
        caused = self.core.version_feedback_time.get(version)  # a dict read: no lock needed
        staleness_s = None if caused is None else installed_at - caused
        self.installs.append({"replica": replica, "version": version, "time": installed_at, "staleness_s": staleness_s})
        self.metrics.install(replica, staleness_s)

    # -- operators (each takes the lock in a worker thread: the loop keeps serving pollers) ----------------------
    async def reset(self) -> int:
        """Cold start: replace the policy with an untrained one (version continues); routers install it."""
        return await asyncio.to_thread(self._reset)

    def _reset(self) -> int:
        from banditrouter.policies import untrained_like

        with self.lock:
            self.core.reset(untrained_like(self.core.policy))
            self._publish()
            return self.core.policy.version

    async def stats(self) -> dict[str, Any]:
        st = [i["staleness_s"] for i in list(self.installs) if i["staleness_s"] is not None]
        return {
            **await asyncio.to_thread(self._core_stats),
            "staleness_p50_s": float(np.percentile(st, 50)) if st else None,
            "staleness_p95_s": float(np.percentile(st, 95)) if st else None,
            "installs": len(self.installs),
        }

    def _core_stats(self) -> dict[str, Any]:
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
                "tau": self.core.policy.tau,
            }

    async def installs_log(self) -> list[dict[str, Any]]:
        return list(self.installs)

    async def consumed_ids(self) -> list[str]:
        def read() -> list[str]:
            with self.lock:
                return self.core.consumed_ids()

        return await asyncio.to_thread(read)

    async def flush(self) -> dict[str, Any]:
        """Consume everything in the log now and commit (end of a run, tests)."""
        await asyncio.to_thread(self._flush)
        return await self.stats()

    def _flush(self, chunk: int = 5000) -> None:
        with self.lock:
            while True:  # in chunks: the log can hold a million rows
                rows = self._read(self.core.read_after(), chunk)
                self.core.consume(rows, self._read)
                if len(rows) < chunk:  # reached the end of the log
                    break
            if self.core.samples:
                if self.core.update() is not None:
                    self._publish()
            self.core.commit(export=True)


def _get_or_create(actor_cls, name: str, *args):
    return actor_cls.options(name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached").remote(*args)


def get_or_create_buffer(cfg: AppConfig):
    lc = cfg.learning
    return _get_or_create(
        BufferActor,
        BUFFER_NAME,
        str(Path(lc.state_dir) / "events.sqlite"),
        lc.retrial_similarity,
        lc.retrial_window_s,
        lc.feedback_hold_s,
        lc.max_held_feedback,
        lc.max_tracked_users,
        lc.retrial_grace_s,
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
