"""`banditrouter budget-eval` (banditrouter/evaluation/budget.py), without Ray, on synthetic logs: the budget
invariant spend <= budget + one request's maximum cost over random budgets and seeds, refusal and
`exhausted_at`, greedy-until-broke and cheapest-first, budget.json's shape, and bad input -> a clear error."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from banditrouter.data.log import RoutingLog
from banditrouter.evaluation import budget as be
from banditrouter.evaluation.budget import BudgetInvariantError, Pacing, Stream, parse_budgets, run_budget_eval, run_stream
from banditrouter.pacing import CostEstimator
from banditrouter.pipeline import Split
from banditrouter.policies import make_policy
from banditrouter.synthetic import make_synthetic

K, D = 4, 8


def _log(n: int, seed: int, heavy_tail: bool = True) -> tuple[np.ndarray, RoutingLog]:
    """A synthetic log with prompts of varied length whose costs grow with it; with `heavy_tail`, some calls
    cost far more than the length predicts (what the invariant's one-request slack is for)."""
    x, log = make_synthetic(n=n, dim=D, n_arms=K, seed=seed, noisy=True)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 3000, size=n)
    prompts = tuple("p" * int(c) for c in lengths)
    costs = np.geomspace(1e-4, 1e-2, K)[None, :] * (0.5 + lengths[:, None] / 1000.0) * rng.uniform(0.7, 1.3, size=(n, K))
    if heavy_tail:
        costs = costs * np.where(rng.random((n, K)) < 0.03, 8.0, 1.0)
    log = RoutingLog(log.name, log.prompt_ids, prompts, log.models, log.scores, costs)
    return x, log


def _stream(n: int = 120, seed: int = 0) -> tuple[Stream, Split, Split]:
    x, log = _log(2 * n, seed)
    train = Split(log.subset(np.arange(n)), x[:n])
    test = Split(log.subset(np.arange(n, 2 * n)), x[n:])
    est = CostEstimator.fit(train.log)
    stream = Stream(test.contexts, test.log.scores, test.log.costs, est([len(p) for p in test.log.prompts]), log.models)
    return stream, train, test


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fraction=st.floats(min_value=1e-4, max_value=1.5),
    seed=st.integers(min_value=0, max_value=10_000),
    kind=st.sampled_from(["paced", "cheapest", "fixed"]),
    bin_size=st.integers(min_value=1, max_value=200),
)
def test_spend_never_passes_budget_plus_one_request(fraction, seed, kind, bin_size):
    stream, _, _ = _stream(seed=seed % 7)
    rng = np.random.default_rng(seed)
    budget = fraction * float(np.nansum(stream.costs[:, -1]))  # fractions of the dearest arm's spend
    kw = {}
    if kind == "paced":
        L = float(rng.uniform(1.0, 100.0))
        kw = dict(
            policy=make_policy("linucb", stream.models, D, 0.01, seed=seed),
            pacing=Pacing(L, L * 10 ** rng.uniform(0, 4), bin_size),
        )
    elif kind == "fixed":
        kw = dict(fixed_arm=int(rng.integers(K)))
    r = run_stream(stream, budget, rng.permutation(len(stream)), kind=kind, rng=rng, **kw)
    assert r["spend_usd"] <= budget + stream.max_request_cost
    assert r["spend_usd"] <= budget + max(r["max_cost_over_estimate_usd"], 0.0) + 1e-12
    refused = r["arm"] < 0
    assert (r["score"][refused] == 0).all() and (r["cost"][refused] == 0).all()
    if refused.any():
        assert r["exhausted_at"] == int(np.flatnonzero(refused)[0])
    else:
        assert r["exhausted_at"] is None


def test_a_budget_below_the_cheapest_arm_refuses_everything():
    stream, _, _ = _stream()
    r = run_stream(stream, float(stream.weights.min()) / 2, np.arange(len(stream)), kind="cheapest")
    assert r["spend_usd"] == 0.0 and r["accuracy"] == 0.0 and r["exhausted_at"] == 0 and r["n_refused"] == len(stream)


