from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from banditrouter.data import resolve_data_dir


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = resolve_data_dir()
    if not (d / "routerbench").is_dir():
        pytest.skip(f"routing data not found at {d}; set BANDITROUTER_DATA_DIR")
    return d


@pytest.fixture(scope="session")
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def write_jsonl(path: Path, log, n: int | None = None) -> Path:
    """Write a RoutingLog (or its first n prompts) in the documented JSONL format."""
    with path.open("w") as fh:
        for i in range(len(log) if n is None else min(n, len(log))):
            outcomes = {}
            for k, m in enumerate(log.models):
                if np.isnan(log.scores[i, k]):
                    continue
                o = {"score": float(log.scores[i, k]), "cost": float(log.costs[i, k])}
                if log.responses is not None and log.responses[i][k] is not None:
                    o["response"] = log.responses[i][k]
                outcomes[m] = o
            fh.write(json.dumps({"id": log.prompt_ids[i], "prompt": log.prompts[i], "task": log.tasks[i], "outcomes": outcomes}) + "\n")
    return path
