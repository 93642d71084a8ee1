"""`banditrouter` command line: train, eval, data fetch."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="banditrouter: LLM routing that learns from bandit feedback.", no_args_is_help=True, add_completion=False)
data_app = typer.Typer(help="Routing datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
keys_app = typer.Typer(help="API keys for the gateway (the key store keeps hashes only).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
console = Console(stderr=True)

DatasetOpt = typer.Option("routerbench", "--dataset", "-d", help="routerbench, llmrouter, or a path to a JSONL log.")
DataDirOpt = typer.Option(
    None,
    "--data-dir",
    envvar="BANDITROUTER_DATA_DIR",
    help="Folder holding routerbench/ and llmrouter/ (default: ../shared/data when it exists).",
)
TestFracOpt = typer.Option(0.3, "--test-fraction", help="Held-out fraction when the dataset is a JSONL file.")
SamplerOpt = typer.Option(
    "arcsine", "--preference-sampler", help="How training draws w_cost: arcsine (Beta(1/2,1/2)) or uniform."
)
TauOpt = typer.Option(0.95, "--tau-quantile", help="tau = this quantile of per-call cost in the training log.")
FeaturesOpt = typer.Option(
    "none",
    "--features",
    help="Context features: none (the MiniLM embedding) or projection (a 384->--features-dim projection trained "
    "contrastively on the train split with every model's outcome: full information, see banditrouter/features.py).",
)
FeaturesDimOpt = typer.Option(64, "--features-dim", min=1, help="Output width of --features projection.")


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}", soft_wrap=True)
    raise typer.Exit(2)


def _warm_replay(cfg, config: Path) -> None:
    """The replay models' nearest-prompt indexes into the embedding cache, once here before deploying, not in
    every replay replica at its first unlogged prompt; a model its log cannot replay fails here, before that."""
    from deployments.backends import BackendError
    from deployments.backends.replay import warm_replay_indexes

    try:
        n = warm_replay_indexes(cfg.models)
    except (BackendError, FileNotFoundError, ValueError) as e:
        _fail(f"{config}: {e}")
    if n:
        console.print(f"embedded {n} logged prompts for the replay models' nearest-prompt indexes (cached from now on)")


@app.command()
def train(
    dataset: str = DatasetOpt,
    policy: str = typer.Option("barp", "--policy", "-p", help="Policy to train (see `banditrouter eval --help`)."),
    out: Path = typer.Option(Path("checkpoints/barp.pt"), "--out", "-o", help="Checkpoint path to write."),
    split: str = typer.Option("train", "--split"),
    seed: int = typer.Option(0, "--seed"),
    epochs: int | None = typer.Option(None, "--epochs", help="Passes over the split (default per policy)."),
    limit: int | None = typer.Option(None, "--limit", help="Use a seeded sample of this many prompts."),
    tau_quantile: float = TauOpt,
    preference_sampler: str = SamplerOpt,
    data_dir: Path | None = DataDirOpt,
    test_fraction: float = TestFracOpt,
    features: str = FeaturesOpt,
    features_dim: int = FeaturesDimOpt,
    option: list[str] = typer.Option(
        [], "--option", "-O", help="A policy config field, KEY=VALUE (repeatable), e.g. -O c=0.5 -O update_rule=irls."
    ),
):
    """Train one policy on a split (bandit feedback; full information for `supervised`) and save it."""
    import yaml

    from banditrouter.data import DataError
    from banditrouter.pipeline import run_train

    options = {}
    for item in option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            _fail(f"--option expects KEY=VALUE, got {item!r}")
        options[key.strip()] = yaml.safe_load(value)
    try:
        pol = run_train(
            dataset,
            policy,
            out,
            split=split,
            seed=seed,
            data_dir=data_dir,
            test_fraction=test_fraction,
            limit=limit,
            epochs=epochs,
            tau_quantile=tau_quantile,
            preference_sampler=preference_sampler,
            features=features,
            features_dim=features_dim,
            options=options,
            log_fn=console.print,
        )
    except (DataError, ValueError, TypeError) as e:  # TypeError: a config field the policy does not have
        _fail(str(e))
    console.print(f"[green]saved[/] {pol.name} (version {pol.version}, tau={pol.tau:.3g}) to {out}")


@app.command("eval")
def evaluate(
    dataset: str = DatasetOpt,
    split: str = typer.Option("test", "--split", help="Split to evaluate on."),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("reports/routerbench"), "--out", "-o", help="Folder for results.json and the figures."),
    checkpoint: list[Path] = typer.Option(
        [], "--checkpoint", "-c", help="Evaluate these checkpoints instead of training (repeatable)."
    ),
    policies: str = typer.Option(
        ",".join(["barp", "supervised", "linucb", "lints", "epsilon_greedy", "best_single", "cheapest", "random"]),
        "--policies",
        help="Comma-separated policies to train and evaluate.",
    ),
    epochs: int | None = typer.Option(None, "--epochs", help="Override every policy's epochs (smoke runs)."),
    limit_train: int | None = typer.Option(None, "--limit-train", help="Seeded sample of the train split."),
    limit_test: int | None = typer.Option(None, "--limit-test", help="Seeded sample of the test split."),
    tau_quantile: float = TauOpt,
    preference_sampler: str = SamplerOpt,
    data_dir: Path | None = DataDirOpt,
    test_fraction: float = TestFracOpt,
    features: str = FeaturesOpt,
    features_dim: int = FeaturesDimOpt,
):
    """Train every policy on the train split, evaluate on the test split over w_cost = 0..1, write
    results.json, pareto.png and preference_sweep.png."""
    from banditrouter.data import DataError
    from banditrouter.pipeline import run_eval
    from banditrouter.policies import StateError

    names = [p.strip() for p in policies.split(",") if p.strip()]
    try:
        res = run_eval(
            dataset,
            out,
            split=split,
            seed=seed,
            policies=names,
            checkpoints=checkpoint,
            data_dir=data_dir,
            test_fraction=test_fraction,
            limit_train=limit_train,
            limit_test=limit_test,
            epochs=epochs,
            tau_quantile=tau_quantile,
            preference_sampler=preference_sampler,
            features=features,
            features_dim=features_dim,
            log_fn=console.print,
        )
    except (DataError, ValueError, StateError, FileNotFoundError) as e:
        _fail(str(e))
    table = Table(title=f"{res['dataset']} {res['split']} (n={res['n_test']}, tau={res['tau']:.3g})")
    for col in ("policy", "AIQ", "mean reward", "acc @w_c=0", "cost @w_c=0", "acc @w_c=0.5", "cost @w_c=0.5"):
        table.add_column(col, justify="right")
    for name, pol in sorted(res["policies"].items(), key=lambda kv: -kv[1]["aiq"]):
        p0 = next(p for p in pol["points"] if p["w_cost"] == 0.0)
        p5 = next(p for p in pol["points"] if p["w_cost"] == 0.5)
        table.add_row(
            name,
            f"{pol['aiq']:.4f}",
            f"{pol['mean_reward']:.4f}",
            f"{p0['accuracy']:.3f}",
            f"{p0['cost']:.2e}",
            f"{p5['accuracy']:.3f}",
            f"{p5['cost']:.2e}",
        )
    Console().print(table)
    o = res["references"]["oracle"]
    console.print(
        f"oracle: accuracy {o['accuracy']:.3f} at ${o['cost']:.2e}/query; "
        f"wrote {out}/results.json, pareto.png, preference_sweep.png"
    )


@app.command()
def serve(
    config: Path = typer.Option(Path("configs/local.yaml"), "--config", "-c", help="banditrouter YAML config."),
    pretrain: bool = typer.Option(True, help="Train the policy first when its checkpoint is missing."),
    state_dir: Path | None = typer.Option(
        None, "--state-dir", help="Override learning.state_dir (event log, learner commits): a fresh folder is a fresh run."
    ),
):
    """Start a local Ray on 127.0.0.1, deploy the app, print its URLs; Ctrl-C / SIGTERM stops everything."""
    import signal
    import threading

    from banditrouter.config import ConfigError, load_config

    try:
        cfg = load_config(config)
    except ConfigError as e:
        _fail(str(e))
    if state_dir is not None:
        cfg = cfg.model_copy(update={"learning": cfg.learning.model_copy(update={"state_dir": state_dir.resolve()})})
    ckpt = cfg.policy.checkpoint
    if not ckpt.exists():
        datasets = {(m.replay.dataset, m.replay.data_dir) for m in cfg.models if m.backend == "replay"}
        if not pretrain or len(datasets) != 1 or any(m.backend != "replay" for m in cfg.models):
            _fail(f"no checkpoint at {ckpt}; train one with `banditrouter train --policy {cfg.policy.name} --out {ckpt}`")
        from banditrouter.pipeline import run_train

        ((dataset, data_dir),) = datasets
        console.print(f"no checkpoint at {ckpt}: pretraining {cfg.policy.name} on {dataset} (train split)")
        run_train(dataset, cfg.policy.name, ckpt, data_dir=data_dir)

    import os

    import ray
    from ray import serve as ray_serve

    from banditrouter.ray_local import init_local_ray
    from deployments.app import build_app
    from deployments.gateway.errors import proxy_environment

    for k, v in proxy_environment(cfg.gateway.limits).items():  # Serve's proxy replaces over-long x-request-ids
        os.environ.setdefault(k, v)
    _warm_replay(cfg, config)
    ctx = init_local_ray(dashboard=True, proxy=cfg.server.proxy)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        ray_serve.start(http_options={"host": cfg.server.host, "port": cfg.server.port})
        ray_serve.run(build_app(cfg), name="banditrouter", route_prefix="/", blocking=False)
        url = f"http://{cfg.server.host}:{cfg.server.port}"
        console.print(
            f"[green]serving[/] {url}/v1 (OpenAI-compatible; model 'router' routes)  dashboard: http://{ctx.dashboard_url}"
        )
        console.print("Ctrl-C to stop")
        stop.wait()
    finally:
        console.print("stopping")
        ray_serve.shutdown()
        if cfg.learning.enabled:
            from learner.actors import kill_actors

            kill_actors()
        ray.shutdown()


@app.command()
def bench(
    config: Path = typer.Option(Path("configs/local.yaml"), "--config", "-c", help="banditrouter YAML config."),
    requests: int = typer.Option(
        2000, "--requests", "-n", min=1, help="Routed requests to send, cycling over the test split's prompts (RouterBench: 952)."
    ),
    concurrency: int = typer.Option(16, "--concurrency", min=1, help="Concurrent HTTP clients."),
    out: Path = typer.Option(Path("reports/bench.json"), "--out", "-o", help="Where to write the JSON."),
    seed: int = typer.Option(0, "--seed"),
    prompt_chars: int | None = typer.Option(
        None, "--prompt-chars", min=1, help="Cut each prompt to this many characters (stresses the serving path)."
    ),
    unloaded: int = typer.Option(
        200, "--unloaded", min=0, help="Then send this many one at a time (unloaded latency); 0 skips it."
    ),
    suite: bool = typer.Option(
        False,
        "--suite",
        help="Every target in one run: 200-char and full prompts (--requests for the short run, half for the full "
        "one), unloaded latency, the learner's absorb rate; prints the ratios (`make bench`).",
    ),
    learner_config: Path = typer.Option(
        Path("configs/online.yaml"), "--learner-config", help="With --suite: the learning settings the learner bench uses."
    ),
):
    """Raw embedder throughput vs routed end-to-end throughput and latency on the same prompts (prints JSON).

    The raw half runs in this process on the embedder's backend and device (`embedder_device` in the JSON)."""
    import json

    from banditrouter.bench import run_bench, run_suite
    from banditrouter.config import ConfigError, load_config

    try:
        cfg = load_config(config)
    except ConfigError as e:
        _fail(str(e))
    if not cfg.policy.checkpoint.exists():
        _fail(f"no checkpoint at {cfg.policy.checkpoint}; run `banditrouter serve` once or `banditrouter train` first")
    _warm_replay(cfg, config)  # before the raw half, so a config that cannot replay fails first
    if suite:
        try:
            lcfg = load_config(learner_config)
        except ConfigError as e:
            _fail(str(e))
        result = run_suite(
            cfg,
            out,
            learner_config=lcfg,
            short_requests=requests,
            full_requests=max(1, requests // 2),
            concurrency=concurrency,
            unloaded=unloaded,
            seed=seed,
        )
        print(json.dumps({"summary": result["summary"], "targets": result["targets"], "met": result["met"]}, indent=2))
        return
    result = run_bench(cfg, requests, concurrency, out, seed, prompt_chars, unloaded=unloaded)
    print(json.dumps(result, indent=2))


@app.command()
def simulate(
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="A running banditrouter with learning enabled."),
    dataset: str = DatasetOpt,
    split: str = typer.Option("train", "--split"),
    requests: int = typer.Option(3000, "--requests", "-n", min=1, help="Original requests (re-sends come on top)."),
    concurrency: int = typer.Option(8, "--concurrency", min=1, help="Closed loop: concurrent users (ignored with --rate)."),
    rate: float | None = typer.Option(
        None,
        "--rate",
        help="Open loop: Poisson arrivals at this many requests/s, whatever the service does (a backlog can form).",
    ),
    out: Path = typer.Option(Path("reports/online"), "--out", "-o", help="Folder for online.json and online.png."),
    retrials: bool = typer.Option(
        False,
        "--retrials",
        help="Unsatisfied users retry. Closed loop: with probability logistic in the score. Open loop (--rate): "
        "satisfied with probability = the logged score (Bernoulli); else (or on 503 / no answer) they re-send the "
        "same conversation after --retry-delay, up to --max-retries times.",
    ),
    feedback: bool | None = typer.Option(
        None,
        "--feedback/--no-feedback",
        help="Post the logged score as explicit feedback. Default: yes, except with --rate and --retrials (implicit only).",
    ),
    max_retries: int = typer.Option(3, "--max-retries", min=0, help="Open loop: re-sends per request at most."),
    retry_delay: str = typer.Option(
        "0.5,2.0", "--retry-delay", help="Open loop: a re-send comes after U(low, high) seconds (inside the retrial window)."
    ),
    patience: float = typer.Option(30.0, "--patience", help="Open loop: no answer within this many seconds = unsatisfied."),
    w_cost: float | None = typer.Option(
        None, "--w-cost", help="Send this w_cost (and w_quality = 1 - w_cost) with every request instead of drawing one."
    ),
    cold_start: bool = typer.Option(False, "--cold-start", help="Reset the learner to an untrained policy first."),
    seed: int = typer.Option(0, "--seed"),
    preference_sampler: str = typer.Option("uniform", "--preference-sampler", help="uniform or arcsine draws of w_cost."),
    data_dir: Path | None = DataDirOpt,
):
    """Closed loop through the HTTP API (routed requests, bandit feedback, learning curves), or with --rate an
    open loop of Poisson arrivals whose simulated users re-send what did not satisfy them."""
    from banditrouter.data import DataError
    from banditrouter.simulate import RetrialUsers, SimulationError, run_open_loop, run_simulation

    try:
        if rate is not None:
            try:
                lo, hi = (float(v) for v in retry_delay.split(","))
            except ValueError:
                _fail(f"--retry-delay must be two numbers 'low,high' (seconds), got {retry_delay!r}")
            users = RetrialUsers(max_retries=max_retries, delay_s=(lo, hi), patience_s=patience)
            res = run_open_loop(
                url, dataset, split, requests, rate, out, retrials=retrials, feedback=feedback, cold_start=cold_start,
                seed=seed, sampler=preference_sampler, w_cost=w_cost, users=users, data_dir=data_dir,
            )  # fmt: skip
            keys = ("attempts", "status_503", "retrial_rate_first_500", "retrial_rate_last_500", "queue_length_max",
                    "staleness_p95_s", "checkpoint")  # fmt: skip
        else:
            if w_cost is not None:
                _fail("--w-cost is for the open loop (--rate); the closed loop draws preferences with --preference-sampler")
            res = run_simulation(
                url, dataset, split, requests, concurrency, out, retrials=retrials, cold_start=cold_start, seed=seed,
                sampler=preference_sampler, data_dir=data_dir, feedback=True if feedback is None else feedback,
            )  # fmt: skip
            keys = ("completed", "failed_fraction", "mean_reward", "staleness_p95_s", "checkpoint")
    except (DataError, SimulationError) as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot reach {url}: {e}")
    console.print({k: res[k] for k in keys})
    console.print(f"wrote {out / 'online.json'} and {out / 'online.png'}")


