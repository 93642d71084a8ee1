"""Start a local Ray whose every socket is on 127.0.0.1 (CLI `serve`, tests).

Ray picks the machine's routable address for a local node unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
which makes it use the loopback address (ray._private.services.get_node_ip_address). The variable is read
into a constant when ray is imported, so we set it for the workers (they inherit the environment) and
patch the constant in this process in case ray was imported already.
"""

from __future__ import annotations

import os


def init_local_ray(num_cpus: int | None = None, dashboard: bool = False, **kwargs):
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    return ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        configure_logging=False,
        **kwargs,
    )
