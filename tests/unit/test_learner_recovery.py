"""The learner under failure, without Ray: exact recovery after a crash, all-or-nothing updates, a log that
was replaced or lost its tail, logs holding decisions from an older pool, cold starts, failed calls as
outcomes, bounded state, log retention, and no pickle in what the learner loads."""

from __future__ import annotations

import json
import os
import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as load_arrays

from banditrouter.policies import make_policy, save_checkpoint
from banditrouter.reward import reward
from banditrouter.schemas import DecisionEvent, FeedbackEvent
from learner.core import Learner, LearnerSettings
from learner.eventlog import SQLiteEventLog

MODELS = ("cheap", "mid", "strong")
DIM = 8


def decision(i: int, rng: np.random.Generator, model: str | None = None, **extra) -> dict:
    x = rng.normal(size=DIM)
    m = model or MODELS[i % len(MODELS)]
    wc = float(rng.uniform())
    return {
        **DecisionEvent(
            decision_id=f"d{i}",
            request_id=f"r{i}",
            model=m,
            arm=MODELS.index(m) if m in MODELS else -1,
            propensity=float(rng.uniform(0.2, 1.0)),
            policy="test",
            policy_version=0,
            preference=(1 - wc, wc),
            context=[float(v) for v in x / np.linalg.norm(x)],
            context_ref=None,
            cost_usd=float(rng.uniform(0, 0.02)),
            latency_s=0.1,
            pool_version="p",
        ).to_dict(),
        **extra,
    }


def outcome(i: int, kind: str = "explicit", value: float | None = None) -> dict:
    return FeedbackEvent(f"d{i}", kind, value).to_dict()  # type: ignore[arg-type]


def traffic(log: SQLiteEventLog, rng: np.random.Generator, start: int, n: int, **extra) -> None:
    """n decisions, each followed by its explicit score: 2n events."""
    for i in range(start, start + n):
        log.append([decision(i, rng, **extra), outcome(i, value=float(rng.integers(0, 3)) / 2)])


def make(tmp_path: Path, name: str, policy: str = "barp", **settings) -> Learner:
    pol = make_policy(policy, MODELS, DIM, tau=0.01, seed=3)
    return Learner(pol, tmp_path / name, LearnerSettings(batch_size=4, max_wait_s=60, **settings))


