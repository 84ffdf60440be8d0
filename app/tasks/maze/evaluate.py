"""Zero-shot evaluation of a pre-trained policy on OGBench's fixed evaluation tasks, and its plot.

An initial state is a (task, episode) pair, its start and goal fixed by a seed; each is rolled out
``eval.rollouts`` = K times with fresh z and eps_c (Success@K, ``app.evaluation``), row s * K + k being
state s's k-th rollout, states task-major::

    rows       t1e0k0 .. t1e0k(K-1) | t1e1k0 .. | ... | t5e(E-1)k(K-1)
    reset seed seed(t1, e0)         | seed(t1, e1) | ... | seed(t5, e(E-1))

Rollouts are batched across every row: one ``policy.sample`` call serves all live environments, then each
runs the first ``exec_horizon`` actions of its chunk open loop::

    env step   0 1 2 3 4 5 6 7 8 9 ...
    chunk      [ sample @0: a0..a(L-1) ]
    executed   a0 a1 a2 a3                (exec_horizon = 4, the rest of the chunk is dropped)
    chunk                  [ sample @4 ... ]

An episode ends at success (OGBench terminates at the goal) or at the time limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from app.plots import pyplot
from app.tasks.base import Replay
from app.tasks.maze.backend import NUM_TASKS, BatchedMaze
from app.tasks.maze.camera import MazeCameraConfig
from app.tasks.maze.config import EvalConfig
from app.tasks.maze.env import make_maze_env
from app.tasks.registry import TaskConfig
from app.tasks.rollout import policy_sampler, rollout
from modules.nets.policy import CSPPolicy

EVAL_EPISODE_STEPS = 1000  # OGBench's time limit of its maze evaluation episodes


@dataclass
class Rollouts:
    """What one sigma's evaluation rollouts did (rows ordered as in the module docstring)."""

    success: np.ndarray  # (NUM_TASKS, episodes_per_task, rollouts) bool
    paths: list[np.ndarray]  # per rollout, (T_i, 2) xy positions visited
    goals: np.ndarray  # (NUM_TASKS * episodes_per_task * rollouts, 2)

    def states(self) -> np.ndarray:
        """(S, K) bool outcomes, S = NUM_TASKS * episodes_per_task initial states, K rollouts each."""
        return self.success.reshape(-1, self.success.shape[-1])


def rollout_tasks(
    policy: CSPPolicy,
    env_name: str,
    sigma: float,
    cfg: EvalConfig,
    progress: bool = False,
    camera: MazeCameraConfig | None = None,
) -> Rollouts:
    """Roll out the fixed, seeded evaluation episodes (every task, episodes_per_task each, ``rollouts``
    times each) at sigma, seen through ``camera`` if given (the visual maze)."""
    if cfg.exec_horizon > policy.cfg.chunk_len:
        raise ValueError(
            f"eval.exec_horizon={cfg.exec_horizon} exceeds policy chunk_len={policy.cfg.chunk_len}"
        )
    pairs = [(t, e) for t in range(1, NUM_TASKS + 1) for e in range(cfg.episodes_per_task)]
    rows = [pair for pair in pairs for _ in range(cfg.rollouts)]  # each start K times in a row
    # OGBench's own time limit; each row's start and goal are its evaluation task's
    target = TaskConfig(env=env_name, task_id=1, max_episode_steps=EVAL_EPISODE_STEPS)
    env = BatchedMaze(target, len(rows), seed=cfg.seed, camera=camera)
    try:
        seeds = [cfg.seed * 10_000 + task * 100 + ep for task, ep in rows]
        env.reset(seeds=seeds, task_ids=[task for task, _ in rows])
        paths = [[ob[:2].copy()] for ob in env.observation]
        goals = env.goal_pos.copy()

        def record(rows: np.ndarray) -> None:
            for k in rows:
                paths[k].append(env.observation[k, :2].copy())

        sample = policy_sampler(policy, sigma, torch.Generator().manual_seed(cfg.seed), cfg.sample_steps)
        with tqdm(desc=f"eval sigma={sigma:g}", total=len(rows), disable=not progress, leave=False) as bar:
            success = rollout(env, sample, cfg.exec_horizon, on_step=record, on_done=bar.update)
    finally:
        env.close()
    shape = (NUM_TASKS, cfg.episodes_per_task, cfg.rollouts)
    return Rollouts(success.reshape(shape), [np.asarray(p) for p in paths], goals)


