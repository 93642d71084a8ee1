from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session, every socket on 127.0.0.1 (banditrouter.ray_local)."""
    import ray

    from banditrouter.ray_local import init_local_ray

    init_local_ray(num_cpus=4, log_to_driver=False)
    yield ray
    ray.shutdown()