def lose_tail(path: Path, keep: int) -> None:
    """What a power loss with synchronous=NORMAL can do: the last transactions are gone, and the
    AUTOINCREMENT counter with them, so the next events reuse those seqs."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DELETE FROM events WHERE seq > ?", (keep,))
    db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'events'", (keep,))
    db.close()


def fingerprint(ln: Learner) -> dict:
    """Everything an update may change, comparable with ==."""
    state = ln.policy.state_dict()
    arrays, meta = ln.policy.training_state()
    return {
        "version": ln.policy.version,
        "params": {k: np.asarray(v).tobytes() for k, v in state["params"].items()},
        "training": {k: v.tobytes() for k, v in arrays.items()},
        "training_meta": json.dumps(meta, sort_keys=True),
        "samples": [s.decision.decision_id for s in ln.samples],
        "replay": [s.decision.decision_id for s in ln.replay],
        "replay_rng": json.dumps(ln.replay_rng.bit_generator.state),
        "counts": dict(ln.counts),
        "versions": dict(ln.version_feedback_time),
    }


def assert_same_learning(a: Learner, b: Learner) -> None:
    """Parameters, optimizer and random streams equal (to 1e-6), and so the next exploration decisions."""
    assert a.policy.version == b.policy.version
    pa, pb = a.policy.state_dict()["params"], b.policy.state_dict()["params"]
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], rtol=1e-6, atol=1e-6, err_msg=k)
    (ta, ma), (tb, mb) = a.policy.training_state(), b.policy.training_state()
    assert ma == mb and set(ta) == set(tb)
    for k in ta:
        np.testing.assert_allclose(ta[k], tb[k], rtol=1e-6, atol=1e-6, err_msg=k)
    assert a.replay_rng.bit_generator.state == b.replay_rng.bit_generator.state
    assert [s.decision.decision_id for s in a.replay] == [s.decision.decision_id for s in b.replay]
    x = np.random.default_rng(9).normal(size=(64, DIM)).astype(np.float32)
    w = np.tile([0.5, 0.5], (64, 1))
    da, db = a.policy.select(x, w, explore=True), b.policy.select(x, w, explore=True)
    np.testing.assert_array_equal(da.arms, db.arms)
    np.testing.assert_allclose(da.propensities, db.propensities, rtol=1e-6)


# -- exact recovery ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["barp", "linucb", "lints"])
def test_recovered_learner_continues_exactly(tmp_path, name):
    """Crash after some commits (with events read but not committed), restore, continue on the same further
    events: parameters, optimizer state, exploration and replay streams equal a learner that never crashed."""
    log = SQLiteEventLog(tmp_path / "events.sqlite")
    traffic(log, np.random.default_rng(1), 0, 40)
    chunks = [log.read(i, 10) for i in range(0, 80, 10)]  # 5 samples each
    probe = np.random.default_rng(2).normal(size=(16, DIM)).astype(np.float32)

    def step(ln: Learner, rows) -> None:
        ln.consume(rows)
        # the policy's own random streams must continue too: draw from them (as the emulator's router does)
        ln.policy.select(probe, np.tile([0.3, 0.7], (16, 1)), explore=True)
        ln.update()

    ref = make(tmp_path, "ref", name)
    ref.restore(log.read, log.log_id())
    for c in chunks:
        step(ref, c)

    a = make(tmp_path, "a", name)
    a.restore(log.read, log.log_id())
    for c in chunks[:4]:
        step(a, c)
    a.consume(chunks[4])  # read, not committed: then the process dies
    del a

    b = make(tmp_path, "a", name)
    assert b.restore(log.read, log.log_id()) and b.offset == 40
    for c in chunks[4:]:
        step(b, c)
    assert_same_learning(b, ref)
    assert b.counts - Counter(restored=1) == ref.counts
    ids = b.consumed_ids()
    assert len(ids) == len(set(ids)) and set(ids) == set(log.event_ids())


# -- all-or-nothing updates ----------------------------------------------------------------------------------------
class FailOnce:
    """A connection whose next statement containing `marker` fails (disk full, I/O error)."""

    def __init__(self, db: sqlite3.Connection, marker: str):
        self.db, self.marker, self.failed = db, marker, False

    def execute(self, sql: str, *args):
        if self.marker in sql and not self.failed:
            self.failed = True
            raise sqlite3.OperationalError("disk I/O error (injected)")
        return self.db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)


@pytest.mark.parametrize("where", ["replay_step", "commit"])
def test_failed_update_leaves_no_trace_and_applies_each_sample_once(tmp_path, where):
    log = SQLiteEventLog(tmp_path / "events.sqlite")
    traffic(log, np.random.default_rng(2), 0, 16)
    chunks = [log.read(i, 8) for i in range(0, 32, 8)]  # 4 samples each
    ref = make(tmp_path, "ref")
    for c in chunks:
        ref.consume(c)
        ref.update()

    a = make(tmp_path, "a")
    a.consume(chunks[0])
    a.update()
    a.consume(chunks[1])
    before = fingerprint(a)
    if where == "replay_step":  # raises after the policy has taken its step on the batch

        def fail():
            raise RuntimeError("injected after the policy step")

        a._replay_steps = fail
    else:
        a.db = FailOnce(a.db, "INTO commits")
    with pytest.raises((RuntimeError, sqlite3.OperationalError)):
        a.update()
    after = fingerprint(a)
    assert after.pop("counts") == {**before.pop("counts"), "failed_update": 1}
    assert after == before
    if where == "replay_step":
        del a._replay_steps
    a.update()  # the retry applies the batch once
    for c in chunks[2:]:
        a.consume(c)
        a.update()
    assert_same_learning(a, ref)
    assert a.counts["samples"] == ref.counts["samples"] == 16
    ids = a.consumed_ids()
    assert len(ids) == len(set(ids)) and set(ids) == set(log.event_ids())


# -- the log is checked --------------------------------------------------------------------------------------------
def test_restore_from_a_replaced_log_consumes_it_all(tmp_path):
    """The buffer came back with a fresh file (another node, an empty state_dir): its seqs start at 1 again
    and run past the learner's offset; every event in it is new."""
    rng = np.random.default_rng(3)
    old = SQLiteEventLog(tmp_path / "old.sqlite")
    traffic(old, rng, 0, 8)
    a = make(tmp_path, "a", "linucb")
    a.restore(old.read, old.log_id())
    a.consume(old.read(0, 1000))
    a.update()
    assert a.offset == 16

    new = SQLiteEventLog(tmp_path / "new.sqlite")
    assert new.log_id() != old.log_id()
    traffic(new, rng, 100, 10)  # seqs 1..20
    b = make(tmp_path, "a", "linucb")
    assert b.restore(new.read, new.log_id())
    b.consume(new.read(b.seen, 1000))
    assert sorted(s.decision.decision_id for s in b.samples) == sorted(f"d{i}" for i in range(100, 110))
    b.update()
    assert b.counts["log_mismatch"] == 1 and b.log_id == new.log_id() and b.offset == new.last_seq()
    ids = b.consumed_ids()
    assert len(ids) == len(set(ids)) and set(ids) == set(old.event_ids()) | set(new.event_ids())
    c = make(tmp_path, "a", "linucb")  # the next restart finds its own log
    assert c.restore(new.read, new.log_id()) and c.counts["log_mismatch"] == 1 and c.seen == new.last_seq()


