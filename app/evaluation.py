"""The statistics of an evaluation on fixed initial states, shared by every task and by both stages.

An evaluation is an (S, K) bool array of outcomes: S fixed, seeded initial states (maze: a (task, episode)
pair; cube: a scene), each rolled out K times with fresh noise (z, eps_c). From it (METHOD.md section 3):

    success rate   the fraction of all S * K rollouts that succeeded
    Success@k      the fraction of states solved by at least one of their first k rollouts (k = 1..K)

each with a 95% percentile-bootstrap interval that resamples the S states (a state's K rollouts stay
together: they share its start and goal, so they are not independent draws). A fine-tuned agent's
evaluation is the same array with K = 1 (one episode per initial state).

Metric names (MLflow refuses '@' and '='); ``<split>/`` only where the task has several sets of states
(the cube's variations "train", "heldout"):

    eval/[<split>/]success_sigma_<s>              success rate of the pre-trained policy at sigma s
    eval/[<split>/]success_at_k_sigma_<s>_k_<k>   its Success@k
    eval/success_deterministic                    success rate of a fine-tuned agent acting tanh(mean)
    eval/success_stochastic                       ... sampling its actions
    <name>_ci_low, <name>_ci_high                 the interval of each
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import numpy as np

from app.plots import pyplot

LEVEL = 0.95  # of every interval
DRAWS = 2000  # bootstrap resamples
SEED = 0  # of the resampling: the same outcomes always give the same interval


def success_at_k(success: np.ndarray) -> np.ndarray:
    """(K,) Success@k for k = 1..K from an (S, K) success array: entry k-1 = the fraction of states
    solved by at least one of their first k rollouts."""
    return solved_by(success).mean(axis=0)


def solved_by(success: np.ndarray) -> np.ndarray:
    """(S, K) bool: state s is solved by one of its first k + 1 rollouts (the running OR along K)."""
    success = np.asarray(success, bool)
    if success.ndim != 2 or success.shape[1] < 1:
        raise ValueError(f"success must be (states, rollouts), got shape {success.shape}")
    return np.logical_or.accumulate(success, axis=1)


def interval(per_state: np.ndarray, level: float = LEVEL, draws: int = DRAWS) -> np.ndarray:
    """Percentile bootstrap interval of the mean over states: (S, T) per-state values -> (2, T) low, high."""
    from app.compare import bootstrap_interval  # the same resampling as the comparison over seeds

    per_state = np.asarray(per_state, np.float64)
    if per_state.ndim != 2 or per_state.shape[0] < 1:
        raise ValueError(f"per_state must be (states, T) with states >= 1, got shape {per_state.shape}")
    return bootstrap_interval(per_state, level, draws, SEED)


def _scope(split: str) -> str:
    return f"eval/{split}/" if split else "eval/"


def success_metric(sigma: float, split: str = "") -> str:
    """The metric name of the success rate at ``sigma`` (module docstring)."""
    return f"{_scope(split)}success_sigma_{sigma:g}"


def success_at_k_metric(sigma: float, k: int, split: str = "") -> str:
    """The metric name of Success@k at ``sigma`` (module docstring)."""
    return f"{_scope(split)}success_at_k_sigma_{sigma:g}_k_{k}"


def agent_metric(mode: str) -> str:
    """The metric name of a fine-tuned agent's success rate; ``mode``: "deterministic" or "stochastic"."""
    return f"eval/success_{mode}"


@dataclass(frozen=True)
class Row:
    """One estimate of an evaluation table, a row of ``eval/table.csv``."""

    metric: str  # its MLflow name
    split: str  # the cube's variation; "" where a task has one set of states
    policy: str  # "sigma=<s>" (a pre-trained policy) or "deterministic" / "stochastic" (an agent)
    sigma: float | None  # sigma of a pre-trained policy; None for an agent
    k: int | None  # Success@k's k; None for a success rate
    value: float
    ci_low: float
    ci_high: float
    states: int  # S initial states the interval resamples
    rollouts: int  # K rollouts per state


