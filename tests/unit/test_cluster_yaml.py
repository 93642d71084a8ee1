"""cluster.yaml passes Ray's own cluster-config validation and deploys a Serve config that validates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_ray_validates_cluster_yaml(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster))  # Ray's schema + its consistency checks; raises when invalid


def test_ray_rejects_a_broken_copy(cluster):
    """The validation above can fail: a worker type without node_config is refused."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = yaml.safe_load(yaml.safe_dump(cluster))
    del broken["available_node_types"]["worker.gpu.l4"]["node_config"]
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(broken))


def test_cluster_has_cpu_head_and_gpu_workers_with_the_gpu_extra(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert "GPU" not in head["resources"]
    gpu_workers = [t for n, t in types.items() if n != cluster["head_node_type"] and t["resources"].get("GPU", 0) > 0]
    assert gpu_workers and cluster["provider"]["type"] in {"aws", "gcp", "azure"}
    setup = " ".join(cluster["setup_commands"])
    assert "[serve,train,gpu]" in setup and "torch==2.13.0" in setup


def test_head_deploys_a_serve_config_whose_app_config_validates(cluster):
    from banditrouter.config import load_config

    deploy = [c for c in cluster["head_start_ray_commands"] if "serve deploy" in c]
    assert len(deploy) == 1
    serve_cfg_path = ROOT / deploy[0].split("serve deploy")[1].split()[0]
    serve_cfg = yaml.safe_load(serve_cfg_path.read_text())
    (app,) = serve_cfg["applications"]
    assert app["import_path"] == "deployments.app:app_builder"
    cfg = load_config(ROOT / app["args"]["config"])
    assert any(m.backend == "vllm" for m in cfg.models) and cfg.server.host == "0.0.0.0"
    # the GPU workers offer the accelerator types the vLLM models ask for
    offered = {k.split(":", 1)[1] for t in cluster["available_node_types"].values() for k in t["resources"] if ":" in k}
    assert {m.vllm.accelerator_type for m in cfg.models if m.backend == "vllm"} <= offered


def test_serve_config_files_validate_with_serve_schema():
    from ray.serve.schema import ServeDeploySchema

    for name in ("serve.yaml", "serve-cluster.yaml"):
        ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "configs" / name).read_text()))


def test_cluster_serves_with_api_keys_exported_on_every_node(cluster):
    """The cluster binds 0.0.0.0, so its app config needs keys; the variable it names is exported (from the synced
    key store) in the same shell as `ray start` on the head and on every worker, so Ray's workers inherit it."""
    from banditrouter.config import load_config

    cfg = load_config(ROOT / "configs" / "cluster.yaml")
    auth = cfg.gateway.auth
    assert auth.mode == "keys" and auth.keys_env
    for section in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in cluster[section] if "ray start" in c]
        export = f'export {auth.keys_env}="$(cat ~/banditrouter/keys.yaml)"'
        assert export in start and start.index(export) < start.index("ray start"), section
        assert "test -s ~/banditrouter/keys.yaml ||" in start, section  # no keys: the node does not start
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" not in head_start  # the job API runs code and has no auth


def test_cluster_config_without_keys_is_refused(cluster):
    """The same app config with auth off is refused, naming how to add a key."""
    import yaml

    from banditrouter.config import ConfigError, load_config

    raw = yaml.safe_load((ROOT / "configs" / "cluster.yaml").read_text())
    del raw["gateway"]
    with pytest.raises(ConfigError, match="banditrouter keys create"):
        load_config(raw, base_dir=ROOT / "configs")
