from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from banditrouter.data import resolve_data_dir


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = resolve_data_dir()
    if not (d / "routerbench").is_dir():
        msg = f"routing data not found at {d}; set BANDITROUTER_DATA_DIR"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI must run the data tests, not skip them)")
        pytest.skip(msg)
    return d


@pytest.fixture(scope="session")
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def wait_for(pred, timeout_s: float = 30.0, every_s: float = 0.2):
    """Poll `pred` until it returns something truthy (returned) or `timeout_s` passes (its last value)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(every_s)
    return pred()


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (bound, then released): nothing listens there."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jsonl(path: Path, log, n: int | None = None) -> Path:
    """Write a RoutingLog (or its first n prompts) in the documented JSONL format."""
    from banditrouter.data.loaders import write_jsonl as _write

    return _write(log if n is None else log.head(n), path)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole test session (tests/chaos and tests/integration share it: a process
    holds one Ray), every socket on 127.0.0.1 (banditrouter.ray_local). 8 logical CPUs: the chaos apps run
    about a dozen replicas at fractional CPUs."""
    import ray

    from banditrouter.ray_local import init_local_ray

    init_local_ray(num_cpus=8, log_to_driver=False)
    yield ray
    ray.shutdown()
