"""Loaders for routing logs: RouterBench (CSV), LLMRouter (JSON) and the documented JSONL format.

Each returns a `RoutingLog`. Splits are the datasets' own train/test; a JSONL file is split with a seeded
permutation (`test_fraction`).
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path
from typing import Literal

import numpy as np

from banditrouter.data.log import RoutingLog
from banditrouter.data.paths import resolve_data_dir

Split = Literal["train", "test", "all"]
SPLITS = ("train", "test", "all")


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file (and line) and what to do."""


# ---------------------------------------------------------------------------------------------------------
# RouterBench
# ---------------------------------------------------------------------------------------------------------
ROUTERBENCH_MODELS = (
    "WizardLM/WizardLM-13B-V1.2",
    "claude-instant-v1",
    "claude-v1",
    "claude-v2",
    "gpt-3.5-turbo-1106",
    "gpt-4-1106-preview",
    "meta/code-llama-instruct-34b-chat",
    "meta/llama-2-70b-chat",
    "mistralai/mistral-7b-chat",
    "mistralai/mixtral-8x7b-chat",
    "zero-one-ai/Yi-34B-Chat",
)


def _parse_routerbench_prompt(raw: str) -> str:
    """RouterBench stores each prompt as a Python-list literal of one string: "['...']"."""
    text = raw.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return raw
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return "\n".join(value)
    return raw


def load_routerbench(data_dir: str | Path | None = None, split: Split = "train") -> RoutingLog:
    """Every `<task>_<split>.csv` under `<data_dir>/routerbench/` (the RouterDC re-split of RouterBench, or
    the full release converted by `banditrouter data fetch routerbench`).

    Quirks handled: duplicated `sample_id`s (the first row is kept), empty score cells (missing, not 0),
    list-literal prompts and responses.
    """
    import pandas as pd

    _check_split(split)
    root = resolve_data_dir(data_dir) / "routerbench"
    splits = ("train", "test") if split == "all" else (split,)
    files = sorted(f for s in splits for f in root.glob(f"*_{s}.csv"))
    if not files:
        raise DataError(
            f"no RouterBench files (*_{split}.csv) under {root}. Pass --data-dir (or set "
            f"BANDITROUTER_DATA_DIR) to a folder holding routerbench/, or run `banditrouter data fetch "
            f"routerbench` to download and convert the public release."
        )
    frames = []
    for s in splits:
        parts = []
        for f in (f for f in files if f.name.endswith(f"_{s}.csv")):
            part = pd.read_csv(
                f,
                dtype={"sample_id": str, "prompt": str, "eval_name": str},
                keep_default_na=False,
                na_values={m: [""] for m in ROUTERBENCH_MODELS},
            )
            missing = [c for c in ("sample_id", "prompt", "eval_name") if c not in part.columns]
            if missing:
                raise DataError(f"{f}: missing columns {missing}; is this a RouterBench file?")
            parts.append(part)
        if parts:
            # duplicated sample_ids within a split are the same prompt twice: keep the first
            frames.append(pd.concat(parts, ignore_index=True).drop_duplicates(subset="sample_id", keep="first").assign(_split=s))
    df = pd.concat(frames, ignore_index=True)
    # ids are unique within a split only: a few different prompts share an id across train and test
    clash = df.duplicated(subset="sample_id", keep="first")
    df.loc[clash, "sample_id"] = df.loc[clash, "sample_id"] + "@" + df.loc[clash, "_split"]
    models = tuple(m for m in ROUTERBENCH_MODELS if m in df.columns)
    if not models:
        raise DataError(f"{root}: none of the RouterBench model columns found")
    scores = np.column_stack([pd.to_numeric(df[m], errors="coerce").to_numpy(float) for m in models])
    costs = np.column_stack([pd.to_numeric(df[f"{m}|total_cost"], errors="coerce").to_numpy(float) for m in models])
    resp_cols = [f"{m}|model_response" for m in models]
    responses = None
    if all(c in df.columns for c in resp_cols):
        cols = [df[c].tolist() for c in resp_cols]
        # responses are list literals too, like prompts
        responses = tuple(
            tuple((_parse_routerbench_prompt(v) if v != "" else None) for v in row) for row in zip(*cols, strict=True)
        )
    return RoutingLog(
        name=f"routerbench/{split}",
        prompt_ids=tuple(df["sample_id"]),
        prompts=tuple(_parse_routerbench_prompt(p) for p in df["prompt"]),
        models=models,
        scores=scores,
        costs=costs,
        tasks=tuple(df["eval_name"]),
        responses=responses,
    )


