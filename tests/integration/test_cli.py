"""The CLI end to end on small slices: `eval` on routerbench, llmrouter and a JSONL file, `train` then
`eval --checkpoint`, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from banditrouter.cli import app
from banditrouter.data import load_routerbench
from tests.conftest import write_jsonl

runner = CliRunner()
SMOKE = ["--limit-train", "150", "--limit-test", "60", "--epochs", "2"]


def _eval(out, *args):
    res = runner.invoke(app, ["eval", "--out", str(out), *SMOKE, *args])
    assert res.exit_code == 0, res.output
    return json.loads((out / "results.json").read_text())


def _check_results(r, n_test):
    assert r["n_test"] == n_test and r["models"]
    assert {"oracle"} | {f"single:{m}" for m in r["models"]} <= set(r["references"])
    assert {"accuracy", "cost"} <= set(r["references"]["oracle"])
    assert any("supervised" in k for k in r["policies"])
    for _name, pol in r["policies"].items():
        assert [p["w_cost"] for p in pol["points"]] == pytest.approx([i / 10 for i in range(11)])
        assert all({"w_cost", "accuracy", "cost", "reward"} <= set(p) for p in pol["points"])
        assert 0.0 <= pol["aiq"] <= 1.0


@pytest.mark.parametrize("dataset", ["routerbench", "llmrouter"])
def test_eval_writes_results_and_figures(dataset, tmp_path, data_dir):
    r = _eval(tmp_path, "--dataset", dataset)
    _check_results(r, 60)
    assert set(r["policies"]) == {"barp", "supervised", "linucb", "lints", "epsilon_greedy", "best_single", "cheapest", "random"}
    for png in ("pareto.png", "preference_sweep.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_on_jsonl(tmp_path, data_dir):
    path = write_jsonl(tmp_path / "mylog.jsonl", load_routerbench(data_dir, "test"), n=200)
    r = _eval(tmp_path / "out", "--dataset", str(path), "--test-fraction", "0.25", "--policies", "barp,supervised,linucb")
    _check_results(r, 50)


def test_train_then_eval_checkpoint(tmp_path, data_dir):
    ckpt = tmp_path / "barp.pt"
    res = runner.invoke(app, ["train", "--policy", "barp", "--out", str(ckpt), "--limit", "150", "--epochs", "2"])
    assert res.exit_code == 0, res.output
    r = _eval(tmp_path / "out", "--checkpoint", str(ckpt), "--policies", "barp")
    assert list(r["policies"]) == ["barp"]
    assert r["policies"]["barp"]["policy_version"] > 0


def test_bad_input_gets_a_clear_error(tmp_path, data_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "prompt": "x", "outcomes": {"a": {"score": 2, "cost": 0}}}\n')
    for args, needle in (
        (["eval", "--dataset", str(bad), "--out", str(tmp_path)], "bad.jsonl:1"),
        (["eval", "--dataset", "nope", "--out", str(tmp_path)], "unknown dataset"),
        (["eval", "--policies", "barp,nope", "--out", str(tmp_path), *SMOKE], "unknown policies"),
        (["train", "--policy", "nope", "--limit", "20", "--out", str(tmp_path / "x.pt")], "unknown policy"),
        (["eval", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path)], "not found"),
        (["data", "fetch", "llmrouter"], "only 'routerbench'"),
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert needle in " ".join(res.output.split()), (needle, res.output)


def test_data_export_roundtrips_through_the_jsonl_loader(tmp_path, data_dir):
    from banditrouter.data import load_jsonl, load_llmrouter

    out = tmp_path / "llmrouter_test.jsonl"
    res = runner.invoke(app, ["data", "export", "--dataset", "llmrouter", "--split", "test", "--out", str(out)])
    assert res.exit_code == 0, res.output
    src, back = load_llmrouter(data_dir, "test"), load_jsonl(out)
    assert back.prompt_ids == src.prompt_ids and back.models == src.models
    assert (back.scores == src.scores).all() and abs(back.costs - src.costs).max() < 1e-12


def test_train_sets_policy_options_and_refuses_unknown_ones(tmp_path, data_dir):
    from banditrouter.policies import load_checkpoint

    out = tmp_path / "acqb.pt"
    args = ["train", "--policy", "acqb", "--limit", "60", "--epochs", "0", "--out", str(out)]
    res = runner.invoke(app, [*args, "-O", "c=0.25", "-O", "update_rule=irls", "-O", "v=0.5"])
    assert res.exit_code == 0, res.output
    cfg = load_checkpoint(out).state_dict()["config"]
    assert (cfg["c"], cfg["update_rule"], cfg["v"]) == (0.25, "irls", 0.5)
    for bad in (["-O", "no_such_field=1"], ["-O", "c"]):
        res = runner.invoke(app, [*args, *bad])
        assert res.exit_code == 2 and "error" in res.output