@app.command("queue-eval")
def queue_eval(
    dataset: str = DatasetOpt,
    load: float = typer.Option(
        0.9, "--load", help="rho = lambda / mu_sat, mu_sat = departures/step of the theta*-oracle with a saturated queue."
    ),
    steps: int = typer.Option(20000, "--steps", min=4, help="Steps per (policy, seed) run."),
    seeds: str = typer.Option("0-4", "--seeds", help="Seeds: a range '0-4' or a list '0,2,7'."),
    out: Path = typer.Option(Path("reports/queue"), "--out", "-o", help="Folder for queue.json, checks.json and the figures."),
    satisfaction: str = typer.Option("logged", "--satisfaction", help="logged (the logged scores) or logistic (mu(z^T theta*))."),
    policies: str = typer.Option(
        "acqb,acqb_ts,linucb,barp,greedy,random,random_pool,oracle",
        "--policies",
        help="Comma-separated, from acqb, acqb_ts, acqb_eps, linucb, barp, greedy, random, random_pool, oracle, clairvoyant.",
    ),
    features: str = typer.Option(
        "projection",
        "--features",
        help="projection (default: ACQB on raw 384-d embeddings is ~30x slower per update) or none. The projection is "
        "trained on the train split with every model's outcome (full information; banditrouter/features.py).",
    ),
    features_dim: int = FeaturesDimOpt,
    contexts: str = typer.Option("test", "--contexts", help="Which split's prompts arrive as jobs: test, train or all."),
    capacity: str = typer.Option("1", "--capacity", help="Jobs per step per model: one integer, or one per model (a,b,...)."),
    arrivals: str = typer.Option("poisson", "--arrivals", help="poisson or bernoulli (lambda <= 1)."),
    p_retry: float | None = typer.Option(
        None, "--p-retry", min=0.0, max=1.0, help="P(an unsatisfied user retries); default 0.5 (envs/queueing.py)."
    ),
    preference: str = typer.Option("1,0", "--preference", help="w_quality,w_cost for every job (default quality only)."),
    update_batch: int = typer.Option(64, "--update-batch", min=1, help="Samples per policy update."),
    window: int = typer.Option(256, "--window", min=1, help="Queue-aware policies see the oldest this many waiting jobs."),
    workers: int = typer.Option(2, "--workers", min=1, help="Parallel processes, one (policy, seed) run each."),
    data_dir: Path | None = DataDirOpt,
):
    """Policies in the queueing env (envs/queueing.py) learning from retrials only: ACQB schedules one pool,
    the others route at arrival into per-model FIFO queues; writes queue.json, checks.json, queue_length.png
    and regret.png."""
    from banditrouter.data import DataError
    from banditrouter.evaluation.queue import parse_seeds, run_queue_eval
    from banditrouter.policies import StateError
    from envs.queueing import DEFAULT_P_RETRY

    try:
        cap = [int(c) for c in capacity.split(",")]
        pref = [float(w) for w in preference.split(",")]
    except ValueError:
        _fail(f"--capacity takes integers and --preference two numbers, got {capacity!r} and {preference!r}")
    try:
        res = run_queue_eval(
            dataset,
            out,
            load=load,
            steps=steps,
            seeds=parse_seeds(seeds),
            satisfaction=satisfaction,
            policies=[p.strip() for p in policies.split(",") if p.strip()],
            features=features,
            features_dim=features_dim,
            contexts=contexts,
            capacity=cap[0] if len(cap) == 1 else cap,
            arrivals=arrivals,
            p_retry=DEFAULT_P_RETRY if p_retry is None else p_retry,
            preference=pref,
            update_batch=update_batch,
            window=window,
            workers=workers,
            data_dir=data_dir,
            log_fn=console.print,
        )
    except (DataError, ValueError, StateError, FileNotFoundError) as e:
        _fail(str(e))
    r = res.results
    title = f"{r['dataset']} queue-eval: {r['satisfaction']}, load {r['load']}, {r['steps']} steps, seeds {r['seeds']}"
    table = Table(title=title)
    for col in ("policy", "avg Q", "final Q", "retrial", "abandon", "satisfied", "cost/service", "routing regret"):
        table.add_column(col, justify="right")
    for name, p in r["policies"].items():
        table.add_row(
            name,
            f"{p['time_avg_queue_length']:.1f}",
            f"{p['final_queue_length']:.1f}",
            f"{p['retrial_rate']:.3f}",
            f"{p['abandon_rate']:.3f}",
            f"{p['satisfaction']:.3f}",
            f"{p['cost']:.2e}",
            f"{p['regret'][-1][1]:.1f}",
        )
    Console().print(table)
    c = res.checks
    if "queue_vs_best_baseline" in c:
        q = c["queue_vs_best_baseline"]
        console.print(f"acqb avg queue / best baseline's ({q['best_baseline']}): {q['ratio']:.3f} (target <= 0.8)")
    if "acqb" in c.get("queue_regret_quarters", {}):
        q = c["queue_regret_quarters"]["acqb"]
        ratio = "n/a (no excess over the oracle in the first quarter)" if q["ratio"] is None else f"{q['ratio']:.3f}"
        console.print(
            f"acqb queue-length regret, last/first quarter: {q['last']:.2f} / {q['first']:.2f} = {ratio} (target <= 0.5): "
            + ("met" if q["met"] else "not met")
        )
    slopes = {k: v for k, v in c["slope_second_half"].items() if k.startswith("acqb")}
    if slopes:
        shown = ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in slopes.items())
        console.print(f"routing regret log-log slope over the second half: {shown}")
    console.print(f"wrote {out}/queue.json, checks.json, queue_length.png, regret.png in {res.seconds:.0f}s")


