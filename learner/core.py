"""The learner's logic, Ray-free: consume events in log order, join decisions with their outcomes into
bandit samples, update the policy, commit parameters + consumed offset atomically.

What is guaranteed (each is tested in tests/unit/test_learner.py and tests/unit/test_learner_recovery.py):

- **Exactly-once effect** with at-least-once delivery. The log is ordered (`seq`) and unique by event id. A
  commit stores, in one SQLite transaction (synchronous=FULL): the policy's parameters and training state
  (optimizer moments, random streams), the learner's own replay stream and counters, the log id, the
  offset (last seq consumed) with the id of the event at that seq, and the ids of the events it covers
  (table `consumed`, primary key event id). After a crash the learner reloads the commit and re-reads the
  log: events up to the offset only rebuild the join state (decisions waiting for an outcome, the replay
  store), later events are applied again, and they were not in the parameters it reloaded. A recovered
  learner then continues exactly as one that never crashed: same parameters, optimizer state, exploration
  draws and replay draws.
- **The log is checked, never trusted**: `restore(read, log_id)` verifies that the log is the one the commit
  was taken from (same id) and that the event at the committed offset is the one consumed there. If not
  (the log was replaced, or lost its tail and reused those seqs), it re-reads the whole log by event id:
  events in `consumed` only rebuild the join state, every other event is consumed as new. No event is
  skipped and none is applied twice. `check_log` does the same for a running learner whose buffer restarted.
- **An update is all-or-nothing**: parameters, optimizer, random streams, version, waiting samples, replay
  store and counters are restored if anything raises during `update` (including its commit), so the same
  batch is applied once when it is retried. An update whose parameters or metrics are not finite is
  rolled back and its samples are not applied (counted as `rejected_update`).
- **Only learnable events become samples**: a decision for a model outside the policy's pool, or with a
  missing, mis-shaped or non-finite context, preference, propensity or cost, is counted and never joined,
  on the live path and on restore alike.
- **Failures are outcomes**: an `error` or `timeout` event is a sample with the worst reward, score 0 at the
  full cost scale (`LearnerSettings.learn_from_failures`).
- **Bounded memory**: waiting decisions (`max_pending`, `pending_horizon_s`; contexts kept as float32
  arrays), resolved decision ids (`resolved_capacity`), the replay store (`replay_capacity`) and the
  staleness record (`version_history`) are all capped; the log can be compacted below
  `compaction_floor()` and the consumed record pruned with `prune_consumed`.
- **No pickle**: commits are safetensors arrays + JSON; nothing in `state_dir` is executed on load.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sqlite3
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as _load_arrays
from safetensors.numpy import save as _save_arrays

from banditrouter.policies import save_checkpoint
from banditrouter.policies.base import BanditBatch, Policy, StateError
from banditrouter.reward import sample_preferences

log = logging.getLogger(__name__)

Read = Callable[[int, int], list[tuple[int, dict[str, Any]]]]
"""`read(after, limit)`: events with seq > after, oldest first, at most `limit` (SQLiteEventLog.read)."""

FAILURE_KINDS = ("error", "timeout")
"""Outcome kinds the router logs when the model call failed; they score 0."""

_PAGE = 5000


@dataclass(frozen=True)
class LearnerSettings:
    batch_size: int = 16
    """Samples per update (the learner also updates with fewer once `max_wait_s` has passed)."""
    max_wait_s: float = 0.5
    train_on_implicit: bool = False
    """Learn from retrial (score 0) / accepted (score 1) when no explicit score came."""
    learn_from_failures: bool = True
    """A decision whose model call failed (`error` / `timeout` event, logged by the router) is a sample with
    score 0 and the full cost scale (c~ = 1: the worst reward, -w_c), whatever `train_on_implicit` says.
    Off: failed calls never train the policy (their decisions are not kept waiting, so a later explicit
    score for them is ignored too)."""
    max_pending: int = 100_000
    """Decisions waiting for an outcome; the oldest are dropped beyond this. ~1.7 KB each with 384-wide
    contexts (float32), so the default caps them near 170 MB."""
    pending_horizon_s: float = 3600.0
    """A decision waiting longer than this (log time: the `received` stamps of later events) is dropped;
    an outcome arriving after that is ignored (counted as `expired_pending`)."""
    resolved_capacity: int = 20_000
    """How many resolved decision ids are remembered (least recently resolved forgotten first), so that a
    second outcome or a re-sent decision for them is ignored. An outcome for a forgotten one finds no
    waiting decision anyway; only a decision re-sent that late would be joined again (the buffer already
    drops a re-delivered decision, so this is a second line of defence), and it would then wait for an
    outcome until `pending_horizon_s`."""
    version_history: int = 1_000
    """How many recent versions keep their feedback time (staleness of router installs)."""
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
    """The replay store keeps the most recent samples up to this many (a deque: O(1) per sample)."""
    export_every_s: float = 2.0
    """How often the .pt export (for `banditrouter eval --checkpoint`) is rewritten; commits are every update."""


@dataclass(frozen=True)
class PendingDecision:
    """A validated decision, as the learner keeps it while it waits for an outcome (no JSON dict)."""

    decision_id: str
    seq: int
    """Seq of the decision event in the log (compaction must keep it while the decision is needed)."""
    time: float | None
    """When the buffer received it (`received`, else the router's `time`)."""
    context: np.ndarray
    """float32 (context_dim,)"""
    preference: np.ndarray
    """float32 (2,)"""
    arm: int
    propensity: float
    cost: float


@dataclass(frozen=True)
class Sample:
    decision: PendingDecision
    score: float
    received: float
    """When the outcome was received (max_wait_s, staleness)."""
    kind: str = "explicit"
    """The outcome's kind (explicit, retrial, accepted, error, timeout)."""


@dataclass
class _Snapshot:
    """Everything `update` may change, to put back if it raises."""

    policy: Policy
    state: dict[str, Any]
    training: tuple[dict[str, np.ndarray], dict[str, Any]]
    samples: list[Sample]
    replay: deque
    replay_rng: dict[str, Any]
    counts: Counter
    version_feedback_time: OrderedDict
    last_rewards: np.ndarray


def params_finite(state: dict[str, Any]) -> bool:
    return all(np.isfinite(np.asarray(v)).all() for v in state["params"].values() if np.asarray(v).dtype.kind == "f")


def _event_time(ev: dict[str, Any]) -> float | None:
    t = ev.get("received", ev.get("time"))
    return float(t) if isinstance(t, int | float) and math.isfinite(t) else None


class Learner:
    def __init__(self, policy: Policy, state_dir: str | Path, settings: LearnerSettings = LearnerSettings()):
        self.policy, self.settings = policy, settings
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.export_path = self.state_dir / "learner_latest.pt"
        self.db = sqlite3.connect(self.state_dir / "learner.sqlite", check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a commit that returned survives a power loss
        self._create_tables()
        self.log_id: str | None = None
        """Identity of the log being consumed (set by `restore`; recorded in every commit)."""
        self.offset = 0  # events <= offset are in the committed state
        self.seen = 0  # events <= seen have been read
        self._seen_id: str | None = None  # event id at seq == seen
        self._uncommitted: list[tuple[int, str]] = []
        self.pending: OrderedDict[str, PendingDecision] = OrderedDict()
        self.resolved: OrderedDict[str, str] = OrderedDict()  # decision id -> the kind of outcome that resolved it
        self.samples: list[Sample] = []  # joined, waiting for the next update
        self.replay: deque[Sample] = deque(maxlen=settings.replay_capacity)
        self.replay_rng = np.random.default_rng(0)
        self.reset_seq = 0
        """Decisions at or below this seq were made before the last cold start (`reset`) and are not joined."""
        self._reset_event_id: str | None = None
        self._clock: float | None = None  # newest event time read: "now" for the pending horizon
        self.counts: Counter[str] = Counter()
        self.last_rewards: np.ndarray = np.zeros(0)
        self._last_export = 0.0
        self.version_feedback_time: OrderedDict[int, float] = OrderedDict()
        """version -> when the oldest feedback in the update that made it was received (staleness)."""

    def _create_tables(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            legacy = self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'commit_state'").fetchone()
            if legacy:  # an older format held a pickle; never load it. Start afresh: every event counts once.
                log.warning("%s: dropping a learner commit in the old (pickle) format; starting from the checkpoint", self.db)
                self.db.execute("DROP TABLE commit_state")
                self.db.execute("DROP TABLE IF EXISTS consumed")
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS commits (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL,"
                " log_id TEXT, offset INTEGER NOT NULL, offset_event_id TEXT, time REAL NOT NULL, meta TEXT NOT NULL,"
                " arrays BLOB NOT NULL)"
            )
            self.db.execute("CREATE TABLE IF NOT EXISTS consumed (event_id TEXT PRIMARY KEY, seq INTEGER NOT NULL)")
            self.db.execute("CREATE INDEX IF NOT EXISTS consumed_seq ON consumed (seq)")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    # -- restore ----------------------------------------------------------------------------------------------
    def restore(self, read: Read, log_id: str | None = None) -> bool:
        """Load the last commit (if any) and rebuild the join state from the log; returns whether there was a
        commit. `log_id` is the log's identity (`SQLiteEventLog.log_id()`); without it only the event at the
        committed offset is checked. On a mismatch the whole log is re-read by event id (see module doc)."""
        if log_id is not None:
            self.log_id = log_id
        row = self.db.execute("SELECT log_id, offset, offset_event_id, meta, arrays FROM commits WHERE id = 1").fetchone()
        if row is None:
            return False
        committed_log, offset, offset_id, meta_text, blob = row
        self._load(json.loads(meta_text), _load_arrays(blob))
        same_log = log_id is None or committed_log is None or committed_log == log_id
        if same_log and self._event_id_at(read, offset) == offset_id:
            self.offset = self.seen = int(offset)
            self._seen_id = offset_id
            after = 0
            while after < self.offset:
                rows = [(seq, ev) for seq, ev in read(after, _PAGE) if seq <= self.offset]
                if not rows:
                    break
                for seq, ev in rows:
                    self._join(seq, ev, rebuild=True)
                after = rows[-1][0]
        else:
            log.warning("the event log is not the one last committed (log id %s -> %s, offset %d): re-reading it by "
                        "event id", committed_log, log_id, offset)  # fmt: skip
            self.counts["log_mismatch"] += 1
            self.offset = 0  # nothing of this log is committed yet
            self._walk(read, rebuild_known=True)
        if self.log_id is None:
            self.log_id = committed_log
        self.counts["restored"] += 1
        return True

    def check_log(self, read: Read, log_id: str | None = None) -> bool:
        """For a running learner: True when the log is still the one it has been reading (same id, and the
        event at `seen` unchanged). Otherwise (the buffer came back with another file, or without its tail)
        re-read the log by event id, consuming as new every event neither committed nor read before, and
        return False. `consume(rows, read)` runs the same check on every read for free; call this one when
        the buffer may have restarted with another file (`log_id` changed)."""
        same_log = log_id is None or self.log_id is None or log_id == self.log_id
        if same_log and self._event_id_at(read, self.seen) == self._seen_id:
            return True
        self._resync(read, log_id)
        return False

    def _resync(self, read: Read, log_id: str | None) -> None:
        log.warning("the event log changed under the learner (log id %s -> %s, seen %d): re-reading it by event id",
                    self.log_id, log_id, self.seen)  # fmt: skip
        self.counts["log_mismatch"] += 1
        if log_id is not None:
            self.log_id = log_id
        self.offset = 0  # nothing of this log is committed yet
        self._walk(read, rebuild_known=False)

    @staticmethod
    def _event_id_at(read: Read, seq: int) -> str | None:
        if seq <= 0:
            return None
        rows = read(seq - 1, 1)
        return rows[0][1].get("event_id") if rows and rows[0][0] == seq else None

    def _walk(self, read: Read, rebuild_known: bool) -> None:
        """Read the whole log; an event already consumed (in `consumed`, or read and not yet committed) only
        rebuilds the join state when `rebuild_known` (restore) and is skipped otherwise (a running learner
        has it); every other event is consumed as new. Afterwards `seen` refers to this log."""
        known_uncommitted = {e for _, e in self._uncommitted}
        reset_id, self.reset_seq, self._reset_event_id = self._reset_event_id, 0, None
        self.seen, self._seen_id = 0, None
        after = 0
        while rows := read(after, _PAGE):
            consumed = self._consumed_among([ev.get("event_id") for _, ev in rows])
            for seq, ev in rows:
                eid = ev.get("event_id")
                if eid in consumed or eid in known_uncommitted:
                    if rebuild_known:
                        self._join(seq, ev, rebuild=True)
                    if eid == reset_id:  # the last cold start happened here: what came before is not joined
                        if rebuild_known:
                            self.pending.clear()
                            self.replay.clear()
                        self.reset_seq, self._reset_event_id = seq, eid
                    self.seen, self._seen_id = seq, eid
                else:
                    self._consume_one(seq, ev)
            after = rows[-1][0]

    def _consumed_among(self, ids: list[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            q = f"SELECT event_id FROM consumed WHERE event_id IN ({','.join('?' * len(chunk))})"
            found.update(r[0] for r in self.db.execute(q, chunk))
        return found

    # -- consuming ---------------------------------------------------------------------------------------------
    def read_after(self) -> int:
        """Where a verified read starts (`read(learner.read_after(), limit)`, then `consume(rows, read)`): one
        event before `seen`, so that the first row shows whether the log still holds the event last read."""
        return max(self.seen - 1, 0)

    def consume(self, rows: list[tuple[int, dict[str, Any]]], read: Read | None = None) -> int:
        """Join the events of `rows` not read before; returns how many were new. With `read` (the reader the
        rows came from, starting at `read_after()`), the first row must be the event last read (seq `seen`,
        same id): if it is not, the log changed under the learner (lost its tail, or was replaced) and it is
        re-read by event id instead (see `check_log`), so no event is skipped."""
        if read is not None and self.seen > 0:
            head = rows[0] if rows else None
            if head is None or head[0] != self.seen or head[1].get("event_id") != self._seen_id:
                before = len(self._uncommitted)
                self._resync(read, None)
                return len(self._uncommitted) - before
        new = 0
        for seq, ev in rows:
            if seq <= self.seen:
                continue  # already read (at-least-once delivery from a retried read)
            self._consume_one(seq, ev)
            new += 1
        return new

    def _consume_one(self, seq: int, ev: dict[str, Any]) -> None:
        self._join(seq, ev, rebuild=False)
        self.seen, self._seen_id = seq, ev["event_id"]
        self._uncommitted.append((seq, ev["event_id"]))
        self.counts[str(ev.get("kind"))] += 1

    def _score(self, ev: dict[str, Any]) -> float | None:
        kind = ev.get("kind")
        if kind == "explicit":
            return ev.get("value")
        if kind in FAILURE_KINDS:
            return 0.0 if self.settings.learn_from_failures else None
        if kind in ("retrial", "accepted") and self.settings.train_on_implicit:
            return ev.get("value")
        return None

    def _decision(self, seq: int, ev: dict[str, Any], counts: Counter) -> PendingDecision | None:
        """The decision as a sample-to-be, or None (counted) when it cannot become a valid sample."""
        if not isinstance(ev.get("decision_id"), str) or ev.get("context") is None or ev.get("cost_usd") is None:
            counts["unlearnable_decision"] += 1  # logged with a context reference only, or no cost
            return None
        if ev.get("model") not in self.policy.models:
            counts["unknown_model"] += 1  # e.g. decided from an older pool
            return None
        if not self.settings.learn_from_failures and ev.get("outcome") in FAILURE_KINDS:
            counts["failed_decision"] += 1
            return None
        try:
            x = np.asarray(ev["context"], dtype=np.float32).reshape(-1)
            w = np.asarray(ev["preference"], dtype=np.float32).reshape(-1)
            p, c = float(ev["propensity"]), float(ev["cost_usd"])
        except (KeyError, TypeError, ValueError):
            counts["invalid_decision"] += 1
            return None
        ok = (
            x.shape == (self.policy.context_dim,)
            and np.isfinite(x).all()
            and w.shape == (2,)
            and np.isfinite(w).all()
            and (w >= 0).all()
            and w.sum() > 0
            and 0 < p <= 1
            and math.isfinite(c)
            and c >= 0
        )
        if not ok:
            counts["invalid_decision"] += 1
            return None
        arm = self.policy.models.index(ev["model"])
        return PendingDecision(ev["decision_id"], seq, _event_time(ev), x, w, arm, p, c)

    def _join(self, seq: int, ev: dict[str, Any], rebuild: bool) -> None:
        # Rebuilding re-derives state the commit already counted: its counts go nowhere.
        counts = Counter() if rebuild else self.counts
        kind, d = ev.get("kind"), ev.get("decision_id")
        t = _event_time(ev)
        if t is not None:
            self._clock = t if self._clock is None else max(self._clock, t)
        self._expire_pending(counts)
        if kind == "decision":
            if seq <= self.reset_seq or d in self.resolved or d in self.pending:
                return
            decision = self._decision(seq, ev, counts)
            if decision is not None:
                self.pending[decision.decision_id] = decision
                while len(self.pending) > self.settings.max_pending:
                    self.pending.popitem(last=False)
                    counts["dropped_pending"] += 1
            return
        score = self._score(ev)
        if score is None:
            return
        if d in self.resolved:
            if kind == "explicit" and not rebuild:
                self._explicit_over_implicit(d, score, counts)
            return
        if not (isinstance(score, int | float) and math.isfinite(score) and 0 <= score <= 1):
            counts["rejected_score"] += 1  # the buffer refuses these; never trust a stored value blindly
            return
        decision = self.pending.pop(d, None)
        if decision is None:
            return
        self.resolved[d] = str(kind)
        while len(self.resolved) > self.settings.resolved_capacity:
            self.resolved.popitem(last=False)
        if kind in FAILURE_KINDS:
            # The worst reward there is: score 0 and the whole cost scale (c~ = 1), so r = -w_c <= the reward
            # of any success. With the cost as incurred (often 0), a failure would score r = 0 and beat every
            # success whose cost outweighs its quality: a cost-leaning policy would learn to route to failing
            # arms. The decision in the log keeps the cost actually incurred.
            decision = dataclasses.replace(decision, cost=max(decision.cost, self.policy.tau))
        # staleness counts from when the feedback came: a held one's own `time` is older than its log stamp
        sent = ev.get("time")
        if t is not None and isinstance(sent, int | float) and math.isfinite(sent):
            t = min(t, float(sent))
        sample = Sample(decision, float(score), t if t is not None else time.time(), str(kind))
        if rebuild:  # already in the committed parameters; kept only for replay steps
            if self._uses_replay:
                self.replay.append(sample)
        else:
            self.samples.append(sample)

    def _explicit_over_implicit(self, decision_id: str, score: Any, counts: Counter) -> None:
        """An explicit score wins over an implicit label (retrial / accepted) of the same decision: if the
        implicit sample still waits for the next update, the explicit score replaces it
        (`explicit_over_implicit`). Once the implicit one is in the parameters the explicit score comes too
        late and is ignored (`explicit_after_implicit`): an applied update is never undone. Explicit feedback
        normally comes right after the answer, before any retrial or the acceptance window's end. A restore
        re-derives the committed parameters and does not repeat the replacement."""
        if not (isinstance(score, int | float) and math.isfinite(score) and 0 <= score <= 1):
            counts["rejected_score"] += 1
            return
        if self.resolved.get(decision_id) not in ("retrial", "accepted"):
            return  # resolved by an explicit score (the buffer refuses a second one) or by a failed call
        for i, s in enumerate(self.samples):
            if s.decision.decision_id == decision_id:
                self.samples[i] = dataclasses.replace(s, score=float(score), kind="explicit")
                self.resolved[decision_id] = "explicit"
                counts["explicit_over_implicit"] += 1
                return
        counts["explicit_after_implicit"] += 1

    def _expire_pending(self, counts: Counter) -> None:
        if self._clock is None:
            return
        horizon = self._clock - self.settings.pending_horizon_s
        while self.pending:
            first = next(iter(self.pending.values()))
            if first.time is None or first.time >= horizon:
                break
            self.pending.popitem(last=False)
            counts["expired_pending"] += 1

    # -- learning ----------------------------------------------------------------------------------------------
    def ready(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        n = len(self.samples)
        return n >= self.settings.batch_size or (n > 0 and now - self.samples[0].received >= self.settings.max_wait_s)

    def _batch(self, samples: list[Sample]) -> BanditBatch:
        ds = [s.decision for s in samples]
        return BanditBatch(
            contexts=np.stack([d.context for d in ds]),
            preferences=np.stack([d.preference for d in ds]),
            arms=np.array([d.arm for d in ds], dtype=np.int64),
            propensities=np.array([d.propensity for d in ds], dtype=np.float64),
            scores=np.array([s.score for s in samples], dtype=np.float64),
            costs=np.array([d.cost for d in ds], dtype=np.float64),
        )

    @property
    def _uses_replay(self) -> bool:
        # replay steps are importance-weighted off-policy gradient steps: only a policy that learns from
        # propensities can take them (count-based ones must see each sample once)
        return bool(self.settings.replay_steps) and self.policy.learns_from_propensities

    def _replay_steps(self) -> None:
        if not self._uses_replay or len(self.replay) < self.settings.batch_size:
            return
        for _ in range(self.settings.replay_steps):
            idx = self.replay_rng.choice(len(self.replay), size=self.settings.batch_size, replace=False)
            batch = self._batch([self.replay[i] for i in idx])
            if self.settings.replay_relabel:
                w = sample_preferences(len(batch), self.replay_rng, "uniform").astype(np.float32)
                batch = dataclasses.replace(batch, preferences=w)
            self.policy.update(batch)

    def _snapshot(self) -> _Snapshot:
        return _Snapshot(
            policy=self.policy,
            state=self.policy.state_dict(),
            training=self.policy.training_state(),
            samples=list(self.samples),
            replay=self.replay.copy(),
            replay_rng=self.replay_rng.bit_generator.state,
            counts=self.counts.copy(),
            version_feedback_time=self.version_feedback_time.copy(),
            last_rewards=self.last_rewards,
        )

    def _restore_policy(self, snap: _Snapshot) -> None:
        self.policy = snap.policy
        self.policy.load_state_dict(snap.state)
        self.policy.load_training_state(*snap.training)
        self.replay_rng.bit_generator.state = snap.replay_rng

    def _rollback(self, snap: _Snapshot) -> None:
        self._restore_policy(snap)
        self.samples, self.replay, self.counts = snap.samples, snap.replay, snap.counts
        self.version_feedback_time, self.last_rewards = snap.version_feedback_time, snap.last_rewards

    def _to_replay(self, samples: list[Sample]) -> None:
        # The same rule as on restore, where every valid joined sample is rebuilt into the replay store. Only a
        # policy that replays keeps them (LinUCB's 20k samples of 384-d contexts would be ~40 MB for nothing).
        if self._uses_replay:
            self.replay.extend(s for s in samples if np.isfinite(s.decision.context).all())

    def update(self, commit: bool = True) -> dict[str, float] | None:
        """One policy update from the joined samples (plus replay steps), all or nothing: if anything raises
        (the policy step, a replay step, the commit), every piece of state is put back as it was and the
        exception propagates, so the next call applies the same samples once. A non-finite result is rolled
        back and counted (returns None): its samples are not applied (those with finite contexts still go to
        the replay store, as a restore would rebuild them there). `commit=False` leaves the commit to the caller
        (the actor publishes first, then commits)."""
        if not self.samples:
            return None
        snap = self._snapshot()
        try:
            batch = self._batch(self.samples)
            oldest = min(s.received for s in self.samples)
            rewards = batch.rewards(self.policy.tau)
            metrics = self.policy.update(batch)
            self._replay_steps()
            samples, self.samples = self.samples, []
            if not params_finite(self.policy.state_dict()) or not all(math.isfinite(v) for v in metrics.values()):
                self._restore_policy(snap)
                self._to_replay(samples)
                self.counts["rejected_update"] += 1
                return None
            self._to_replay(samples)
            self.last_rewards = rewards
            self.counts["samples"] += len(samples)
            self.counts["updates"] += 1
            self._remember_version(self.policy.version, oldest)
            if commit:
                self.commit()
        except BaseException:
            self._rollback(snap)
            self.counts["failed_update"] += 1
            raise
        return metrics

    def _remember_version(self, version: int, feedback_time: float) -> None:
        self.version_feedback_time[version] = feedback_time
        self.version_feedback_time.move_to_end(version)
        while len(self.version_feedback_time) > self.settings.version_history:
            self.version_feedback_time.popitem(last=False)

    # -- commits -----------------------------------------------------------------------------------------------
    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        state = self.policy.state_dict()
        t_arrays, t_meta = self.policy.training_state()
        arrays = {f"params.{k}": np.ascontiguousarray(v) for k, v in state.pop("params").items()}
        arrays.update({f"training.{k}": np.ascontiguousarray(v) for k, v in t_arrays.items()})
        meta = {
            "policy": state,
            "training": t_meta,
            "learner": {
                "replay_rng": self.replay_rng.bit_generator.state,
                "counts": dict(self.counts),
                "version_feedback_time": [[v, t] for v, t in self.version_feedback_time.items()],
                "reset_seq": self.reset_seq,
                "reset_event_id": self._reset_event_id,
            },
        }
        return meta, arrays

    def _load(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        state = dict(meta["policy"])
        state["params"] = {k[len("params.") :]: v for k, v in arrays.items() if k.startswith("params.")}
        self.policy.load_state_dict(state)
        self.policy.load_training_state(
            {k[len("training.") :]: v for k, v in arrays.items() if k.startswith("training.")}, meta["training"]
        )
        lm = meta["learner"]
        self.replay_rng.bit_generator.state = lm["replay_rng"]
        self.counts = Counter(lm["counts"])
        self.version_feedback_time = OrderedDict((int(v), float(t)) for v, t in lm["version_feedback_time"])
        self.reset_seq, self._reset_event_id = int(lm["reset_seq"]), lm["reset_event_id"]

    def commit(self, export: bool = False) -> None:
        """Parameters, training state, version, log id, offset and the consumed event ids, in one transaction;
        then the .pt export (best effort: a failed export is logged and counted, the commit stands). Every
        event read is covered, so call it when no joined sample is waiting (after `update`)."""
        if self.samples:
            raise RuntimeError(f"{len(self.samples)} joined samples are waiting: update() before commit()")
        meta, arrays = self._state()
        blob = _save_arrays(arrays)
        offset = self.seen
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute(
                "INSERT OR REPLACE INTO commits (id, version, log_id, offset, offset_event_id, time, meta, arrays)"
                " VALUES (1, ?, ?, ?, ?, ?, ?, ?)",
                (self.policy.version, self.log_id, offset, self._seen_id, time.time(), json.dumps(meta), blob),
            )
            self.db.executemany("INSERT INTO consumed (event_id, seq) VALUES (?, ?)", [(e, s) for s, e in self._uncommitted])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self._uncommitted = []
        self.offset = offset
        if export or time.time() - self._last_export >= self.settings.export_every_s:
            try:
                save_checkpoint(self.policy, self.export_path, extra={"offset": offset, "source": "learner"})
                self._last_export = time.time()
            except Exception as e:  # the commit is what recovery needs; the export is for humans and eval
                log.exception("learner export to %s failed: %s", self.export_path, e)
                self.counts["export_errors"] += 1

    def consumed_ids(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT event_id FROM consumed ORDER BY seq")]

    # -- retention ---------------------------------------------------------------------------------------------
    def compaction_floor(self) -> int:
        """The largest `below_seq` for `SQLiteEventLog.compact` that keeps what a restore needs: the event at
        the committed offset (the identity check), decisions still waiting for an outcome or in a waiting
        sample, and, for policies that take replay steps, the decisions in the replay store (restore rebuilds
        them from the log). 0 until the first commit on this log."""
        floor = self.offset
        if self.pending:
            floor = min(floor, next(iter(self.pending.values())).seq)
        if self.samples:
            floor = min(floor, min(s.decision.seq for s in self.samples))
        if self._uses_replay and self.replay:
            floor = min(floor, min(s.decision.seq for s in self.replay))
        return floor

    def prune_consumed(self, below_seq: int) -> int:
        """Forget consumed ids with seq < below_seq: call with the log's `first_seq()` after compacting it
        (those events are gone, so no re-read can meet them again). Returns how many were pruned."""
        before = self.db.total_changes
        self.db.execute("DELETE FROM consumed WHERE seq < ?", (int(below_seq),))
        return self.db.total_changes - before

    # -- operators ---------------------------------------------------------------------------------------------
    def reset(self, fresh: Policy) -> None:
        """Cold start: a fresh policy whose version continues past the current one (routers install it).

        Clears what would carry earlier traffic into the cold run: the waiting samples, the replay store and
        the decisions still waiting for an outcome (their outcomes are then ignored; so are those of any
        decision logged before the reset, on restore too), and re-seeds the replay stream, so the learner
        behaves like one started afresh on the traffic that follows. Keeps the counters, the staleness record,
        the resolved ids and the consumed record (every event read so far stays consumed). Committed at once."""
        before = (self.policy, self.samples, self.replay, self.pending, self.replay_rng, self.reset_seq, self._reset_event_id)
        history = self.version_feedback_time.copy()
        fresh.version = self.policy.version + 1
        self.policy, self.samples, self.replay_rng = fresh, [], np.random.default_rng(0)
        self.replay, self.pending = deque(maxlen=self.settings.replay_capacity), OrderedDict()
        self.reset_seq, self._reset_event_id = self.seen, self._seen_id
        self._remember_version(fresh.version, time.time())
        try:
            self.commit()
        except BaseException:
            (self.policy, self.samples, self.replay, self.pending, self.replay_rng, self.reset_seq, self._reset_event_id) = before
            self.version_feedback_time = history
            raise


def install(policy: Policy, state: Any) -> Policy:
    """What a router runs on pushed weights: a new policy object built like its current one and loaded
    from the blob, which must be the same policy, pool and shapes with finite values (else StateError and
    the router keeps serving `policy`). Swapping the object means no decision sees half-loaded weights.
    The blob is what the learner publishes, `serving_state_dict()`: for ACQB only what a decision reads
    (validated as strictly as a full state; the installed policy decides exactly as from the full state and
    refuses to learn); for the other policies their full `state_dict()`, which is accepted too."""
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
