"""Run by test_multinode.py in its own process (it needs its own Ray): a two-node local cluster
(ray.cluster_utils.Cluster, both nodes on 127.0.0.1), the app deployed across it, routed requests sent.
Prints one JSON line: the node each Serve replica landed on, and the status codes of the requests."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from ray._private import ray_constants  # noqa: E402

ray_constants.ENABLE_RAY_CLUSTER = False


def main(port: int, workdir: Path) -> None:
    import requests
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from banditrouter.config import load_config
    from banditrouter.policies import save_checkpoint
    from banditrouter.policies.static import RandomPolicy
    from deployments.app import build_app

    pool = ["claude-instant-v1", "gpt-3.5-turbo-1106", "mistralai/mistral-7b-chat"]
    ckpt = save_checkpoint(RandomPolicy(tuple(pool), context_dim=384, tau=1e-3), workdir / "random.pt")
    cfg = load_config(
        {
            "policy": {"name": "random", "checkpoint": str(ckpt)},
            "embedder": {"ray_actor_options": {"num_cpus": 0.5}},
            "router": {"ray_actor_options": {"num_cpus": 0.1}},
            "models": [
                {"name": m, "replay": {"split": "test"}, "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.1}} for m in pool
            ],
        }
    )
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1"})
    cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
        serve.run(build_app(cfg), name="banditrouter", route_prefix="/")
        from banditrouter.data import load_dataset

        logged = load_dataset("routerbench", "test").prompts[:12]  # replay answers logged prompts exactly
        codes = []
        for i in range(12):
            body = {"model": "router", "messages": [{"role": "user", "content": logged[i]}]}
            codes.append(requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60).status_code)
        replicas = [
            {"deployment": a.class_name.split(":", 2)[-1], "node": a.node_id}  # ServeReplica:app:deployment
            for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            if a.class_name.startswith("ServeReplica")
        ]
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        print("RESULT " + json.dumps({"nodes": nodes, "replicas": replicas, "codes": codes}), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