@app.command("budget-eval")
def budget_eval(
    dataset: str = DatasetOpt,
    budgets: str = typer.Option(
        "0.1,0.25,0.5,1.0", "--budgets", help="Budgets as fractions of the reference model's spend alone over the test stream."
    ),
    seeds: str = typer.Option("0-4", "--seeds", help="Seeds (stream orders): a range '0-4' or a list '0,2,7'."),
    out: Path = typer.Option(Path("reports/budget"), "--out", "-o", help="Folder for budget.json and the figures."),
    policies: str = typer.Option(
        "pilot,linucb,barp,cheapest,greedy", "--policies", help="Comma-separated, from pilot, linucb, barp, cheapest, greedy."
    ),
    bin_size: int = typer.Option(50, "--bin-size", min=1, help="S: queries per pacing bin (budget B/N each, with rollover)."),
    update_batch: int = typer.Option(8, "--update-batch", min=1, help="Samples per online policy update."),
    values: str = typer.Option(
        "optimistic",
        "--values",
        help="Value estimate the knapsack compares with cost: optimistic (what a learner maximises: UCB, live pi) or greedy.",
    ),
    reference_model: str | None = typer.Option(
        None,
        "--reference-model",
        help="Budgets are fractions of its spend (default: gpt-4 on routerbench, else the best train accuracy).",
    ),
    train_seed: int = typer.Option(0, "--train-seed", min=0, help="Seed of PILOT's prior and BaRP's training."),
    barp_epochs: int | None = typer.Option(None, "--barp-epochs", min=0, help="BaRP's training epochs (default 100)."),
    retrain: bool = typer.Option(False, "--retrain", help="Train PILOT's prior and BaRP again, ignoring <out>/checkpoints."),
    data_dir: Path | None = DataDirOpt,
    test_fraction: float = TestFracOpt,
):
    """Policies under a budget, online over the test stream (evaluation/budget.py): PILOT, LinUCB without a prior
    and BaRP paced by the same ZCL knapsack, plus cheapest-first and greedy-until-broke; writes budget.json,
    budget_frontier.png and learning_curves.png."""
    from banditrouter.data import DataError
    from banditrouter.evaluation.budget import BudgetInvariantError, parse_budgets, run_budget_eval
    from banditrouter.evaluation.queue import parse_seeds
    from banditrouter.policies import StateError

    try:
        res = run_budget_eval(
            dataset,
            out,
            budgets=parse_budgets(budgets),
            seeds=parse_seeds(seeds),
            policies=policies.split(","),
            bin_size=bin_size,
            update_batch=update_batch,
            value_mode=values,
            reference_model=reference_model,
            train_seed=train_seed,
            barp_epochs=barp_epochs,
            retrain=retrain,
            data_dir=data_dir,
            test_fraction=test_fraction,
            log_fn=console.print,
        )
    except (DataError, ValueError, StateError, FileNotFoundError) as e:
        _fail(str(e))
    except BudgetInvariantError as e:
        _fail(f"budget invariant broken (a bug): {e}")
    r = res.results
    ref = f"{r['reference_model']} (${r['reference_spend_usd']:.4g})"
    table = Table(title=f"{r['dataset']} budget-eval: budgets as fractions of {ref}, seeds {r['seeds']}")
    for col in ("policy", "budget", "accuracy", "share of ref", "spend/budget", "max overspend $", "exhausted (runs, at)"):
        table.add_column(col, justify="right")
    for name, per in res.summary.items():
        for b, v in per.items():
            at = "-" if v["exhausted_at_fraction_mean"] is None else f"{v['exhausted_at_fraction_mean']:.2f}"
            table.add_row(
                name,
                b,
                f"{v['accuracy_mean']:.3f} ± {v['accuracy_sd']:.3f}",
                f"{v['accuracy_mean'] / r['reference_accuracy']:.1%}",
                f"{v['spend_over_budget_mean']:.3f}",
                f"{v['max_overspend_usd']:+.2e}",
                f"{v['runs_exhausted']}, {at}",
            )
    Console().print(table)
    c = r["checks"]
    console.print(
        f"max over runs of spend - budget: {c['max_overspend_usd']:+.3e} USD; "
        f"max request cost {c['max_request_cost_usd']:.3e} USD"
        f" -> invariant {'holds' if c['spend_within_budget_plus_max_request'] else 'BROKEN'}"
    )
    for b, v in c.get("pilot_vs_linucb", {}).items():
        console.print(f"budget {b}: pilot {v['pilot']:.3f} vs linucb {v['linucb']:.3f} ({v['difference']:+.3f})")
    written = ", ".join(
        f.name for f in (out / "budget.json", out / "budget_frontier.png", out / "learning_curves.png") if f.exists()
    )
    console.print(f"wrote {written} in {out} in {res.seconds:.0f}s")


