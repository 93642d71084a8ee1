"""One builder turns a validated config into the Serve application. `serve run`, `serve deploy`,
`banditrouter serve` and the tests all start the app through `build_app` (or `app_builder`, its form for
Serve config files: `import_path: deployments.app:app_builder`, `args: {config: configs/local.yaml}`)."""

from __future__ import annotations

import logging
import os
from typing import Any

from ray.serve import Application

from banditrouter.config import AppConfig, load_config
from banditrouter.ray_local import HAPROXY_ENV

log = logging.getLogger(__name__)


def _options(
    cfg: AppConfig,
    num_replicas: int,
    autoscaling: dict | None,
    actor_options: dict,
    max_ongoing: int,
    max_queued: int | None = None,
) -> dict[str, Any]:
    """Serve options of one deployment. `max_queued`: Serve's `max_queued_requests` (requests waiting in a
    caller's handle for a replica with a free slot), with `backpressure_config.retry_after_s` so the 503 Serve
    answers beyond it carries Retry-After; None leaves Serve's default (unbounded)."""
    opts: dict[str, Any] = {
        "ray_actor_options": dict(actor_options),
        "max_ongoing_requests": max_ongoing,
        "logging_config": {"enable_access_log": cfg.server.access_log, "log_level": cfg.server.log_level},
        "max_surge_percent": cfg.server.rolling_surge_percent,  # old replicas serve until the new ones are up
    }
    if max_queued is not None and max_queued != -1:
        opts["max_queued_requests"] = max_queued
        opts["backpressure_config"] = {"status_code": 503, "retry_after_s": cfg.router.backpressure_retry_after_s}
    if autoscaling:
        opts["autoscaling_config"] = dict(autoscaling)
    else:
        opts["num_replicas"] = num_replicas
    return opts


def _llm_server(m) -> tuple:
    """For a vllm model, its ray.serve.llm LLMServer deployment (bound into this app); nothing otherwise."""
    if m.backend != "vllm":
        return ()
    from deployments.backends.vllm import build_llm_app

    return (build_llm_app(m),)


def build_app(cfg: AppConfig) -> Application:
    from deployments.embedder import EmbedderDeployment
    from deployments.ingress import Ingress
    from deployments.model import ModelDeployment
    from deployments.router import Router

    if cfg.server.proxy == "haproxy" and os.environ.get(HAPROXY_ENV) != "1":
        log.warning(
            "server.proxy is haproxy, but this process's environment lacks RAY_SERVE_ENABLE_HA_PROXY=1: the proxy is"
            " whatever the Ray it deploys to started with (`banditrouter serve` sets it; for `serve run`, put it in"
            " front of the command; for a cluster, in the environment of `ray start`). GET /health says which."
        )
    models = {
        m.name: ModelDeployment.options(
            name=f"model:{m.name}",
            **_options(cfg, m.num_replicas, m.autoscaling_config, m.ray_actor_options, m.max_ongoing_requests),
        ).bind(m, *_llm_server(m))
        for m in cfg.models
    }
    e = cfg.embedder
    embedder = EmbedderDeployment.options(
        **_options(cfg, e.num_replicas, None, e.ray_actor_options, e.max_ongoing_requests)
    ).bind(e)
    r = cfg.router
    # Bounded queues upstream of admission. The ingress takes max_queued_requests more requests at once than
    # the router, so under overload the queue that fills first is the ingress's handle to the router: Serve
    # raises BackPressureError there and the ingress answers its JSON 503 + Retry-After. Only past that does
    # Serve refuse (its own 503: plain text, with Retry-After from backpressure_config; from the proxy, or with
    # server.proxy: haproxy from the ingress replica's own HTTP server).
    queued = r.max_queued_requests
    if r.fused:
        # router.fused: the router runs in the ingress replica (one hop fewer). The ingress takes the router's
        # actor options and slots; past max_queued_requests Serve answers its 503 + Retry-After (see above).
        opts = _options(cfg, r.num_replicas, None, r.ray_actor_options, r.max_ongoing_requests, queued)
        return Ingress.options(**opts).bind(cfg, None, models, embedder)
    router = Router.options(**_options(cfg, r.num_replicas, None, r.ray_actor_options, r.max_ongoing_requests, queued)).bind(
        cfg, embedder, models
    )
    ingress_ongoing = r.max_ongoing_requests + max(0, queued)
    return Ingress.options(**_options(cfg, r.num_replicas, None, {"num_cpus": 0}, ingress_ongoing, queued)).bind(
        cfg, router, models
    )


def app_builder(args: dict[str, Any]) -> Application:
    """For Serve config files and `serve run deployments.app:app_builder config=configs/local.yaml`."""
    if "config" not in args:
        raise ValueError("app_builder needs args {config: path/to/config.yaml}")
    return build_app(load_config(args["config"]))