def test_restore_from_a_log_that_lost_its_tail_rereads_it_by_event_id(tmp_path):
    """The log lost its last events after the learner committed them, then got new ones whose seqs run past
    the committed offset again: the new events are consumed, the surviving old ones are not counted twice."""
    rng = np.random.default_rng(4)
    path = tmp_path / "events.sqlite"
    log = SQLiteEventLog(path)
    traffic(log, rng, 0, 10)  # seqs 1..20
    a = make(tmp_path, "a", "linucb")
    a.restore(log.read, log.log_id())
    a.consume(log.read(0, 1000))
    a.update()
    before = set(a.consumed_ids())
    log.close()

    lose_tail(path, keep=12)
    log = SQLiteEventLog(path)
    traffic(log, rng, 100, 6)  # seqs 13..24
    b = make(tmp_path, "a", "linucb")
    assert b.restore(log.read, log.log_id())
    b.consume(log.read(b.seen, 1000))
    assert sorted(s.decision.decision_id for s in b.samples) == [f"d{i}" for i in range(100, 106)]
    b.update()
    assert b.counts["samples"] == 10 + 6 and b.counts["log_mismatch"] == 1
    ids = b.consumed_ids()
    assert len(ids) == len(set(ids)) and set(ids) == before | set(log.event_ids())


