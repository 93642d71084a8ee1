from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from banditrouter.data import DataError, load_dataset, load_jsonl, load_llmrouter, load_routerbench
from banditrouter.data.fetch import convert_routerbench, download
from banditrouter.data.loaders import LLMROUTER_CHARS_PER_TOKEN, LLMROUTER_OUTPUT_TOKENS, ROUTERBENCH_MODELS
from tests.conftest import write_jsonl


# -- RouterBench ----------------------------------------------------------------------------------------------
def test_routerbench_splits_and_quirks(data_dir):
    train, test = load_routerbench(data_dir, "train"), load_routerbench(data_dir, "test")
    # 1039 + 887 + 299 rows with 7 duplicated sample_ids; 445 + 380 + 128 with 1 duplicate
    assert (len(train), len(test)) == (2225 - 7, 953 - 1)
    for log in (train, test):
        assert len(set(log.prompt_ids)) == len(log)
        assert log.models == ROUTERBENCH_MODELS
        assert not any(p.startswith("['") for p in log.prompts), "list-literal prompts must be unwrapped"
        assert not any(r and r.startswith("['") for row in log.responses for r in row), "responses too"
        assert np.isfinite(log.costs).all()
        assert set(np.unique(log.scores[~np.isnan(log.scores)])) <= {0.0, 1.0}
    # ids are unique within a split only: --split all keeps every prompt of both, with unique ids
    both = load_routerbench(data_dir, "all")
    assert len(both) == len(train) + len(test) and len(set(both.prompt_ids)) == len(both)
    # empty score cells are missing, not zero
    assert np.isnan(train.scores).sum() + np.isnan(test.scores).sum() > 0
    assert {t.split(".")[0] for t in train.tasks} >= {"arc-challenge"}
    assert test.responses is not None and test.responses[0][0]


def test_routerbench_reference_figures(data_dir):
    stats = load_routerbench(data_dir, "test").single_model_stats()
    gpt4, yi = stats["gpt-4-1106-preview"], stats["zero-one-ai/Yi-34B-Chat"]
    assert gpt4["accuracy"] == pytest.approx(0.880, abs=0.002) and gpt4["cost"] == pytest.approx(5.03e-3, rel=0.01)
    assert yi["accuracy"] == pytest.approx(0.779, abs=0.002)


def test_routerbench_missing_dir_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="data fetch routerbench"):
        load_routerbench(tmp_path, "train")


def test_unknown_split_and_dataset(data_dir):
    with pytest.raises(DataError, match="unknown split"):
        load_routerbench(data_dir, "validation")
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("nope")


