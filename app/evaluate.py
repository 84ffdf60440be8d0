"""Zero-shot evaluation of a pre-trained policy on OGBench's fixed evaluation tasks, and its plot.

Rollouts are batched across every (task, episode) pair: one ``policy.sample`` call serves all live
environments, then each runs the first ``exec_horizon`` actions of its chunk open loop::

    env step   0 1 2 3 4 5 6 7 8 9 ...
    chunk      [ sample @0: a0..a(L-1) ]
    executed   a0 a1 a2 a3                (exec_horizon = 4, the rest of the chunk is dropped)
    chunk                  [ sample @4 ... ]

An episode ends at success (OGBench terminates at the goal) or at the time limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from app.envs.maze import make_maze_env
from modules.nets.keys import GOAL, OBS
from modules.nets.policy import CSPPolicy

NUM_TASKS = 5  # OGBench's fixed evaluation tasks per maze


@dataclass
class EvalConfig:
    """Zero-shot evaluation run at the end of pre-training."""

    enabled: bool = True
    env: str | None = None  # None: the environment the demonstrations came from
    sigmas: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    episodes_per_task: int = 2
    exec_horizon: int = 8  # actions executed open loop from each sampled chunk
    sample_steps: int = 10  # K Euler steps
    seed: int = 0

    def __post_init__(self) -> None:
        if any(not 0.0 <= s <= 1.0 for s in self.sigmas):
            raise ValueError(f"eval.sigmas must lie in [0, 1], got {self.sigmas}")
        if self.episodes_per_task < 1 or self.exec_horizon < 1 or self.sample_steps < 1:
            raise ValueError("eval.episodes_per_task, eval.exec_horizon and eval.sample_steps must be >= 1")


def metric_name(sigma: float) -> str:
    """MLflow metric names may not hold '@' or '=', so success@sigma=s is logged as this."""
    return f"eval/success_sigma_{sigma:g}"


@dataclass
class Rollouts:
    """What one sigma's evaluation episodes did (episodes ordered task-major)."""

    success: np.ndarray  # (NUM_TASKS, episodes_per_task) bool
    paths: list[np.ndarray]  # per episode, (T_i, 2) xy positions visited
    goals: np.ndarray  # (NUM_TASKS * episodes_per_task, 2)


@torch.no_grad()
def rollout_tasks(
    policy: CSPPolicy, env_name: str, sigma: float, cfg: EvalConfig, progress: bool = False
) -> Rollouts:
    """Roll out the fixed, seeded evaluation episodes (every task, episodes_per_task each) at sigma."""
    if cfg.exec_horizon > policy.cfg.chunk_len:
        raise ValueError(
            f"eval.exec_horizon={cfg.exec_horizon} exceeds policy chunk_len={policy.cfg.chunk_len}"
        )
    pairs = [(t, e) for t in range(1, NUM_TASKS + 1) for e in range(cfg.episodes_per_task)]
    envs = [make_maze_env(env_name) for _ in pairs]
    obs, goals = [], []
    for env, (task, ep) in zip(envs, pairs, strict=True):
        seed = cfg.seed * 10_000 + task * 100 + ep
        np.random.seed(seed)  # OGBench draws start/goal jitter from the global numpy RNG
        ob, info = env.reset(seed=seed, options=dict(task_id=task, render_goal=False))
        obs.append(ob)
        goals.append(info["goal"])
    obs, goals = np.asarray(obs, np.float32), np.asarray(goals, np.float32)
    paths = [[ob.copy()] for ob in obs]
    live = np.ones(len(pairs), bool)
    success = np.zeros(len(pairs), bool)
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(desc=f"eval sigma={sigma:g}", total=len(pairs), disable=not progress, leave=False)
    while live.any():
        idx = np.flatnonzero(live)
        batch = {OBS: torch.from_numpy(obs[idx])}
        if policy.goal_dim:
            batch[GOAL] = torch.from_numpy(goals[idx])
        z = torch.randn((len(idx), policy.cfg.chunk_len, policy.action_dim), generator=gen)
        eps_c = torch.randn((len(idx), policy.context_dim), generator=gen)
        chunk = policy.sample(batch, sigma, action_noise=z, context_noise=eps_c, steps=cfg.sample_steps)
        chunk = chunk[:, : cfg.exec_horizon].numpy()
        for row, k in enumerate(idx):
            for action in chunk[row]:
                ob, _, terminated, truncated, info = envs[k].step(action)
                obs[k] = ob
                paths[k].append(ob[:2].copy())
                if terminated or truncated:
                    success[k] = bool(info.get("success", 0.0))
                    live[k] = False
                    bar.update(1)
                    break
    bar.close()
    for env in envs:
        env.close()
    return Rollouts(success.reshape(NUM_TASKS, cfg.episodes_per_task), [np.asarray(p) for p in paths], goals)


def evaluate_zero_shot(
    policy: CSPPolicy, env_name: str, cfg: EvalConfig, progress: bool = True
) -> dict[float, Rollouts]:
    """Per-sigma rollouts of the policy on the env's evaluation tasks."""
    policy.eval()
    return {s: rollout_tasks(policy, env_name, s, cfg, progress) for s in cfg.sigmas}


def summary(results: dict[float, Rollouts], env_name: str) -> list[str]:
    """One printable line per sigma: overall and per-task success."""
    lines = []
    for sigma, r in results.items():
        per_task = ", ".join(f"{v:.0%}" for v in r.success.mean(axis=1))
        lines.append(
            f"[tmrl] zero-shot {env_name} sigma={sigma:g}: success {r.success.mean():.1%} "
            f"({r.success.size} episodes; per task {per_task})"
        )
    return lines


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    return plt


def plot_success(results: dict[float, Rollouts], env_name: str, path: str | Path) -> Path:
    """Bar plot: success rate per evaluation task, one group of bars per sigma."""
    plt = _pyplot()
    results = {s: r.success for s, r in results.items()}
    sigmas = sorted(results)
    width = 0.8 / len(sigmas)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, s in enumerate(sigmas):
        per_task = results[s].mean(axis=1)
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

    plt = _pyplot()
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
