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


def serve_online_linucb(tmp, prompts, port: int, app: str, *, fused: bool = False, handles_on_loop: bool = False):
    """A generator for a module fixture: LinUCB over POOL (replay backends) learning online with small learner
    batches, two router replicas (`fused`: inside the two ingress replicas; `handles_on_loop`: their Serve handles
    route on the replica's loop), served at 127.0.0.1:`port`;
    yields the config, then deletes the app, stops Serve and the learner actors."""
    from ray import serve

    from banditrouter.config import load_config
    from banditrouter.policies import make_policy, save_checkpoint
    from deployments.app import build_app
    from learner.actors import kill_actors

    ckpt = save_checkpoint(make_policy("linucb", POOL, 384, tau=float(np.nanquantile(prompts.costs, 0.95))), tmp / "linucb.pt")
    cfg = load_config(
        {
            "policy": {"name": "linucb", "checkpoint": str(ckpt), "explore": True},
            "embedder": {"ray_actor_options": {"num_cpus": 0.5}},
            "router": {
                "fused": fused,
                "handles_on_loop": handles_on_loop,
                "num_replicas": 2,
                "ray_actor_options": {"num_cpus": 0.1},
            },
            "learning": {"enabled": True, "state_dir": str(tmp / "state"), "batch_size": 4, "max_wait_s": 0.2},
            "models": [{"name": m, "replay": {"split": "test"}} for m in POOL],
        }
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=app, route_prefix="/")
    yield cfg
    serve.delete(app)
    serve.shutdown()  # the next module starts Serve on its own port
    kill_actors()


def vendored_psutil():
    """Ray's vendored psutil (importing ray puts it on sys.path)."""
    import importlib

    import ray  # noqa: F401

    return importlib.import_module("psutil")


def listening_sockets(root_pid: int) -> dict[str, set[str]]:
    """Listening TCP sockets of `root_pid`'s recursive children (a Ray it started): name -> {"ip:port"}."""
    psutil = vendored_psutil()

    out: dict[str, set[str]] = {}
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            name = " ".join(p.cmdline())[:80] or p.name()
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                out.setdefault(name, set()).add(f"{c.laddr.ip}:{c.laddr.port}")
    return out


def beyond_loopback(listeners: dict[str, set[str]]) -> dict[str, list[str]]:
    """The listeners (of `listening_sockets`) on an address other than loopback, by process."""

    def loopback(addr: str) -> bool:
        ip = addr.rsplit(":", 1)[0].removeprefix("::ffff:")  # an IPv4-mapped address on a dual-stack socket
        return ip.startswith("127.") or ip == "::1"

    wild = {name: sorted(a for a in addrs if not loopback(a)) for name, addrs in listeners.items()}
    return {name: addrs for name, addrs in wild.items() if addrs}
