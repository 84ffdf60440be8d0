"""`tmrl compare --parent <fit run>`: fine-tuning runs of one pre-training run, side by side.

Groups the child runs by method, plots each seed's ``eval/success_rate`` against real environment steps
with the per-method mean, prints the final success per method, and logs the plot on the parent run (so the
comparison sits next to the policy it fine-tuned).
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from app.evaluate import _pyplot
from app.tracking import PRETRAIN_TAG

METRIC = "eval/success_rate"


def child_curves(client: MlflowClient, parent: str, metric: str = METRIC) -> dict[str, list[np.ndarray]]:
    """{method: [(T, 2) array of (env steps, value) per run]} for the finished children of ``parent``."""
    exp = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`{PRETRAIN_TAG}` = '{parent}'", max_results=1000)
    curves: dict[str, list[np.ndarray]] = defaultdict(list)
    for run in runs:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric))
        if history:
            curves[run.data.tags.get("tmrl.method", "?")].append(np.asarray(history, dtype=np.float64))
    return dict(curves)


def plot_curves(curves: dict[str, list[np.ndarray]], title: str, path: Path) -> Path:
    """Thin line per seed, thick line for the mean on a common grid of env steps."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = plt.get_cmap("tab10")
    for i, (method, runs) in enumerate(sorted(curves.items())):
        grid = np.unique(np.concatenate([r[:, 0] for r in runs]))
        values = np.stack([np.interp(grid, r[:, 0], r[:, 1]) for r in runs])
        for r in runs:
            ax.plot(r[:, 0], r[:, 1], color=colors(i), lw=0.7, alpha=0.35)
        ax.plot(grid, values.mean(0), color=colors(i), lw=2.2, label=f"{method} ({len(runs)} seeds)")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("success rate (fixed eval episodes)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(uri: str, parent: str) -> dict[str, tuple[float, float, int]]:
    """Plot and log the comparison; returns {method: (mean final success, std, seeds)}."""
    client = MlflowClient(tracking_uri=uri)
    curves = child_curves(client, parent)
    if not curves:
        raise ValueError(f"run {parent!r} has no fine-tuning runs with {METRIC} in {uri}")
    summary = {}
    for method, runs in sorted(curves.items()):
        finals = np.array([r[-1, 1] for r in runs])
        summary[method] = (float(finals.mean()), float(finals.std()), len(runs))
        steps = int(min(r[-1, 0] for r in runs))
        print(
            f"[tmrl] {method:12s} final success {finals.mean():6.1%} +- {finals.std():5.1%} "
            f"({len(runs)} seeds, >= {steps} env steps)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        plot = plot_curves(curves, f"fine-tuning from {parent[:8]}", Path(tmp) / "finetune_comparison.png")
        client.log_artifact(parent, str(plot), "plots")
    print(f"[tmrl] logged plots/finetune_comparison.png on run {parent}")
    return summary
