"""`tmrl compare --parent <fit run>`: fine-tuning runs of one pre-training run, side by side.

Groups the child runs by method, plots each seed's ``eval/success_rate`` and cumulative training successes
(``train/successes``: how often exploration reached the goal) against real environment steps with the
per-method mean and its 95% bootstrap interval over seeds (and the base policy's zero-shot success on the
same evaluation episodes, dashed), prints the final figures per method, and logs the plot on the parent
run (so the comparison sits next to the policy it fine-tuned). ``filter`` narrows the children with an
MLflow search filter, e.g. ``"params.env_steps = '100000'"``.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from app.plots import pyplot
from app.tracking import PRETRAIN_TAG

METRIC = "eval/success_rate"
BASE = "eval/base_success_rate"
EXPLORATION = "train/successes"


def bootstrap_interval(
    values: np.ndarray, level: float = 0.95, draws: int = 2000, seed: int = 0
) -> np.ndarray:
    """Percentile bootstrap interval of the mean over seeds: values (seeds, T) -> (2, T) low, high."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, values.shape[0], size=(draws, values.shape[0]))  # resampled seeds
    means = values[picks].mean(axis=1)  # (draws, T)
    tail = 100 * (1 - level) / 2
    return np.percentile(means, [tail, 100 - tail], axis=0)


def on_grid(runs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The union of the runs' env steps and each run interpolated on it: (T,), (seeds, T)."""
    grid = np.unique(np.concatenate([r[:, 0] for r in runs]))
    return grid, np.stack([np.interp(grid, r[:, 0], r[:, 1]) for r in runs])


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
    from mlflow.exceptions import MlflowException

    try:
        runs = client.search_runs([exp], filter_string=query, max_results=1000)
    except MlflowException as err:
        raise ValueError(f"--filter {filter!r} is not a valid MLflow search filter: {err.message}") from None
    curves: dict[str, list[np.ndarray]] = defaultdict(list)
    for run in runs:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric))
        if history:
            curves[_group(run, by)].append(np.asarray(history, dtype=np.float64))
    return dict(curves)


def success_table(curves: dict[str, list[np.ndarray]], width: int = 5000) -> str:
    """Mean success per method at each evaluation (env steps rounded to ``width``: the runs' evaluations land
    a few steps apart), with the 95% bootstrap interval over seeds."""
    rows: dict[int, dict[str, str]] = defaultdict(dict)
    for method, runs in sorted(curves.items()):
        # each run at its own evaluation steps, binned (the last value of a run in a bin counts once)
        binned: dict[int, list[float]] = defaultdict(list)
        for r in runs:
            per_bin = {int(round(step / width) * width): value for step, value in r}
            for step, value in per_bin.items():
                binned[step].append(value)
        for step, vals in binned.items():
            v = np.asarray(vals)[:, None]
            low, high = bootstrap_interval(v)[:, 0]
            rows[step][method] = f"{v.mean():4.0%} [{low:.0%}, {high:.0%}]"
    methods = sorted(curves)
    lines = ["[tmrl] eval success per method (mean [95% bootstrap interval]) by env steps:"]
    lines.append(f"{'env steps':>10} " + " ".join(f"{m:>18s}" for m in methods))
    for step in sorted(rows):
        lines.append(f"{step:>10d} " + " ".join(f"{rows[step].get(m, '-'):>18s}" for m in methods))
    return "\n".join(lines)


def _panel(ax, curves: dict[str, list[np.ndarray]], colors, ylabel: str) -> None:
    """Thin line per seed, thick line for the mean on a common grid of env steps, its 95% bootstrap band."""
    for method, runs in sorted(curves.items()):
        grid, values = on_grid(runs)
        for r in runs:
            ax.plot(r[:, 0], r[:, 1], color=colors[method], lw=0.6, alpha=0.25)
        if len(runs) > 1:
            low, high = bootstrap_interval(values)
            ax.fill_between(grid, low, high, color=colors[method], alpha=0.18, lw=0)
        ax.plot(grid, values.mean(0), color=colors[method], lw=2.2, label=f"{method} ({len(runs)} seeds)")
    ax.set_xlabel("environment steps")
    ax.set_ylabel(ylabel)


def plot_curves(
    curves: dict[str, list[np.ndarray]],
    title: str,
    path: Path,
    explored: dict | None = None,
    base: float | None = None,
) -> Path:
    """Evaluation success per method (band: 95% bootstrap interval of the mean over seeds; dashed: the base
    policy alone on the same episodes, ``base``); beside it, when given, cumulative training successes."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2 if explored else 1, figsize=(12 if explored else 7, 4), squeeze=False)
    cmap = plt.get_cmap("tab10")
    colors = {m: cmap(i) for i, m in enumerate(sorted(set(curves) | set(explored or {})))}
    _panel(axes[0, 0], curves, colors, "success rate (fixed eval episodes)")
    if base is not None:
        axes[0, 0].axhline(base, color="0.3", ls="--", lw=1.2, label=f"base policy alone ({base:.0%})")
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
    uri: str, parent: str, filter: str | None = None, by: Sequence[str] = (), out: str | None = None
) -> dict[str, tuple[float, float, int]]:
    """Plot and log the comparison (and copy the plot to ``out``); returns {group: (mean final success,
    std, seeds)}."""
    client = MlflowClient(tracking_uri=uri)
    curves = child_curves(client, parent, METRIC, filter, by)
    if not curves:
        where = f" matching {filter!r}" if filter else ""
        raise ValueError(f"run {parent!r} has no fine-tuning runs{where} with {METRIC} in {uri}")
    explored = child_curves(client, parent, EXPLORATION, filter, by)
    bases = [r[0, 1] for runs in child_curves(client, parent, BASE, filter, by).values() for r in runs]
    summary = {}
    for method, runs in sorted(curves.items()):
        finals = np.array([r[-1, 1] for r in runs])
        low, high = bootstrap_interval(finals[:, None])[:, 0]
        summary[method] = (float(finals.mean()), float(finals.std()), len(runs))
        steps = int(min(r[-1, 0] for r in runs))
        found = [int(r[-1, 1]) for r in explored.get(method, [])]
        print(
            f"[tmrl] {method:12s} final success {finals.mean():6.1%} +- {finals.std():5.1%} "
            f"(95% bootstrap interval {low:.0%}-{high:.0%}; {len(runs)} seeds, >= {steps} env steps); "
            f"training successes per seed {found}"
        )
    print(success_table(curves))
    base = float(np.mean(bases)) if bases else None
    if base is not None:
        print(f"[tmrl] base policy alone on the same evaluation episodes: {base:.1%} ({len(bases)} runs)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "finetune_comparison.png"
        plot = plot_curves(curves, f"fine-tuning from {parent[:8]}", path, explored, base)
        client.log_artifact(parent, str(plot), "plots")
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_bytes(plot.read_bytes())
            print(f"[tmrl] plot copied to {out}")
    print(f"[tmrl] logged plots/finetune_comparison.png on run {parent}")
    return summary