def evaluate_zero_shot(
    policy: CSPPolicy,
    env_name: str,
    cfg: EvalConfig,
    progress: bool = True,
    camera: MazeCameraConfig | None = None,
) -> dict[float, Rollouts]:
    """Per-sigma rollouts of the policy on the env's evaluation tasks (through ``camera``, if given)."""
    policy.eval()
    return {s: rollout_tasks(policy, env_name, s, cfg, progress, camera) for s in cfg.sigmas}


def replays(results: dict[float, Rollouts], per_outcome: int = 3) -> list[Replay]:
    """Per sigma, the first ``per_outcome`` successful and failed rollouts (in row order), to be filmed."""
    chosen = []
    for sigma, r in results.items():
        outcomes = r.success.reshape(-1)
        k = r.success.shape[-1]
        for wanted, word in ((True, "success"), (False, "failure")):
            for row in np.flatnonzero(outcomes == wanted)[:per_outcome]:
                state, rollout = divmod(int(row), k)
                label = f"sigma_{sigma:g}_state_{state}_rollout_{rollout}_{word}"
                title = f"sigma {sigma:g} s{state} r{rollout} {'ok' if wanted else 'fail'}"
                group = f"sigma_{sigma:g}"
                chosen.append(Replay(label, wanted, r.paths[row], r.goals[row], group=group, title=title))
    return chosen


def summary(results: dict[float, Rollouts], env_name: str) -> list[str]:
    """One printable line per sigma: overall and per-task success."""
    lines = []
    for sigma, r in results.items():
        per_task = ", ".join(f"{v:.0%}" for v in r.success.mean(axis=(1, 2)))
        states, k = r.states().shape
        each = "" if k == 1 else f" = {states} starts x {k} rollouts"
        lines.append(
            f"[tmrl] zero-shot {env_name} sigma={sigma:g}: success {r.success.mean():.1%} "
            f"({r.success.size} episodes{each}; per task {per_task})"
        )
    return lines


def plot_success(results: dict[float, Rollouts], env_name: str, path: str | Path) -> Path:
    """Bar plot: success rate per evaluation task, one group of bars per sigma."""
    plt = pyplot()
    results = {s: r.success for s, r in results.items()}
    sigmas = sorted(results)
    width = 0.8 / len(sigmas)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, s in enumerate(sigmas):
        per_task = results[s].mean(axis=(1, 2))
        xs = np.arange(NUM_TASKS) + i * width
        ax.bar(xs, per_task, width, label=f"sigma={s:g} (mean {results[s].mean():.0%})")
    ax.set_xticks(np.arange(NUM_TASKS) + 0.4 - width / 2, [f"task {t}" for t in range(1, NUM_TASKS + 1)])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate")
    ax.set_title(f"CSP zero-shot on {env_name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_paths(results: dict[float, Rollouts], env_name: str, path: str | Path) -> Path:
    """The maze from above, one panel per sigma: each episode's path (colour = task), goals as stars."""
    from matplotlib.patches import Rectangle

    plt = pyplot()
    maze = make_maze_env(env_name).unwrapped
    unit = float(maze._maze_unit)
    walls = np.argwhere(np.asarray(maze.maze_map) == 1)
    sigmas = sorted(results)
    fig, axes = plt.subplots(1, len(sigmas), figsize=(4.2 * len(sigmas), 3.6), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, s in zip(axes[0], sigmas, strict=True):
        r = results[s]
        for i, j in walls:
            x, y = maze.ij_to_xy((i, j))
            ax.add_patch(Rectangle((x - unit / 2, y - unit / 2), unit, unit, color="0.75", lw=0))
        per_task = len(r.paths) // NUM_TASKS
        for k, (xy, goal) in enumerate(zip(r.paths, r.goals, strict=True)):
            c = colors(k // per_task)
            ax.plot(xy[:, 0], xy[:, 1], color=c, lw=0.8, alpha=0.8)
            ax.plot(*xy[0], "o", color=c, ms=3)
            ax.plot(*goal, "*", color=c, ms=10, mec="k", mew=0.5)
        ax.set_title(f"sigma={s:g}: success {r.success.mean():.0%}")
        ax.set_aspect("equal")
        ax.autoscale_view()
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"CSP zero-shot paths on {env_name} (o start, * goal, colour = task)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
