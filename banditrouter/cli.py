"""`banditrouter` command line: train, eval, data fetch."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="banditrouter: LLM routing that learns from bandit feedback.", no_args_is_help=True, add_completion=False)
data_app = typer.Typer(help="Routing datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
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


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}", soft_wrap=True)
    raise typer.Exit(2)


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
):
    """Train one policy on a split (bandit feedback; full information for `supervised`) and save it."""
    from banditrouter.data import DataError
    from banditrouter.pipeline import run_train

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
        )
    except (DataError, ValueError) as e:
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

    import ray
    from ray import serve as ray_serve

    from banditrouter.ray_local import init_local_ray
    from deployments.app import build_app

    ctx = init_local_ray(dashboard=True)
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
    requests: int = typer.Option(2000, "--requests", "-n", min=1, help="Routed requests to send (distinct prompts)."),
    concurrency: int = typer.Option(16, "--concurrency", min=1, help="Concurrent HTTP clients."),
    out: Path = typer.Option(Path("reports/bench.json"), "--out", "-o", help="Where to write the JSON."),
    seed: int = typer.Option(0, "--seed"),
    prompt_chars: int | None = typer.Option(
        None, "--prompt-chars", min=1, help="Cut each prompt to this many characters (stresses the serving path)."
    ),
):
    """Raw embedder throughput vs routed end-to-end throughput and latency on the same prompts (prints JSON)."""
    import json

    from banditrouter.bench import run_bench
    from banditrouter.config import ConfigError, load_config

    try:
        cfg = load_config(config)
    except ConfigError as e:
        _fail(str(e))
    if not cfg.policy.checkpoint.exists():
        _fail(f"no checkpoint at {cfg.policy.checkpoint}; run `banditrouter serve` once or `banditrouter train` first")
    result = run_bench(cfg, requests, concurrency, out, seed, prompt_chars)
    print(json.dumps(result, indent=2))


@app.command()
def simulate(
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="A running banditrouter with learning enabled."),
    dataset: str = DatasetOpt,
    split: str = typer.Option("train", "--split"),
    requests: int = typer.Option(3000, "--requests", "-n", min=1),
    concurrency: int = typer.Option(8, "--concurrency", min=1),
    out: Path = typer.Option(Path("reports/online"), "--out", "-o", help="Folder for online.json and online.png."),
    retrials: bool = typer.Option(False, "--retrials", help="Unsatisfied users retry (logistic in the score)."),
    cold_start: bool = typer.Option(False, "--cold-start", help="Reset the learner to an untrained policy first."),
    seed: int = typer.Option(0, "--seed"),
    preference_sampler: str = typer.Option("uniform", "--preference-sampler", help="uniform or arcsine draws of w_cost."),
    data_dir: Path | None = DataDirOpt,
):
    """Closed loop through the HTTP API: routed requests, bandit feedback, learning curves."""
    from banditrouter.data import DataError
    from banditrouter.simulate import SimulationError, run_simulation

    try:
        res = run_simulation(
            url, dataset, split, requests, concurrency, out, retrials=retrials, cold_start=cold_start, seed=seed,
            sampler=preference_sampler, data_dir=data_dir,
        )  # fmt: skip
    except (DataError, SimulationError) as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot reach {url}: {e}")
    keys = ("completed", "failed_fraction", "mean_reward", "staleness_p95_s", "checkpoint")
    console.print({k: res[k] for k in keys})
    console.print(f"wrote {out / 'online.json'} and {out / 'online.png'}")


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


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
