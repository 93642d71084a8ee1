"""Figures for `banditrouter eval`: the cost-accuracy plane and the preference sweep."""

from __future__ import annotations

from pathlib import Path

STYLE = {
    "barp": dict(color="tab:red", lw=2.5, marker="o", zorder=5),
    "supervised": dict(color="black", lw=1.8, marker="s", ls="--"),
    "linucb": dict(color="tab:blue", marker="^"),
    "lints": dict(color="tab:cyan", marker="v"),
    "epsilon_greedy": dict(color="tab:purple", marker="D"),
    "best_single": dict(color="tab:olive", marker="x"),
    "cheapest": dict(color="tab:brown", marker="+"),
    "random": dict(color="tab:gray", marker="."),
}


def _style(name: str) -> dict:
    for key, st in STYLE.items():
        if name.startswith(key):
            return dict(st)
    return {"marker": "o"}


def plot_pareto(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11.5, 6))
    for name, pol in results["policies"].items():
        pts = sorted(pol["points"], key=lambda p: p["cost"])
        ax.plot([p["cost"] for p in pts], [p["accuracy"] for p in pts], label=f"{name} (AIQ {pol['aiq']:.3f})", **_style(name))
    for key, ref in results["references"].items():
        if key.startswith("single:"):
            ax.scatter(ref["cost"], ref["accuracy"], color="tab:green", marker="o", s=30, zorder=4)
            ax.annotate(
                key.split(":", 1)[1].split("/")[-1],
                (ref["cost"], ref["accuracy"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    o = results["references"]["oracle"]
    ax.scatter(o["cost"], o["accuracy"], color="gold", edgecolor="black", marker="*", s=250, zorder=6, label="per-prompt oracle")
    ax.scatter([], [], color="tab:green", marker="o", s=30, label="single models")
    ax.set_xscale("log")
    ax.set_xlabel("mean cost per query (USD, log scale)")
    ax.set_ylabel("accuracy (mean score of the chosen model)")
    ax.set_title(f"{results['dataset']}: cost vs accuracy over w_cost = 0..1 (n_test = {results['n_test']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_preference_sweep(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    oracle = {p["w_cost"]: p["reward"] for p in results["references"]["oracle"]["points"]}
    for name, pol in results["policies"].items():
        pts = sorted(pol["points"], key=lambda p: p["w_cost"])
        w = [p["w_cost"] for p in pts]
        st = _style(name)
        axes[0].plot(w, [p["cost"] for p in pts], label=name, **st)
        axes[1].plot(w, [p["accuracy"] for p in pts], label=name, **st)
        axes[2].plot(w, [oracle[p["w_cost"]] - p["reward"] for p in pts], label=name, **st)
    axes[0].set_yscale("log")
    for ax, lab in zip(
        axes, ("mean cost per query (USD)", "accuracy", "regret to the per-prompt oracle (lower is better)"), strict=True
    ):
        ax.set_xlabel("w_cost (w_quality = 1 − w_cost)")
        ax.set_ylabel(lab)
        ax.grid(True, alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{results['dataset']}: one policy, many trade-offs (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
