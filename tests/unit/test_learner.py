"""The learner's logic, without Ray: the decision/outcome join, atomic commits and exactly-once effect across
a restart (the buffer's own tests are in tests/unit/test_buffer.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from factories import MODELS, decision

from banditrouter.policies import make_policy
from learner.buffer import EventBuffer
from learner.core import Learner, LearnerSettings, install


def _learner(tmp_path, batch_size=4):
    pol = make_policy("linucb", MODELS, 8, tau=0.01)
    return Learner(pol, tmp_path / "learner", LearnerSettings(batch_size=batch_size, max_wait_s=60))


def _feed(buf, rng, n, start=0):
    for i in range(start, start + n):
        buf.append_decisions([decision(i, rng)])
        buf.add_feedback(f"d{i}", float(i % 3) / 2)


def test_learner_joins_updates_and_commits_atomically(tmp_path, rng):
    buf = EventBuffer(tmp_path / "e.sqlite")
    _feed(buf, rng, 8)
    ln = _learner(tmp_path)
    ln.consume(buf.log.read(0))
    assert len(ln.samples) == 8 and ln.ready()
    v0 = ln.policy.version
    ln.update()
    assert ln.policy.version == v0 + 1 and ln.offset == buf.log.last_seq()
    assert set(ln.consumed_ids()) == set(buf.log.event_ids())
    assert ln.export_path.exists()


def test_restart_counts_every_event_once(tmp_path, rng):
    """Crash after reading events the learner had not committed: after restart, the parameters equal those
    of a learner that never crashed, and the consumed ids equal the emitted ids, each once."""
    buf = EventBuffer(tmp_path / "e.sqlite")
    _feed(buf, rng, 8)
    a = _learner(tmp_path / "a")
    a.consume(buf.log.read(0))
    a.update()
    _feed(buf, rng, 6, start=8)
    a.consume(buf.log.read(a.seen))  # read but not committed ...
    del a  # ... crash

    b = _learner(tmp_path / "a")
    assert b.restore(lambda after, limit: buf.log.read(after, limit))
    b.consume(buf.log.read(b.seen))
    b.update()

    ref = _learner(tmp_path / "ref", batch_size=4)
    ref.consume(buf.log.read(0, 2 * 8 + 1 - 1))  # first 8 decisions + 8 feedbacks
    ref.update()
    ref.consume(buf.log.read(ref.seen))
    ref.update()
    assert b.policy.version == ref.policy.version
    for k, v in ref.policy.state_dict()["params"].items():
        np.testing.assert_allclose(b.policy.state_dict()["params"][k], v)
    ids = b.consumed_ids()
    assert len(ids) == len(set(ids)) and set(ids) == set(buf.log.event_ids())


def test_non_finite_update_is_rolled_back(tmp_path, rng):
    buf = EventBuffer(tmp_path / "e.sqlite")
    _feed(buf, rng, 4)
    ln = _learner(tmp_path)
    ln.consume(buf.log.read(0))
    ln.samples[0].decision.context[:] = np.inf  # a poisoned context slipped past every check
    before = ln.policy.state_dict()
    assert ln.update() is None and ln.counts["rejected_update"] == 1
    after = ln.policy.state_dict()
    assert ln.policy.version == before["version"]
    assert all(np.isfinite(v).all() for v in after["params"].values())


def test_install_refuses_bad_blobs():
    pol = make_policy("linucb", MODELS, 8, tau=0.01)
    good = pol.state_dict()
    bad_nan = {**good, "params": {k: np.full_like(v, math.nan) for k, v in good["params"].items()}}
    bad_shape = {**good, "params": {k: np.zeros((3, 3)) for k in good["params"]}}
    for blob in (bad_nan, bad_shape, {"junk": 1}, b"\x00corrupt"):
        with pytest.raises(Exception, match="non-finite|shape|not a policy state"):
            install(pol, blob)
    assert install(pol, good).version == pol.version


def test_replay_steps_only_for_gradient_policies(tmp_path, rng):
    """BaRP takes extra off-policy steps on past samples; LinUCB must count each sample once, so it ignores them."""
    buf = EventBuffer(tmp_path / "e.sqlite")
    _feed(buf, rng, 16)
    for name in ("barp", "linucb"):
        pol = make_policy(name, MODELS, 8, tau=0.01)
        ln = Learner(pol, tmp_path / name, LearnerSettings(batch_size=4, max_wait_s=60, replay_steps=2))
        rows = buf.log.read(0)
        ln.consume(rows[:8])  # 4 samples
        ln.update()
        v = ln.policy.version
        ln.consume(rows[8:16])  # 4 more, with 4 in the replay buffer
        ln.update()
        assert ln.policy.version - v == (3 if name == "barp" else 1)
        assert len(ln.replay) == (8 if name == "barp" else 0)  # only a replaying policy keeps samples


def test_replay_relabels_preferences_and_keeps_outcomes(tmp_path, rng):
    """Relabelled replay scores the logged (arm, propensity, score, cost) under fresh preferences; without
    it, replayed samples keep the preference they were served with (every logged one is (0.7, 0.3))."""
    buf = EventBuffer(tmp_path / "e.sqlite")
    _feed(buf, rng, 16)
    for relabel in (True, False):
        pol = make_policy("barp", MODELS, 8, tau=0.01)
        seen = []
        real_update = pol.update
        pol.update = lambda b, _u=real_update, _seen=seen: (_seen.append(b), _u(b))[1]
        ln = Learner(
            pol, tmp_path / f"r{relabel}", LearnerSettings(batch_size=4, max_wait_s=60, replay_steps=3, replay_relabel=relabel)
        )
        rows = buf.log.read(0)
        ln.consume(rows[:8])
        ln.update()
        ln.consume(rows[8:16])
        ln.update()
        fresh, replayed = seen[1], seen[2:]
        assert len(replayed) == 3 and np.allclose(fresh.preferences, [0.7, 0.3])
        for b in replayed:
            assert np.allclose(b.preferences.sum(axis=1), 1.0) and (b.preferences >= 0).all()
            assert np.allclose(b.propensities, 0.5) and set(b.arms) <= {0, 1}
            assert np.allclose(b.preferences, [0.7, 0.3]) != relabel


@pytest.mark.parametrize("name", ["barp", "lints"])
def test_install_continues_the_routers_random_stream(name, rng):
    """Installing a version must not re-seed exploration: a router that did would replay the same draws
    after every install (and two replicas would draw in lockstep)."""
    pol = make_policy(name, ("a", "b", "c", "d", "e"), 8, tau=0.01, seed=7)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    w = np.tile([0.5, 0.5], (64, 1))
    state = pol.state_dict()
    first = install(pol, state)
    a = first.select(x, w, explore=True).arms
    b = install(first, state).select(x, w, explore=True).arms  # same weights, the stream goes on
    assert not np.array_equal(a, b)