def test_running_learner_notices_a_lost_tail_on_its_next_read(tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "events.sqlite"
    log = SQLiteEventLog(path)
    traffic(log, rng, 0, 10)
    a = make(tmp_path, "a", "linucb")
    a.restore(log.read, log.log_id())
    assert a.consume(log.read(a.read_after(), 1000), log.read) == 20
    a.update()
    log.close()
    lose_tail(path, keep=12)  # the buffer restarted without its tail ...
    log = SQLiteEventLog(path)
    traffic(log, rng, 100, 6)  # ... and took new events, seqs 13..24
    assert a.consume(log.read(a.read_after(), 1000), log.read) == 12
    assert sorted(s.decision.decision_id for s in a.samples) == [f"d{i}" for i in range(100, 106)]
    assert a.consume(log.read(a.read_after(), 1000), log.read) == 0  # in step with the new log again
    a.update()
    ids = a.consumed_ids()
    assert len(ids) == len(set(ids)) and a.counts["samples"] == 16


def test_running_learner_checks_the_log_id(tmp_path):
    rng = np.random.default_rng(6)
    old, new = SQLiteEventLog(tmp_path / "old.sqlite"), SQLiteEventLog(tmp_path / "new.sqlite")
    traffic(old, rng, 0, 4)
    a = make(tmp_path, "a", "linucb")
    a.restore(old.read, old.log_id())
    a.consume(old.read(0, 1000))
    a.update()
    assert a.check_log(old.read, old.log_id())
    traffic(new, rng, 100, 5)
    assert not a.check_log(new.read, new.log_id())
    assert len(a.samples) == 5 and a.log_id == new.log_id()


def test_restore_ignores_decisions_from_an_older_pool(tmp_path):
    """A log holding decisions for models no longer in the pool: they never become samples or replay
    entries, on the live path or on restore (where they used to break replay steps)."""
    rng = np.random.default_rng(7)
    log = SQLiteEventLog(tmp_path / "events.sqlite")
    traffic(log, rng, 0, 4, model="retired-model")
    traffic(log, rng, 4, 8)
    a = make(tmp_path, "a", replay_steps=2)
    a.restore(log.read, log.log_id())
    a.consume(log.read(0, 1000))
    assert a.counts["unknown_model"] == 4 and len(a.samples) == 8
    a.update()

    b = make(tmp_path, "a", replay_steps=2)
    assert b.restore(log.read, log.log_id())
    assert sorted(s.decision.decision_id for s in b.replay) == sorted(f"d{i}" for i in range(4, 12))
    traffic(log, rng, 12, 4)
    b.consume(log.read(b.seen, 1000))
    v = b.policy.version
    assert b.update() is not None and b.policy.version == v + 1 + 2  # the step and two replay steps


# -- cold start ----------------------------------------------------------------------------------------------------
def test_reset_is_cold_even_after_a_restart(tmp_path):
    rng = np.random.default_rng(8)
    log = SQLiteEventLog(tmp_path / "events.sqlite")
    traffic(log, rng, 0, 8)
    log.append([decision(50, rng)])  # still waiting for its outcome at the reset
    a = make(tmp_path, "a")
    a.restore(log.read, log.log_id())
    a.consume(log.read(0, 1000))
    a.update()
    assert len(a.replay) == 8 and list(a.pending) == ["d50"]
    a.reset(make_policy("barp", MODELS, DIM, tau=0.01, seed=3))
    assert not a.replay and not a.pending and not a.samples
    assert a.replay_rng.bit_generator.state == np.random.default_rng(0).bit_generator.state

    log.append([outcome(50, value=1.0)])  # the pre-reset decision's outcome: not learned by the cold policy
    traffic(log, rng, 100, 2)
    a.consume(log.read(a.seen, 1000))
    assert [s.decision.decision_id for s in a.samples] == ["d100", "d101"]
    a.update()
    b = make(tmp_path, "a")  # a restart rebuilds the same cold state from the log
    b.restore(log.read, log.log_id())
    assert [s.decision.decision_id for s in b.replay] == ["d100", "d101"] and not b.pending


# -- failures are outcomes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("learn", [True, False])
def test_failed_calls_score_zero(tmp_path, learn):
    rng = np.random.default_rng(9)
    log = SQLiteEventLog(tmp_path / "events.sqlite")
    log.append([decision(0, rng, outcome="error", cost_usd=0.0), outcome(0, "error", 0.0)])
    log.append([decision(1, rng, outcome="timeout", cost_usd=0.003), outcome(1, "timeout", 0.0)])
    log.append([decision(2, rng), outcome(2, "accepted", 1.0)])  # implicit: off by default
    a = make(tmp_path, "a", learn_from_failures=learn)  # train_on_implicit is False
    a.consume(log.read(0, 1000))
    if learn:
        assert [(s.decision.decision_id, s.score) for s in a.samples] == [("d0", 0.0), ("d1", 0.0)]
        # scored as the worst outcome (c~ = 1), so a failure never beats a success, whatever w is
        assert all(s.decision.cost >= a.policy.tau for s in a.samples)
        batch = a._batch(a.samples)
        for wc in np.linspace(0, 1, 11):
            w = np.tile([1 - wc, wc], (len(batch), 1))
            fail_r = reward(batch.scores, batch.costs, w, a.policy.tau)
            worst_success = reward(np.zeros(1), np.array([10 * a.policy.tau]), w[:1], a.policy.tau)
            assert (fail_r <= worst_success + 1e-12).all()
    else:
        assert not a.samples and list(a.pending) == ["d2"]


# -- bounded state -------------------------------------------------------------------------------------------------
def test_state_is_bounded(tmp_path):
    rng = np.random.default_rng(10)
    log = SQLiteEventLog(tmp_path / "events.sqlite")
    traffic(log, rng, 0, 30)
    a = make(tmp_path, "a", "linucb", resolved_capacity=5, version_history=3, replay_capacity=7)
    for i in range(0, 60, 4):
        a.consume(log.read(i, 4))
        a.update()
    assert len(a.resolved) == 5 and list(a.resolved)[-1] == "d29"
    assert len(a.version_feedback_time) == 3 and max(a.version_feedback_time) == a.policy.version
    assert len(a.replay) == 0  # LinUCB never replays, so it keeps no samples for it
    r = make(tmp_path, "r", "barp", replay_capacity=7)
    for i in range(0, 60, 4):
        r.consume(log.read(i, 4))
        r.update()
    assert len(r.replay) == 7 and r.replay[-1].decision.decision_id == "d29"

    log.append([decision(i, rng) for i in range(100, 110)])  # no outcomes
    b = make(tmp_path, "b", "linucb", max_pending=4)
    b.consume(log.read(0, 1000))
    assert list(b.pending) == ["d106", "d107", "d108", "d109"] and b.counts["dropped_pending"] == 6
    d = b.pending["d109"]
    assert d.context.dtype == np.float32 and d.context.shape == (DIM,)


def test_pending_decisions_expire_after_the_horizon(tmp_path):
    rng = np.random.default_rng(11)
    a = make(tmp_path, "a", "linucb", pending_horizon_s=60)
    t0 = 1_000_000.0
    a.consume([(1, {**decision(1, rng), "received": t0}), (2, {**decision(2, rng), "received": t0 + 30})])
    a.consume([(3, {**decision(3, rng), "received": t0 + 61})])  # the log's clock passes d1's horizon
    assert list(a.pending) == ["d2", "d3"] and a.counts["expired_pending"] == 1
    a.consume([(4, {**outcome(1, value=1.0), "received": t0 + 62})])
    assert not a.samples  # too late


# -- retention -----------------------------------------------------------------------------------------------------
def test_log_identity_and_compaction_keep_offsets_valid(tmp_path):
    path = tmp_path / "events.sqlite"
    log = SQLiteEventLog(path)
    lid = log.log_id()
    log.close()
    log = SQLiteEventLog(path)
    assert log.log_id() == lid and SQLiteEventLog(tmp_path / "other.sqlite").log_id() != lid
    rng = np.random.default_rng(12)
    traffic(log, rng, 0, 10)  # seqs 1..20
    assert log.compact(below_seq=15, older_than_s=3600) == 0  # nothing old enough
    assert log.compact(below_seq=15, older_than_s=0, now=log.read(19, 1)[0][1]["received"] + 1) == 14
    assert log.first_seq() == 15 and log.last_seq() == 20
    traffic(log, rng, 10, 1)
    assert [s for s, _ in log.read(0, 100)][-2:] == [21, 22]  # seqs are never reused
    assert log.compact(below_seq=10**9, older_than_s=0, now=log.read(21, 1)[0][1]["received"] + 1) == 8
    traffic(log, rng, 11, 1)
    assert log.first_seq() == 23 and log.last_seq() == 24


def test_compaction_deletes_a_prefix_even_when_the_clock_went_back(tmp_path, monkeypatch):
    import types

    import learner.eventlog as eventlog

    clock = iter([100.0, 200.0, 150.0, 300.0])  # the wall clock stepped back between the 2nd and 3rd append
    monkeypatch.setattr(eventlog, "time", types.SimpleNamespace(time=lambda: next(clock)))
    log = SQLiteEventLog(tmp_path / "events.sqlite")
    for i in range(4):
        log.append([outcome(i, value=1.0)])
    assert log.compact(below_seq=10, older_than_s=0, now=180.0) == 1  # seq 3 is old, but seq 2 is not
    assert [s for s, _ in log.read(0, 10)] == [2, 3, 4]


def test_compaction_below_the_floor_keeps_restore_exact(tmp_path):
    """Compacting at `compaction_floor()` keeps the committed offset's row, the waiting decisions and the
    replay store's decisions: a restore after it rebuilds the same state, and the identity check passes."""
    rng = np.random.default_rng(13)
    log = SQLiteEventLog(tmp_path / "events.sqlite")
    log.append([decision(0, rng)])  # waits for its outcome throughout
    traffic(log, rng, 1, 12)
    a = make(tmp_path, "a", replay_capacity=6)
    a.restore(log.read, log.log_id())
    for i in range(0, 25, 8):
        a.consume(log.read(i, 8))
        a.update()
    floor = a.compaction_floor()
    assert floor == 1  # d0 is still waiting
    del a.pending["d0"]  # (say it expired)
    floor = a.compaction_floor()
    assert 1 < floor <= a.offset
    removed = log.compact(floor, older_than_s=0, now=1e12)
    assert removed == floor - 1 and a.prune_consumed(log.first_seq()) == removed
    b = make(tmp_path, "a", replay_capacity=6)
    assert b.restore(log.read, log.log_id()) and b.counts["log_mismatch"] == 0
    assert [s.decision.decision_id for s in b.replay] == [s.decision.decision_id for s in a.replay]
    assert_same_learning(a, b)


# -- nothing in state_dir is executed; checkpoints are durable -----------------------------------------------------
class _Boom:
    def __reduce__(self):
        return (os.mkdir, (os.environ["BOOM_DIR"],))


def test_commits_hold_no_pickle_and_an_old_pickle_is_never_loaded(tmp_path, monkeypatch):
    """A learner state in the old format (a pickled commit) is dropped unread, with its consumed record: the
    learner starts from its checkpoint and counts every event in the log once."""
    import pickle

    boom = tmp_path / "boom"
    monkeypatch.setenv("BOOM_DIR", str(boom))
    log = SQLiteEventLog(tmp_path / "events.sqlite")
    traffic(log, np.random.default_rng(14), 0, 4)
    state_dir = tmp_path / "a"
    state_dir.mkdir()
    db = sqlite3.connect(state_dir / "learner.sqlite", isolation_level=None)  # the old format, with a payload
    db.execute("CREATE TABLE commit_state (id INTEGER PRIMARY KEY, version INTEGER, offset INTEGER, time REAL,"
               " stats TEXT, state BLOB)")  # fmt: skip
    db.execute("INSERT INTO commit_state VALUES (1, 1, 8, 0, '', ?)", (pickle.dumps(_Boom()),))
    db.execute("CREATE TABLE consumed (event_id TEXT PRIMARY KEY, seq INTEGER NOT NULL)")
    db.executemany("INSERT INTO consumed VALUES (?, ?)", [(e["event_id"], s) for s, e in log.read(0, 100)])
    db.close()
    a = make(tmp_path, "a")
    assert not a.restore(log.read, log.log_id()) and not boom.exists()
    a.consume(log.read(0, 100))
    a.update()
    assert sorted(a.consumed_ids()) == sorted(log.event_ids())
    meta, blob = a.db.execute("SELECT meta, arrays FROM commits").fetchone()
    assert json.loads(meta)["policy"]["policy"] == "barp"
    arrays = load_arrays(blob)  # safetensors: raw arrays and a JSON header, nothing to execute
    assert any(k.startswith("training.optimizer.") for k in arrays) and "training.generator" in arrays


def test_save_checkpoint_is_fsynced(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b)))
    path = tmp_path / "ck" / "p.pt"
    save_checkpoint(make_policy("linucb", MODELS, DIM, tau=0.01), path)
    tmp = str(path) + ".tmp"
    assert events == [("fsync", tmp), ("replace", tmp, str(path)), ("fsync", str(path.parent))]