@data_app.command("fetch")
def fetch(
    name: str = typer.Argument(..., help="Dataset to fetch: routerbench."),
    source: str | None = typer.Option(None, "--source", help="A local copy of the release file (.pkl or .csv), or a URL."),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Where to write (default: $BANDITROUTER_DATA_DIR or ~/.local/share/banditrouter/data)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the per-task 70/30 train/test split."),
):
    """Download the public RouterBench release (36k prompts, 11 models) and convert it for `--dataset routerbench`."""
    import os

    from banditrouter.data import DataError
    from banditrouter.data.fetch import ROUTERBENCH_URL, convert_routerbench, download
    from banditrouter.data.paths import DATA_DIR_ENV, default_user_data_dir

    if name != "routerbench":
        _fail(f"unknown dataset {name!r}: only 'routerbench' can be fetched (llmrouter ships with its repository)")
    dest = Path(data_dir or os.environ.get(DATA_DIR_ENV) or default_user_data_dir())
    try:
        if source and Path(source).exists():
            src = Path(source)
        else:
            src = download(source or ROUTERBENCH_URL, dest / "downloads" / "routerbench_0shot.pkl")
        counts = convert_routerbench(src, dest, seed=seed)
    except DataError as e:
        _fail(str(e))
    console.print(
        f"[green]wrote[/] {dest}/routerbench/full_train.csv ({counts['train']} prompts) and full_test.csv "
        f"({counts['test']}). Use it with --data-dir {dest} (or set BANDITROUTER_DATA_DIR)."
    )