# ---------------------------------------------------------------------------------------------------------
# LLMRouter (dcrouter_preprocessed)
# ---------------------------------------------------------------------------------------------------------
LLMROUTER_CHARS_PER_TOKEN = 4.0
"""[assumption] Input tokens are estimated as ceil(len(question) / 4): the usual rule of thumb for English
BPE tokenizers. The data has no token counts."""
LLMROUTER_OUTPUT_TOKENS = 256
"""[assumption] A typical answer length in tokens; the data has no responses, so every call is priced as if
the model answered with this many tokens."""


def load_llmrouter(data_dir: str | Path | None = None, split: Split = "train") -> RoutingLog:
    """`<data_dir>/llmrouter/dcrouter_{train,test}.json` with prices from `default_llm.json`.

    Cost per call = (input_tokens * input_price + output_tokens * output_price) / 1e6, with the token counts
    estimated as documented in LLMROUTER_CHARS_PER_TOKEN and LLMROUTER_OUTPUT_TOKENS.
    """
    _check_split(split)
    root = resolve_data_dir(data_dir) / "llmrouter"
    price_file = root / "default_llm.json"
    if not price_file.exists():
        raise DataError(f"{price_file} not found. Pass --data-dir to a folder holding llmrouter/.")
    prices = json.loads(price_file.read_text())
    rows: list[dict] = []
    for s in ("train", "test") if split == "all" else (split,):
        f = root / f"dcrouter_{s}.json"
        if not f.exists():
            raise DataError(f"{f} not found. Pass --data-dir to a folder holding llmrouter/.")
        data = json.loads(f.read_text())
        rows.extend({**r, "_id": f"{s}-{i}"} for i, r in enumerate(data))
    seen = {m for r in rows for m in r["scores"]}
    unpriced = sorted(seen - set(prices))
    if unpriced:
        raise DataError(f"{price_file}: no price for models {unpriced}")
    # one canonical order for every split (the price file's), so arm k means the same model everywhere
    models = [m for m in prices if m in seen]
    n, k = len(rows), len(models)
    scores = np.full((n, k), np.nan)
    costs = np.empty((n, k))
    for i, r in enumerate(rows):
        n_in = math.ceil(len(r["question"]) / LLMROUTER_CHARS_PER_TOKEN)
        for j, m in enumerate(models):
            v = r["scores"].get(m)
            if v is not None:
                scores[i, j] = float(v)
            p = prices[m]
            costs[i, j] = (n_in * p["input_price"] + LLMROUTER_OUTPUT_TOKENS * p["output_price"]) / 1e6
    return RoutingLog(
        name=f"llmrouter/{split}",
        prompt_ids=tuple(r["_id"] for r in rows),
        prompts=tuple(r["question"] for r in rows),
        models=tuple(models),
        scores=scores,
        costs=costs,
        tasks=tuple(f"cluster-{r.get('cluster_id')}" for r in rows),
        notes=(
            f"cost estimated: input tokens = ceil(chars/{LLMROUTER_CHARS_PER_TOKEN:g}), output tokens = "
            f"{LLMROUTER_OUTPUT_TOKENS}, priced with default_llm.json (USD per 1M tokens)",
        ),
    )


# ---------------------------------------------------------------------------------------------------------
# JSONL: a user's own logs
# ---------------------------------------------------------------------------------------------------------
def _jsonl_error(path: Path, lineno: int, msg: str) -> DataError:
    return DataError(f"{path}:{lineno}: {msg}")


