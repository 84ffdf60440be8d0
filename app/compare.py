"""`tmrl compare --parent <fit run>`: fine-tuning runs of one pre-training run, side by side.

Groups the child runs by method, plots each seed's ``eval/success_rate`` and cumulative training successes
(``train/successes``: how often exploration reached the goal) against real environment steps with the
per-method mean, prints the final figures per method, and logs the plot on the parent run (so the comparison
sits next to the policy it fine-tuned). ``filter`` narrows the children with an MLflow search filter, e.g.
``"params.env_steps = '100000'"``.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from app.evaluate import _pyplot
from app.tracking import PRETRAIN_TAG

METRIC = "eval/success_rate"
EXPLORATION = "train/successes"


def _group(run, by: Sequence[str]) -> str:
    """A run's group: its method, then ``key=value`` for each param in ``by`` (e.g. chunk.sigma_max)."""
    method = run.data.tags.get("tmrl.method", "?")
    return " ".join([method, *(f"{key}={run.data.params.get(key, '?')}" for key in by)])


def child_curves(
    client: MlflowClient, parent: str, metric: str = METRIC, filter: str | None = None, by: Sequence[str] = ()
) -> dict[str, list[np.ndarray]]:
    """{group: [(T, 2) array of (env steps, value) per run]} for the children of ``parent``; a group is the
    method, split further by the params named in ``by``."""
    exp = client.get_run(parent).info.experiment_id
    query = f"tags.`{PRETRAIN_TAG}` = '{parent}'" + (f" and {filter}" if filter else "")
    runs = client.search_runs([exp], filter_string=query, max_results=1000)
    curves: dict[str, list[np.ndarray]] = defaultdict(list)
    for run in runs:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric))
        if history:
            curves[_group(run, by)].append(np.asarray(history, dtype=np.float64))
    return dict(curves)


def _panel(ax, curves: dict[str, list[np.ndarray]], colors, ylabel: str) -> None:
    """Thin line per seed, thick line for the mean on a common grid of env steps."""
    for method, runs in sorted(curves.items()):
        grid = np.unique(np.concatenate([r[:, 0] for r in runs]))
        values = np.stack([np.interp(grid, r[:, 0], r[:, 1]) for r in runs])
        for r in runs:
            ax.plot(r[:, 0], r[:, 1], color=colors[method], lw=0.7, alpha=0.35)
        ax.plot(grid, values.mean(0), color=colors[method], lw=2.2, label=f"{method} ({len(runs)} seeds)")
    ax.set_xlabel("environment steps")
    ax.set_ylabel(ylabel)


def plot_curves(
    curves: dict[str, list[np.ndarray]], title: str, path: Path, explored: dict | None = None
) -> Path:
    """Evaluation success per method; beside it, when given, cumulative training successes."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if explored else 1, figsize=(12 if explored else 7, 4), squeeze=False)
    cmap = plt.get_cmap("tab10")
    colors = {m: cmap(i) for i, m in enumerate(sorted(set(curves) | set(explored or {})))}
    _panel(axes[0, 0], curves, colors, "success rate (fixed eval episodes)")
    axes[0, 0].set_ylim(-0.02, 1.02)
    axes[0, 0].legend(fontsize=8)
    axes[0, 0].set_title(title)
    if explored:
        _panel(axes[0, 1], explored, colors, "training episodes that reached the goal (cumulative)")
        axes[0, 1].set_title("exploration")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(
    uri: str, parent: str, filter: str | None = None, by: Sequence[str] = ()
) -> dict[str, tuple[float, float, int]]:
    """Plot and log the comparison; returns {group: (mean final success, std, seeds)}."""
    client = MlflowClient(tracking_uri=uri)
    curves = child_curves(client, parent, METRIC, filter, by)
    if not curves:
        where = f" matching {filter!r}" if filter else ""
        raise ValueError(f"run {parent!r} has no fine-tuning runs{where} with {METRIC} in {uri}")
    explored = child_curves(client, parent, EXPLORATION, filter, by)
    summary = {}
    for method, runs in sorted(curves.items()):
        finals = np.array([r[-1, 1] for r in runs])
        summary[method] = (float(finals.mean()), float(finals.std()), len(runs))
        steps = int(min(r[-1, 0] for r in runs))
        found = [int(r[-1, 1]) for r in explored.get(method, [])]
        print(
            f"[tmrl] {method:12s} final success {finals.mean():6.1%} +- {finals.std():5.1%} "
            f"({len(runs)} seeds, >= {steps} env steps); training successes per seed {found}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "finetune_comparison.png"
        plot = plot_curves(curves, f"fine-tuning from {parent[:8]}", path, explored)
        client.log_artifact(parent, str(plot), "plots")
    print(f"[tmrl] logged plots/finetune_comparison.png on run {parent}")
    return summary