@data_app.command("export")
def export(
    dataset: str = DatasetOpt,
    out: Path = typer.Option(..., "--out", "-o", help="JSONL file to write."),
    split: str = typer.Option("all", "--split"),
    data_dir: Path | None = DataDirOpt,
):
    """Write a dataset in the documented JSONL format (an example of the format, or a start for your own)."""
    from banditrouter.data import DataError, load_dataset
    from banditrouter.data.loaders import write_jsonl

    try:
        log = load_dataset(dataset, split, data_dir=data_dir)
    except DataError as e:
        _fail(str(e))
    write_jsonl(log, out)
    console.print(f"[green]wrote[/] {len(log)} prompts x {log.n_models} models to {out}")


@data_app.command("show")
def show(
    dataset: str = DatasetOpt,
    split: str = typer.Option("train", "--split"),
    data_dir: Path | None = DataDirOpt,
    test_fraction: float = TestFracOpt,
):
    """Print a dataset's size, models and each model's mean score and cost."""
    from banditrouter.data import DataError, load_dataset

    try:
        log = load_dataset(dataset, split, data_dir=data_dir, test_fraction=test_fraction)
    except DataError as e:
        _fail(str(e))
    table = Table(title=f"{log.name}: {len(log)} prompts, {log.n_models} models")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    table.add_column("mean cost (USD)", justify="right")
    for m, st in log.single_model_stats().items():
        table.add_row(m, f"{st['accuracy']:.3f}", f"{st['cost']:.2e}")
    Console().print(table)
    for note in log.notes:
        console.print(f"note: {note}")


