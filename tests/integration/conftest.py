from __future__ import annotations

import numpy as np
import pytest

POOL = ["claude-instant-v1", "gpt-3.5-turbo-1106", "gpt-4-1106-preview"]
"""The three-model RouterBench pool the live integration tests serve (replay backends)."""


@pytest.fixture(scope="module")
def prompts(data_dir):
    """Up to 200 short RouterBench test prompts with logged outcomes for POOL."""
    from banditrouter.data import load_dataset

    log = load_dataset("routerbench", "test").with_models(POOL)
    short = [i for i, p in enumerate(log.prompts) if len(p) < 400][:200]
    return log.subset(np.asarray(short))
