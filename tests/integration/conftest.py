from __future__ import annotations

import numpy as np
import pytest

POOL = ["claude-instant-v1", "gpt-3.5-turbo-1106", "gpt-4-1106-preview"]
"""The three-model RouterBench pool the live integration tests serve (replay backends)."""


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session, every socket on 127.0.0.1 (banditrouter.ray_local)."""
    import ray

    from banditrouter.ray_local import init_local_ray

    init_local_ray(num_cpus=4, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def prompts(data_dir):
    """Up to 200 short RouterBench test prompts with logged outcomes for POOL."""
    from banditrouter.data import load_dataset

    log = load_dataset("routerbench", "test").with_models(POOL)
    short = [i for i, p in enumerate(log.prompts) if len(p) < 400][:200]
    return log.subset(np.asarray(short))
