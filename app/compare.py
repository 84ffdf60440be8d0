"""`tmrl compare`: fine-tuning runs side by side, by method.

The runs are named by id (``tmrl compare ID ...``) or are the children of one pre-training run
(``--parent``), narrowed by an MLflow search ``filter``, e.g. ``"params.env_steps = '100000'"``. Groups the
runs by method (split further by the params in ``by``, and by pre-training run when they come from
several), plots each seed's ``eval/success_rate`` and cumulative training successes (``train/successes``:
how often exploration reached the goal) against real environment steps with the per-method mean and its
95% bootstrap interval over seeds (and, for one pre-training run, the base policy's zero-shot success on the
same evaluation episodes, dashed), and prints the final figures per method.

Runs of ONE pre-training run: the plot and the printed table are logged on it as ``compare/`` artifacts,
next to the policy they fine-tuned. Runs of several: no run owns the comparison, so nothing is logged and
the plot is saved locally (``out``, default ``./success_vs_env_steps.png``).
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from app.plots import pyplot
from app.tracking import PRETRAIN_TAG, STAGE_TAG

METRIC = "eval/success_rate"
BASE = "eval/base_success_rate"
EXPLORATION = "train/successes"
PLOT = "compare/success_vs_env_steps.png"  # on the pre-training run, one click from it in the UI
TABLE = "compare/success_table.txt"


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


def _group(run, by: Sequence[str], with_parent: bool = False) -> str:
    """A run's group: its method, then ``key=value`` for each param in ``by`` (e.g. chunk.sigma_max), then
    (``with_parent``) ``@<first 8 characters of its pre-training run's id>``."""
    method = run.data.tags.get("tmrl.method", "?")
    parent = [f"@{run.data.tags.get(PRETRAIN_TAG, '?')[:8]}"] if with_parent else []
    return " ".join([method, *(f"{key}={run.data.params.get(key, '?')}" for key in by), *parent])


def _search(client: MlflowClient, exps: list[str], query: str, filter: str | None) -> list[Run]:
    from mlflow.exceptions import MlflowException

    query += f" and {filter}" if filter else ""
    try:
        return list(client.search_runs(exps, filter_string=query, max_results=50000))
    except MlflowException as err:
        raise ValueError(f"--filter {filter!r} is not a valid MLflow search filter: {err.message}") from None


def _get(client: MlflowClient, run_id: str, uri: str) -> Run:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise ValueError(f"run {run_id!r} does not exist in the tracking store {uri}") from None