# -- LLMRouter ------------------------------------------------------------------------------------------------
def test_llmrouter_cost_estimate(data_dir):
    log = load_llmrouter(data_dir, "test")
    assert len(log) == 500 and log.n_models == 9
    prices = json.loads((data_dir / "llmrouter" / "default_llm.json").read_text())
    i, k = 7, 2
    p = prices[log.models[k]]
    n_in = -(-len(log.prompts[i]) // int(LLMROUTER_CHARS_PER_TOKEN))
    assert log.costs[i, k] == pytest.approx((n_in * p["input_price"] + LLMROUTER_OUTPUT_TOKENS * p["output_price"]) / 1e6)
    assert "estimated" in log.notes[0]
    train = load_llmrouter(data_dir, "train")
    assert len(train) == 5608
    assert train.models == log.models, "arm k must mean the same model in every split"


def test_with_models_reorders_columns(data_dir):
    log = load_routerbench(data_dir, "test").head(5)
    rev = log.with_models(tuple(reversed(log.models)))
    np.testing.assert_array_equal(rev.costs, log.costs[:, ::-1])
    assert rev.responses[2][0] == log.responses[2][-1]
    with pytest.raises(ValueError, match="no outcomes"):
        log.with_models(("nope", *log.models[1:]))


# -- JSONL ----------------------------------------------------------------------------------------------------
def test_jsonl_roundtrip_and_split(tmp_path, data_dir):
    src = load_routerbench(data_dir, "test").head(40)
    path = write_jsonl(tmp_path / "log.jsonl", src)
    log = load_jsonl(path)
    assert log.prompt_ids == src.prompt_ids and log.models == src.models
    np.testing.assert_array_equal(np.isnan(log.scores), np.isnan(src.scores))
    np.testing.assert_allclose(log.costs, src.costs)
    tr, te = load_jsonl(path, "train", seed=1), load_jsonl(path, "test", seed=1)
    assert len(tr) + len(te) == 40 and len(te) == 12
    assert not set(tr.prompt_ids) & set(te.prompt_ids)
    assert load_jsonl(path, "test", seed=1).prompt_ids == te.prompt_ids, "split must be seeded"
    assert load_jsonl(path, "test", seed=2).prompt_ids != te.prompt_ids


def test_jsonl_missing_model_is_missing_cell(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(
        json.dumps({"id": "1", "prompt": "hi", "outcomes": {"a": {"score": 1, "cost": 0.1}, "b": {"score": 0, "cost": 0.2}}})
        + "\n"
        + json.dumps({"id": "2", "prompt": "yo", "outcomes": {"b": {"score": 0.5, "cost": 0.3, "latency_s": 1.5}}})
        + "\n"
    )
    log = load_jsonl(p)
    assert log.models == ("a", "b") and np.isnan(log.scores[1, 0]) and log.latency_s[1, 1] == 1.5


@pytest.mark.parametrize(
    "line, message",
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"[1, 2]", "JSON object"),
        (b'{"prompt": "x", "outcomes": {"a": {"score": 1, "cost": 0}}}', '"id"'),
        (b'{"id": "1", "prompt": "", "outcomes": {"a": {"score": 1, "cost": 0}}}', '"prompt"'),
        (b'{"id": "1", "prompt": "x", "outcomes": {}}', '"outcomes"'),
        (b'{"id": "1", "prompt": "x", "outcomes": {"a": {"score": 1.5, "cost": 0}}}', "score must lie in"),
        (b'{"id": "1", "prompt": "x", "outcomes": {"a": {"score": NaN, "cost": 0}}}', "finite number"),
        (b'{"id": "1", "prompt": "x", "outcomes": {"a": {"score": 1, "cost": -1}}}', "cost must lie in"),
        (b'{"id": "1", "prompt": "x", "outcomes": {"a": {"score": 1}}}', 'needs "score" and "cost"'),
        (b'{"id": "1", "prompt": "x", "outcomes": {"a": {"score": "1", "cost": 0}}}', "finite number"),
        (b'{"id": "1", "prompt": "x", "outcomes": {"a": {"score": 1, "cost": 0, "cots": 1}}}', "unknown keys"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, line, message):
    p = tmp_path / "bad.jsonl"
    good = b'{"id": "0", "prompt": "ok", "outcomes": {"a": {"score": 1, "cost": 0.1}}}\n'
    p.write_bytes(good + b"\n" + line + b"\n")
    with pytest.raises(DataError) as e:
        load_jsonl(p)
    assert f"{p}:3:" in str(e.value) and message in str(e.value)


def test_jsonl_duplicate_id(tmp_path):
    p = tmp_path / "dup.jsonl"
    rec = json.dumps({"id": "x", "prompt": "p", "outcomes": {"a": {"score": 1, "cost": 0}}})
    p.write_text(rec + "\n" + rec + "\n")
    with pytest.raises(DataError, match=r"dup.jsonl:2: duplicate"):
        load_jsonl(p)


# -- data fetch -----------------------------------------------------------------------------------------------
def test_fetch_converts_release_file(tmp_path, data_dir):
    """The public release is a pandas pickle with the same columns as our CSVs; convert a slice of ours."""
    raw = pd.concat(
        [
            pd.read_csv(f, keep_default_na=False, na_values={m: [""] for m in ROUTERBENCH_MODELS})
            for f in sorted((data_dir / "routerbench").glob("*_test.csv"))
        ],
        ignore_index=True,
    )
    raw = raw.drop(columns=[raw.columns[0]]).groupby("eval_name").head(30).reset_index(drop=True)
    pkl = tmp_path / "routerbench_0shot.pkl"
    raw.to_pickle(pkl)
    counts = convert_routerbench(pkl, tmp_path / "out", seed=0)
    assert counts["train"] + counts["test"] == len(raw) and counts["test"] == 27
    train, test = load_routerbench(tmp_path / "out", "train"), load_routerbench(tmp_path / "out", "test")
    assert len(train) + len(test) == raw["sample_id"].nunique()
    assert not set(train.prompt_ids) & set(test.prompt_ids)
    row = raw.set_index("sample_id").loc[test.prompt_ids[0]]
    k = test.models.index("gpt-4-1106-preview")
    assert test.costs[0, k] == pytest.approx(row["gpt-4-1106-preview|total_cost"])


def test_fetch_offline_error_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="--source"):
        download("http://127.0.0.1:9/routerbench_0shot.pkl", tmp_path / "x.pkl", timeout_s=2)
    assert not list(tmp_path.iterdir()), "a failed download leaves no partial file"


def test_fetch_rejects_foreign_file(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="missing RouterBench columns"):
        convert_routerbench(p, tmp_path)