def _flat_stream(n: int = 10) -> Stream:
    """Costs equal to their estimates: arm 0 costs 1, arm 1 costs 3, arm 1 always right, arm 0 never."""
    scores = np.tile([0.0, 1.0], (n, 1))
    costs = np.tile([1.0, 3.0], (n, 1))
    return Stream(np.eye(n, D, dtype=np.float32), scores, costs, costs.copy(), ("cheap", "dear"))


def test_greedy_until_broke_serves_its_model_until_the_budget_cannot_pay_then_refuses():
    r = run_stream(_flat_stream(), 10.0, np.arange(10), kind="fixed", fixed_arm=1)
    assert r["arm"].tolist() == [1, 1, 1] + [-1] * 7
    assert r["spend_usd"] == 9.0 and r["exhausted_at"] == 3 and r["accuracy"] == pytest.approx(0.3)


def test_cheapest_first_always_takes_the_cheapest_estimate():
    r = run_stream(_flat_stream(), 4.5, np.arange(10), kind="cheapest")
    assert r["arm"].tolist() == [0, 0, 0, 0] + [-1] * 6 and r["exhausted_at"] == 4 and r["spend_usd"] == 4.0


def test_a_paced_policy_only_gets_arms_it_can_afford():
    """With 4 units left, the dear arm (3) fits once and then only the cheap one (1) does."""
    stream = _flat_stream()
    pol = make_policy("linucb", stream.models, D, 0.01)
    r = run_stream(
        stream, 4.0, np.arange(10), kind="paced", policy=pol, pacing=Pacing(0.01, 10.0, 10), rng=np.random.default_rng(0)
    )
    assert r["spend_usd"] <= 4.0 and set(r["arm"][r["arm"] >= 0].tolist()) <= {0, 1}
    assert r["arm"][r["arm"] >= 0].tolist().count(1) <= 1


def test_serving_outside_the_allowed_set_is_caught(monkeypatch):
    """The guard on the allowed set fails loudly: a pacing that picked an unaffordable arm is a bug."""
    from banditrouter.pacing import Paced

    monkeypatch.setattr(be, "pace", lambda *a, **k: Paced(1, 1.0, np.ones(2, bool), 0.0, False))
    pol = make_policy("linucb", ("cheap", "dear"), D, 0.01)
    with pytest.raises(BudgetInvariantError, match="does not fit"):
        run_stream(_flat_stream(), 2.0, np.arange(10), kind="paced", policy=pol, pacing=Pacing(0.01, 10.0, 10))