def _name(client: MlflowClient, run_id: str) -> str:
    """A run's name, or "?" for a run that is gone."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.run_name or "?"
    except MlflowException:
        return "?"


def select_runs(
    client: MlflowClient,
    uri: str,
    parent: str | None = None,
    run_ids: Sequence[str] = (),
    filter: str | None = None,
) -> list[Run]:
    """The fine-tuning runs to compare: ``run_ids`` (each checked: it exists and is a fine-tuning run) or
    the children of pre-training run ``parent``, narrowed by ``filter``."""
    if bool(parent) == bool(run_ids):
        raise ValueError(
            "give either fine-tuning run ids (`tmrl compare ID ...`) or --parent <fit run id>, not both"
        )
    if parent:
        fit = _get(client, parent, uri)
        stage = fit.data.tags.get(STAGE_TAG)
        if stage != "pretrain":
            raise ValueError(
                f"--parent {parent!r} is not a pre-training run (its {STAGE_TAG} tag is {stage!r})"
            )
        return _search(client, [fit.info.experiment_id], f"tags.`{PRETRAIN_TAG}` = '{parent}'", filter)
    runs = [_get(client, i, uri) for i in dict.fromkeys(run_ids)]
    for run in runs:
        stage = run.data.tags.get(STAGE_TAG)
        if stage == "pretrain":
            raise ValueError(
                f"run {run.info.run_id!r} ({run.info.run_name}) is a pre-training run, not a fine-tuning "
                f"one: pass its fine-tuning runs (`tmrl runs` lists them) or `--parent {run.info.run_id}`"
            )
        if stage != "finetune":
            raise ValueError(
                f"run {run.info.run_id!r} is not a fine-tuning run (its {STAGE_TAG} tag is {stage!r})"
            )
    if not filter:
        return runs
    ids = ", ".join(f"'{r.info.run_id}'" for r in runs)
    return _search(
        client, sorted({r.info.experiment_id for r in runs}), f"attributes.run_id IN ({ids})", filter
    )


def run_curves(
    client: MlflowClient, runs: Sequence[Run], metric: str, by: Sequence[str] = (), with_parent: bool = False
) -> dict[str, list[np.ndarray]]:
    """{group: [(T, 2) array of (env steps, value) per run]} of the ``runs`` that logged ``metric``."""
    curves: dict[str, list[np.ndarray]] = defaultdict(list)
    for run in runs:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric))
        if history:
            curves[_group(run, by, with_parent)].append(np.asarray(history, dtype=np.float64))
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
    uri: str,
    parent: str | None = None,
    filter: str | None = None,
    by: Sequence[str] = (),
    out: str | None = None,
    run_ids: Sequence[str] = (),
) -> dict[str, tuple[float, float, int]]:
    """Compare the fine-tuning runs ``run_ids`` or the children of ``parent`` (``select_runs``): print the
    figures, log the plot and table on their pre-training run if they share one, save the plot to ``out``
    (for runs of several pre-training runs: ``out`` or ``./success_vs_env_steps.png``). Returns {group:
    (mean final success, std, seeds)}."""
    client = MlflowClient(tracking_uri=uri)
    runs = select_runs(client, uri, parent, run_ids, filter)
    parents = sorted({r.data.tags.get(PRETRAIN_TAG, "?") for r in runs})
    shared = parents[0] if len(parents) == 1 else None
    curves = run_curves(client, runs, METRIC, by, with_parent=shared is None)
    if not curves:
        what = f"run {parent!r} has no fine-tuning runs" if parent else "none of these runs has evaluations"
        where = f" matching {filter!r}" if filter else ""
        raise ValueError(f"{what}{where} with {METRIC} in {uri}")
    explored = run_curves(client, runs, EXPLORATION, by, with_parent=shared is None)
    skipped = len(runs) - sum(len(c) for c in curves.values())
    if skipped:
        print(f"[tmrl] {skipped} of {len(runs)} runs have no {METRIC} yet and are left out")
    report, summary = [], {}
    for method, group in sorted(curves.items()):
        finals = np.array([r[-1, 1] for r in group])
        low, high = bootstrap_interval(finals[:, None])[:, 0]
        summary[method] = (float(finals.mean()), float(finals.std()), len(group))
        steps = int(min(r[-1, 0] for r in group))
        found = [int(r[-1, 1]) for r in explored.get(method, [])]
        report.append(
            f"[tmrl] {method:12s} final success {finals.mean():6.1%} +- {finals.std():5.1%} "
            f"(95% bootstrap interval {low:.0%}-{high:.0%}; {len(group)} seeds, >= {steps} env steps); "
            f"training successes per seed {found}"
        )
    report.append(success_table(curves))
    base = None
    if shared is not None:  # the base policy alone: one line only when every run fine-tunes the same one
        bases = [r[0, 1] for rs in run_curves(client, runs, BASE).values() for r in rs]
        base = float(np.mean(bases)) if bases else None
        if base is not None:
            report.append(
                f"[tmrl] base policy alone on the same evaluation episodes: {base:.1%} ({len(bases)} runs)"
            )
    print("\n".join(report))
    title = f"fine-tuning from {len(parents)} pre-training runs"
    if shared is not None:
        title = f"fine-tuning from {_name(client, shared)} ({shared[:8]})"
    with tempfile.TemporaryDirectory() as tmp:
        plot = plot_curves(curves, title, Path(tmp) / Path(PLOT).name, explored, base)
        if shared is not None:
            table = Path(tmp) / Path(TABLE).name
            ids = "\n".join(f"{r.info.run_id} {r.info.run_name}" for r in runs)
            table.write_text("\n".join(report) + f"\n\nruns compared:\n{ids}\n")
            for path in (plot, table):
                client.log_artifact(shared, str(path), str(Path(PLOT).parent))
            print(
                f"[tmrl] logged {PLOT} and {TABLE} on pre-training run {shared} (its Artifacts tab in the UI)"
            )
        else:
            out = out or Path(PLOT).name
            print(f"[tmrl] runs of {len(parents)} pre-training runs: nothing logged (no run owns the plot)")
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_bytes(plot.read_bytes())
            print(f"[tmrl] plot saved to {out}")
    return summary