@dataclass
class EvalTable:
    """The rows of one evaluation: what ``tmrl eval`` prints, logs as metrics and writes to CSV."""

    rows: list[Row]

    def metrics(self) -> dict[str, float]:
        """Every row as MLflow metrics: ``<metric>``, ``<metric>_ci_low``, ``<metric>_ci_high``."""
        out = {}
        for r in self.rows:
            out |= {r.metric: r.value, f"{r.metric}_ci_low": r.ci_low, f"{r.metric}_ci_high": r.ci_high}
        return out

    def write_csv(self, path: str | Path) -> Path:
        """The table as CSV, one header line of ``Row``'s field names (empty cells for None)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([fl.name for fl in fields(Row)])
            writer.writerows([["" if v is None else v for v in astuple(r)] for r in self.rows])
        return path

    def lines(self) -> list[str]:
        """The table as printable lines, a header first."""
        names = ("split", "policy", "estimate", "value", "95% interval")
        out = ["{:>8} {:>13} {:>11} {:>6}  {:>13}  states x rollouts".format(*names)]
        for r in self.rows:
            what = "success" if r.k is None else f"Success@{r.k}"
            ci, n = f"[{r.ci_low:.0%}, {r.ci_high:.0%}]", f"{r.states} x {r.rollouts}"
            out.append(f"{r.split or '-':>8} {r.policy:>13} {what:>11} {r.value:6.1%}  {ci:>13}  {n}")
        return out


def policy_rows(success: np.ndarray, sigma: float, split: str = "") -> list[Row]:
    """The success rate and Success@1..K rows of a pre-trained policy's (S, K) outcomes at ``sigma``."""
    solved = solved_by(success)
    s, k_max = solved.shape
    per_state = np.asarray(success, np.float64).mean(axis=1, keepdims=True)  # (S, 1)
    low, high = interval(per_state)[:, 0]
    common = dict(split=split, policy=f"sigma={sigma:g}", sigma=float(sigma), states=s, rollouts=k_max)
    rows = [Row(success_metric(sigma, split), k=None, value=float(per_state.mean()), ci_low=float(low),
                ci_high=float(high), **common)]  # fmt: skip
    lows, highs = interval(solved)
    for k in range(1, k_max + 1):
        value, low, high = solved[:, k - 1].mean(), lows[k - 1], highs[k - 1]
        rows.append(Row(success_at_k_metric(sigma, k, split), k=k, value=float(value), ci_low=float(low),
                        ci_high=float(high), **common))  # fmt: skip
    return rows


def policy_table(outcomes: dict[tuple[str, float], np.ndarray]) -> EvalTable:
    """The table of a pre-trained policy's outcomes {(split, sigma): (S, K) bool}."""
    return EvalTable(
        [row for (split, sigma), success in outcomes.items() for row in policy_rows(success, sigma, split)]
    )


def agent_row(success: np.ndarray, mode: str) -> Row:
    """The success-rate row of a fine-tuned agent's (N,) bool outcomes, one per evaluation episode."""
    per_episode = np.asarray(success, np.float64).reshape(-1, 1)
    low, high = interval(per_episode)[:, 0]
    return Row(agent_metric(mode), split="", policy=mode, sigma=None, k=None, value=float(per_episode.mean()),
               ci_low=float(low), ci_high=float(high), states=len(per_episode), rollouts=1)  # fmt: skip


def _splits(rows: Iterable[Row]) -> list[str]:
    return list(dict.fromkeys(r.split for r in rows))


def plot_success_at_k(table: EvalTable, path: str | Path, title: str) -> Path:
    """Success@k against k, one line per sigma with its 95% interval as a band; one panel per split."""
    plt = pyplot()
    rows = [r for r in table.rows if r.k is not None]
    splits = _splits(rows)
    fig, axes = plt.subplots(1, len(splits), figsize=(4.4 * len(splits), 3.4), squeeze=False)
    for ax, split in zip(axes[0], splits, strict=True):
        mine = [r for r in rows if r.split == split]
        for i, sigma in enumerate(sorted({r.sigma for r in mine})):
            curve = sorted((r for r in mine if r.sigma == sigma), key=lambda r: r.k)
            ks = [r.k for r in curve]
            color = f"C{i % 10}"
            low, high = [r.ci_low for r in curve], [r.ci_high for r in curve]
            ax.fill_between(ks, low, high, color=color, alpha=0.18, lw=0)
            ax.plot(ks, [r.value for r in curve], "o-", color=color, ms=3, label=f"sigma={sigma:g}")
        ax.set_xlabel("k (rollouts per initial state)")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{split + ': ' if split else ''}{mine[0].states} states")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("Success@k (band: 95% interval)")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_agent_success(table: EvalTable, path: str | Path, title: str) -> Path:
    """A bar per row (deterministic, stochastic agent) with its 95% interval as an error bar."""
    plt = pyplot()
    rows = table.rows
    values = np.array([r.value for r in rows])
    err = np.array([[r.value - r.ci_low for r in rows], [r.ci_high - r.value for r in rows]])
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(rows), 3.4))
    ax.bar(range(len(rows)), values, yerr=err, capsize=6, color=[f"C{i}" for i in range(len(rows))])
    ax.set_xticks(range(len(rows)), [f"{r.policy}\n{r.value:.0%} of {r.states}" for r in rows])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate (95% interval)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