def test_budget_json_has_the_issue_shape_and_the_figures_are_written(tmp_path):
    _, train, test = _stream(n=150)
    res = run_budget_eval(
        "synthetic",
        tmp_path,
        budgets=[0.25, 1.0],
        seeds=[0, 3],
        policies=["linucb", "cheapest", "greedy"],
        bin_size=20,
        train=train,
        test=test,
        progress=False,
        log_fn=lambda *a: None,
    )
    data = json.loads((tmp_path / "budget.json").read_text())
    assert {"dataset", "seeds", "reference_spend_usd", "max_request_cost_usd", "runs"} <= set(data)
    assert data["dataset"] == "synthetic" and data["seeds"] == [0, 3]
    assert data["reference_model"] == train.log.models[int(np.nanargmax(np.nanmean(train.log.scores, axis=0)))]
    assert data["reference_spend_usd"] == pytest.approx(
        float(np.nansum(test.log.costs[:, train.log.models.index(data["reference_model"])]))
    )
    assert data["max_request_cost_usd"] == pytest.approx(float(np.nanmax(test.log.costs)))
    assert len(data["runs"]) == 2 * 2 * 3
    for r in data["runs"]:
        assert {"policy", "budget_fraction", "budget_usd", "seed", "spend_usd", "accuracy", "exhausted_at"} <= set(r)
        assert r["budget_usd"] == pytest.approx(r["budget_fraction"] * data["reference_spend_usd"])
        assert r["spend_usd"] <= r["budget_usd"] + data["max_request_cost_usd"]
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["exhausted_at"] is None or 0 <= r["exhausted_at"] < data["n_test"]
    assert data["checks"]["spend_within_budget_plus_max_request"] is True
    assert {"L", "U"} <= set(data["policies"]["linucb"])
    assert len(data["learning_curves"]["policies"]["linucb"]["0.25"]["accuracy_mean"]) == int(np.ceil(150 / 50))
    assert (tmp_path / "budget_frontier.png").stat().st_size > 0 and (tmp_path / "learning_curves.png").stat().st_size > 0
    assert res.summary["greedy"]["1.0"]["accuracy_mean"] > res.summary["greedy"]["0.25"]["accuracy_mean"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "at least one"),
        ("0.1,,", None),
        ("0.1,0", "> 0"),
        ("-0.5", "> 0"),
        ("0.1,abc", "numbers"),
        ("inf", "> 0"),
        ("0.5,0.5", "twice"),
    ],
)
def test_bad_budgets_are_refused(spec, message):
    if message is None:
        assert parse_budgets(spec) == [0.1]
        return
    with pytest.raises(ValueError, match=message):
        parse_budgets(spec)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(policies=["pilot", "oracle"]), "unknown budget-eval policies"),
        (dict(policies=[]), "unknown budget-eval policies"),
        (dict(policies=["linucb", "linucb"]), "twice"),
        (dict(seeds=[]), "seeds"),
        (dict(seeds=[1, 1]), "seeds"),
        (dict(budgets=[]), "at least one"),
        (dict(budgets=[0.0]), "> 0"),
        (dict(value_mode="lucky"), "value mode"),
        (dict(bin_size=0), "bin_size"),
        (dict(reference_model="gpt-5"), "not in the pool"),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_error(tmp_path, kw, message):
    _, train, test = _stream(n=60)
    args = dict(policies=["cheapest"], seeds=[0], budgets=[0.5], train=train, test=test, progress=False, log_fn=lambda *a: None)
    with pytest.raises(ValueError, match=message):
        run_budget_eval("synthetic", tmp_path, **{**args, **kw})


def test_cli_reports_bad_input_without_a_traceback():
    from typer.testing import CliRunner

    from banditrouter.cli import app

    runner = CliRunner()
    for argv, message in (
        (["--budgets", ""], "at least one"),
        (["--budgets", "0.1,-1"], "> 0"),
        (["--seeds", "4-0"], "seeds must look like"),
        (["--policies", "pilot,oracle"], "unknown budget-eval policies"),
    ):
        res = runner.invoke(app, ["budget-eval", *argv])
        assert res.exit_code == 2, res.output
        assert message in " ".join(res.output.split())


def test_a_cached_checkpoint_trained_under_other_settings_is_trained_again(tmp_path):
    """The cache compared name, data, seed, epochs and tau only: after a default changed (PILOT's ridge and
    alpha did), the old checkpoint was loaded silently and the report described settings it did not use."""
    _, train, _ = _stream(60)
    logs: list[str] = []
    kw = dict(seed=0, tau=1.0, cache=tmp_path, epochs=None, retrain=False, progress=False, log_fn=logs.append)
    be._trained_policy("pilot", train, **kw)
    be._trained_policy("pilot", train, **kw)
    assert "loaded" in logs[-1]
    side = tmp_path / "pilot-seed0.json"
    meta = json.loads(side.read_text())
    meta["config"]["ridge"] = 5.0  # as if cached by code whose default ridge was 5
    side.write_text(json.dumps(meta))
    be._trained_policy("pilot", train, **kw)
    assert "trained" in logs[-1] and "loaded" not in logs[-1]