KeysFileOpt = typer.Option(..., "--file", "-f", help="The key store (YAML), as gateway.auth.keys_file names it.")


@keys_app.command("create")
def keys_create(
    key_id: str = typer.Option(..., "--id", help="Public name of the key (logs, metrics, budgets): letters, digits, . _ -"),
    scopes: list[str] = typer.Option(
        ...,
        "--scopes",
        "-s",
        help="route (chat, models, feedback on its own decisions) and/or admin (everything); a,b or repeat.",
    ),
    budget_usd: float | None = typer.Option(None, "--budget-usd", help="Spend limit per --period, USD."),
    period: str = typer.Option(
        "day", "--period", help="Budget period: hour, day, week, month, total, or <N>s (N >= 10 seconds, for demos)."
    ),
    pacing: str = typer.Option(
        "hard", "--pacing", help="hard: 429 at the limit; zcl: pace routed requests so the budget lasts the period."
    ),
    rate_limit: int | None = typer.Option(None, "--rate-limit", help="Requests per minute."),
    file: Path = KeysFileOpt,
):
    """Make an API key: print it once (stdout) and append only its sha256 to the key store."""
    from deployments.gateway.auth import KeyStoreError, create_key

    wanted = [x.strip() for item in scopes for x in item.split(",") if x.strip()]
    try:
        secret, entry = create_key(
            file, key_id, wanted, budget_usd=budget_usd, period=period, pacing=pacing, rate_limit_per_min=rate_limit
        )
    except KeyStoreError as e:
        _fail(str(e))
    limits = [f"scopes {', '.join(entry.scopes)}"]
    if entry.budget is not None:
        limits.append(f"budget ${entry.budget.usd:g}/{entry.budget.period}, pacing {entry.budget.pacing}")
    if entry.rate_limit_per_min is not None:
        limits.append(f"{entry.rate_limit_per_min} requests/min")
    console.print(
        f"key {entry.id!r} ({'; '.join(limits)}) added to {file} (its hash only). This is the only time the key is shown:"
        " give it to its user now. Serve with gateway.auth: {mode: keys, keys_file: ...} (or keys_env).",
        soft_wrap=True,
    )
    print(secret)


@keys_app.command("list")
def keys_list(file: Path = KeysFileOpt):
    """The keys in a store: id, scopes, budget, rate limit (never the keys; they are not stored)."""
    from deployments.gateway.auth import KeyStoreError, read_key_file

    try:
        entries = read_key_file(file)
    except KeyStoreError as e:
        _fail(str(e))
    table = Table(title=f"{file}: {len(entries)} keys")
    for col in ("id", "scopes", "budget (USD)", "rate limit (/min)", "created"):
        table.add_column(col)
    for e in entries:
        budget = f"{e.budget.usd:g} per {e.budget.period} ({e.budget.pacing})" if e.budget else "-"
        rate = str(e.rate_limit_per_min) if e.rate_limit_per_min else "-"
        table.add_row(e.id, ",".join(e.scopes), budget, rate, e.created or "-")
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Option(..., "--id", help="The key to remove."), file: Path = KeysFileOpt):
    """Remove a key from the store (a running gateway re-reads its keys_file within seconds)."""
    from deployments.gateway.auth import KeyStoreError, revoke_key

    try:
        revoke_key(file, key_id)
    except KeyStoreError as e:
        _fail(str(e))
    console.print(f"key {key_id!r} removed from {file}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
