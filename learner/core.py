"""The learner's logic, Ray-free: consume events in log order, join decisions with their outcomes into
bandit samples, update the policy, commit parameters + consumed offset atomically.

Exactly-once effect with at-least-once delivery: the log is ordered (`seq`) and unique by event id, and a
commit stores the policy state, the offset and the ids of the events it covers in one SQLite transaction.
After a crash the learner reloads the last commit and re-reads the log: events up to the offset only
rebuild the join state (which decisions are still waiting for an outcome), later events are applied again,
and they were not in the parameters it reloaded. So every event is counted once in the parameters, and the
`consumed` table (primary key: event id) proves it.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from banditrouter.policies import save_checkpoint
from banditrouter.policies.base import BanditBatch, Policy, StateError
from banditrouter.reward import sample_preferences


@dataclass(frozen=True)
class LearnerSettings:
    batch_size: int = 16
    """Samples per update (the learner also updates with fewer once `max_wait_s` has passed)."""
    max_wait_s: float = 0.5
    train_on_implicit: bool = False
    """Learn from retrial (score 0) / accepted (score 1) when no explicit score came."""
    max_pending: int = 100_000
    """Decisions waiting for an outcome; the oldest are dropped beyond this."""
    replay_steps: int = 4
    """Gradient policies (BaRP) only: extra off-policy steps per update on minibatches of `batch_size` drawn
    from past samples (importance-weighted by their logged propensities). Count-based policies (LinUCB,
    LinTS) must see each sample once, so they ignore it. 4 with `replay_relabel`: chosen with
    scripts/emulate_online.py over seeds 0-7 (README, "Online learning")."""
    replay_relabel: bool = True
    """Replay steps score each past sample under a freshly drawn preference w' ~ U(simplex) instead of the one
    it was served with. The reward r = w_q q - w_c c~ is a known function of w, so one observed (x, a, q, c)
    teaches the policy about every trade-off; the importance ratio becomes pi(a | x, w') / mu(a | x, w), which
    `BaRP.update` already computes from the batch's preferences and logged propensities. With 3,000 samples
    this is what makes the live-learned policy preference-sensitive (README, "Online learning")."""
    replay_capacity: int = 20_000
    export_every_s: float = 2.0
    """How often the .pt export (for `banditrouter eval --checkpoint`) is rewritten; commits are every update."""


def _dumps(state: dict[str, Any]) -> bytes:
    # pickle protocol 5 writes numpy buffers as they are: ~20x faster than torch.save for LinUCB's
    # 11 x 387 x 387 matrices. The blob is the learner's own, in its own state folder.
    return pickle.dumps(state, protocol=5)


def _loads(blob: bytes) -> dict[str, Any]:
    return pickle.loads(blob)


def params_finite(state: dict[str, Any]) -> bool:
    return all(np.isfinite(np.asarray(v)).all() for v in state["params"].values() if np.asarray(v).dtype.kind == "f")


class Learner:
    def __init__(self, policy: Policy, state_dir: str | Path, settings: LearnerSettings = LearnerSettings()):
        self.policy, self.settings = policy, settings
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.export_path = self.state_dir / "learner_latest.pt"
        self.db = sqlite3.connect(self.state_dir / "learner.sqlite", check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS commit_state (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER,"
                        " offset INTEGER, time REAL, stats TEXT, state BLOB)")  # fmt: skip
        self.db.execute("CREATE TABLE IF NOT EXISTS consumed (event_id TEXT PRIMARY KEY, seq INTEGER NOT NULL)")
        self.offset = 0  # events <= offset are in the committed parameters
        self.seen = 0  # events <= seen have been read
        self._uncommitted: list[tuple[int, str]] = []
        self.pending: dict[str, dict[str, Any]] = {}
        self.resolved: set[str] = set()
        self.samples: list[tuple[dict[str, Any], float, float]] = []  # (decision, score, feedback received time)
        self.replay: list[tuple[dict[str, Any], float, float]] = []
        self.replay_rng = np.random.default_rng(0)
        self.counts: Counter[str] = Counter()
        self.last_rewards: np.ndarray = np.zeros(0)
        self._last_export = 0.0
        self.version_feedback_time: dict[int, float] = {}
        """version -> when the oldest feedback in the update that made it was received (staleness)."""

    # -- restore ----------------------------------------------------------------------------------------------
    def restore(self, read) -> bool:
        """Load the last commit (if any) and rebuild the join state from the log. `read(after, limit)`."""
        row = self.db.execute("SELECT offset, state FROM commit_state WHERE id = 1").fetchone()
        if row is None:
            return False
        offset, blob = row
        self.policy.load_state_dict(_loads(blob))
        self.offset = self.seen = int(offset)
        after = 0
        while after < self.offset:
            rows = [(seq, ev) for seq, ev in read(after, 5000) if seq <= self.offset]
            if not rows:
                break
            for _, ev in rows:
                self._join(ev, rebuild=True)
            after = rows[-1][0]
        self.counts["restored"] += 1
        return True

    # -- consuming ---------------------------------------------------------------------------------------------
    def consume(self, rows: list[tuple[int, dict[str, Any]]]) -> None:
        for seq, ev in rows:
            if seq <= self.seen:
                continue  # already read (at-least-once delivery from a retried read)
            self._join(ev, rebuild=False)
            self.seen = seq
            self._uncommitted.append((seq, ev["event_id"]))
            self.counts[ev["kind"]] += 1

    def _score(self, ev: dict[str, Any]) -> float | None:
        if ev["kind"] == "explicit":
            return ev.get("value")
        if ev["kind"] in ("retrial", "accepted") and self.settings.train_on_implicit:
            return ev.get("value")
        return None

    def _join(self, ev: dict[str, Any], rebuild: bool) -> None:
        kind, d = ev["kind"], ev.get("decision_id")
        if kind == "decision":
            if d not in self.resolved and ev.get("context") is not None and ev.get("cost_usd") is not None:
                self.pending[d] = ev
                if len(self.pending) > self.settings.max_pending:
                    self.pending.pop(next(iter(self.pending)))
                    self.counts["dropped_pending"] += 1
            return
        score = self._score(ev)
        if score is None or d in self.resolved:
            return
        if not (isinstance(score, int | float) and math.isfinite(score) and 0 <= score <= 1):
            self.counts["rejected_score"] += 1  # the buffer refuses these; never trust a stored value blindly
            return
        decision = self.pending.pop(d, None)
        if decision is None:
            return
        self.resolved.add(d)
        sample = (decision, float(score), float(ev.get("received", ev.get("time", time.time()))))
        if rebuild:  # already in the committed parameters; kept only for replay steps
            self.replay = (self.replay + [sample])[-self.settings.replay_capacity :]
        else:
            self.samples.append(sample)

    # -- learning ----------------------------------------------------------------------------------------------
    def ready(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        n = len(self.samples)
        return n >= self.settings.batch_size or (n > 0 and now - self.samples[0][2] >= self.settings.max_wait_s)

    def _batch(self, samples=None) -> BanditBatch:
        samples = self.samples if samples is None else samples
        ds = [s[0] for s in samples]
        arms = np.array([self.policy.models.index(d["model"]) for d in ds])
        return BanditBatch(
            contexts=np.asarray([d["context"] for d in ds], dtype=np.float32),
            preferences=np.asarray([d["preference"] for d in ds], dtype=np.float32),
            arms=arms,
            propensities=np.asarray([d["propensity"] for d in ds], dtype=np.float64),
            scores=np.asarray([s[1] for s in samples], dtype=np.float64),
            costs=np.asarray([d["cost_usd"] for d in ds], dtype=np.float64),
        )

    def _replay_steps(self) -> None:
        if not self.settings.replay_steps or self.policy.name != "barp" or len(self.replay) < self.settings.batch_size:
            return
        for _ in range(self.settings.replay_steps):
            idx = self.replay_rng.choice(len(self.replay), size=self.settings.batch_size, replace=False)
            batch = self._batch([self.replay[i] for i in idx])
            if self.settings.replay_relabel:
                w = sample_preferences(len(batch), self.replay_rng, "uniform").astype(np.float32)
                batch = dataclasses.replace(batch, preferences=w)
            self.policy.update(batch)

    def update(self, commit: bool = True) -> dict[str, float] | None:
        """One policy update from the joined samples; a non-finite result is rolled back and counted.
        `commit=False` leaves the commit to the caller (the actor publishes first, then commits)."""
        if not self.samples:
            return None
        known = [s for s in self.samples if s[0]["model"] in self.policy.models]
        self.samples = known
        before = self.policy.state_dict()
        oldest = min(s[2] for s in self.samples)
        batch = self._batch()
        self.last_rewards = batch.rewards(self.policy.tau)
        metrics = self.policy.update(batch)
        self._replay_steps()
        n = len(self.samples)
        self.replay = (self.replay + self.samples)[-self.settings.replay_capacity :]
        self.samples = []
        if not params_finite(self.policy.state_dict()) or not all(math.isfinite(v) for v in metrics.values()):
            self.policy.load_state_dict(before)
            self.counts["rejected_update"] += 1
            return None
        self.counts["samples"] += n
        self.counts["updates"] += 1
        self.version_feedback_time[self.policy.version] = oldest
        if commit:
            self.commit()
        return metrics

    def commit(self, export: bool = False) -> None:
        """Parameters, version, offset and the consumed event ids, in one transaction; then the .pt export."""
        state = self.policy.state_dict()
        blob = _dumps(state)
        offset = self.seen
        stats = repr(dict(self.counts))
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute(
                "INSERT OR REPLACE INTO commit_state (id, version, offset, time, stats, state) VALUES (1, ?, ?, ?, ?, ?)",
                (self.policy.version, offset, time.time(), stats, blob),
            )
            self.db.executemany("INSERT INTO consumed (event_id, seq) VALUES (?, ?)", [(e, s) for s, e in self._uncommitted])
            self.db.execute("COMMIT")
        except Exception:
            self.db.execute("ROLLBACK")
            raise
        self._uncommitted = []
        self.offset = offset
        if export or time.time() - self._last_export >= self.settings.export_every_s:
            save_checkpoint(self.policy, self.export_path, extra={"offset": offset, "source": "learner"})
            self._last_export = time.time()

    def consumed_ids(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT event_id FROM consumed ORDER BY seq")]

    def reset(self, fresh: Policy) -> None:
        """Cold start: a fresh policy whose version continues past the current one (routers install it)."""
        fresh.version = self.policy.version + 1
        self.policy = fresh
        self.samples = []
        self.version_feedback_time[fresh.version] = time.time()
        self.commit()


def install(policy: Policy, state: Any) -> Policy:
    """What a router runs on pushed weights: a new policy object built like its current one and loaded
    from the blob, which must be the same policy, pool and shapes with finite values (else StateError and
    the router keeps serving `policy`). Swapping the object means no decision sees half-loaded weights."""
    from banditrouter.policies import untrained_like

    if not isinstance(state, dict) or not isinstance(state.get("params"), dict):
        raise StateError("weights blob is not a policy state")
    try:
        finite = params_finite(state)
    except (TypeError, ValueError) as e:
        raise StateError(f"weights blob holds non-numeric parameters: {e}") from None
    if not finite:
        raise StateError("weights blob holds non-finite values")
    fresh = untrained_like(policy, seed=policy.seed)
    fresh.load_state_dict(state)
    fresh.take_random_state(policy)
    return fresh