def _number(path: Path, lineno: int, where: str, v, *, lo: float | None = None, hi: float | None = None):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _jsonl_error(path, lineno, f"{where} must be a finite number, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _jsonl_error(path, lineno, f"{where} must lie in [{lo}, {hi if hi is not None else 'inf'}], got {v}")
    return float(v)


def load_jsonl(path: str | Path, split: Split = "all", test_fraction: float = 0.3, seed: int = 0) -> RoutingLog:
    """One prompt per line:

        {"id": str, "prompt": str, "task": str?, "outcomes": {model: {"score": float in [0,1],
         "cost": float >= 0 (USD), "response": str?, "latency_s": float?}}}

    A model absent from a line's outcomes is a missing cell. Any malformed line raises a DataError naming
    the file and line number. `split` train/test is a seeded permutation with `test_fraction` held out.
    """
    _check_split(split)
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"--test-fraction must lie strictly between 0 and 1, got {test_fraction}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    records: list[tuple[str, str, str | None, dict]] = []
    models: list[str] = []
    seen_ids: set[str] = set()
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _jsonl_error(path, lineno, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _jsonl_error(path, lineno, f"not valid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise _jsonl_error(path, lineno, "each line must be a JSON object")
            pid, prompt, task, outcomes = obj.get("id"), obj.get("prompt"), obj.get("task"), obj.get("outcomes")
            if not isinstance(pid, str) or not pid:
                raise _jsonl_error(path, lineno, '"id" must be a non-empty string')
            if pid in seen_ids:
                raise _jsonl_error(path, lineno, f'duplicate "id" {pid!r}')
            seen_ids.add(pid)
            if not isinstance(prompt, str) or not prompt.strip():
                raise _jsonl_error(path, lineno, '"prompt" must be a non-empty string')
            if task is not None and not isinstance(task, str):
                raise _jsonl_error(path, lineno, '"task" must be a string when given')
            if not isinstance(outcomes, dict) or not outcomes:
                raise _jsonl_error(path, lineno, '"outcomes" must be a non-empty object {model: {...}}')
            parsed = {}
            for m, o in outcomes.items():
                if not isinstance(o, dict):
                    raise _jsonl_error(path, lineno, f"outcomes[{m!r}] must be an object")
                unknown = set(o) - {"score", "cost", "response", "latency_s"}
                if unknown:
                    raise _jsonl_error(path, lineno, f"outcomes[{m!r}] has unknown keys {sorted(unknown)}")
                if "score" not in o or "cost" not in o:
                    raise _jsonl_error(path, lineno, f'outcomes[{m!r}] needs "score" and "cost"')
                rec = {
                    "score": _number(path, lineno, f"outcomes[{m!r}].score", o["score"], lo=0.0, hi=1.0),
                    "cost": _number(path, lineno, f"outcomes[{m!r}].cost", o["cost"], lo=0.0),
                    "response": o.get("response"),
                    "latency_s": None,
                }
                if rec["response"] is not None and not isinstance(rec["response"], str):
                    raise _jsonl_error(path, lineno, f"outcomes[{m!r}].response must be a string")
                if o.get("latency_s") is not None:
                    rec["latency_s"] = _number(path, lineno, f"outcomes[{m!r}].latency_s", o["latency_s"], lo=0.0)
                parsed[m] = rec
                if m not in models:
                    models.append(m)
            records.append((pid, prompt, task, parsed))
    if not records:
        raise DataError(f"{path}: no records")
    n, k = len(records), len(models)
    scores, costs, lat = np.full((n, k), np.nan), np.full((n, k), np.nan), np.full((n, k), np.nan)
    responses = []
    for i, (_, _, _, parsed) in enumerate(records):
        row = []
        for j, m in enumerate(models):
            o = parsed.get(m)
            if o is not None:
                scores[i, j], costs[i, j] = o["score"], o["cost"]
                if o["latency_s"] is not None:
                    lat[i, j] = o["latency_s"]
            row.append(o["response"] if o else None)
        responses.append(tuple(row))
    log = RoutingLog(
        name=f"{path.stem}/{split}",
        prompt_ids=tuple(r[0] for r in records),
        prompts=tuple(r[1] for r in records),
        models=tuple(models),
        scores=scores,
        costs=costs,
        tasks=tuple(r[2] for r in records),
        responses=tuple(responses),
        latency_s=None if np.isnan(lat).all() else lat,
    )
    if split == "all":
        return log
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(test_fraction * n)))
    if n_test >= n:
        raise DataError(f"{path}: {n} records is too few to hold out a test fraction of {test_fraction}")
    idx = np.sort(perm[:n_test] if split == "test" else perm[n_test:])
    return log.subset(idx, name=f"{path.stem}/{split}")


def write_jsonl(log: RoutingLog, path: str | Path) -> Path:
    """Write a routing log in the documented JSONL format (missing cells are left out)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for i in range(len(log)):
            outcomes = {}
            for k, m in enumerate(log.models):
                if np.isnan(log.scores[i, k]) or np.isnan(log.costs[i, k]):
                    continue
                o = {"score": float(log.scores[i, k]), "cost": float(log.costs[i, k])}
                if log.responses is not None and log.responses[i][k] is not None:
                    o["response"] = log.responses[i][k]
                if log.latency_s is not None and np.isfinite(log.latency_s[i, k]):
                    o["latency_s"] = float(log.latency_s[i, k])
                outcomes[m] = o
            rec = {"id": log.prompt_ids[i], "prompt": log.prompts[i], "outcomes": outcomes}
            if log.tasks[i] is not None:
                rec["task"] = log.tasks[i]
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")


DATASETS = {"routerbench": load_routerbench, "llmrouter": load_llmrouter}


def load_dataset(
    dataset: str,
    split: Split = "train",
    *,
    data_dir: str | Path | None = None,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> RoutingLog:
    """`routerbench`, `llmrouter`, or a path to a JSONL file."""
    if dataset in DATASETS:
        return DATASETS[dataset](data_dir, split)
    if dataset.endswith(".jsonl") or Path(dataset).exists():
        return load_jsonl(dataset, split, test_fraction=test_fraction, seed=seed)
    raise DataError(f"unknown dataset {dataset!r}: use one of {sorted(DATASETS)} or a path to a .jsonl file")
