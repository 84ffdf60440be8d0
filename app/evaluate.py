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


@torch.no_grad()
def rollout_tasks(
    policy: CSPPolicy, env_name: str, sigma: float, cfg: EvalConfig, progress: bool = False
) -> np.ndarray:
    """Success (0/1) of each episode, shape (NUM_TASKS, episodes_per_task), with a fixed seeded set."""
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
                if terminated or truncated:
                    success[k] = bool(info.get("success", 0.0))
                    live[k] = False
                    bar.update(1)
                    break
    bar.close()
    for env in envs:
        env.close()
    return success.reshape(NUM_TASKS, cfg.episodes_per_task)


def evaluate_zero_shot(
    policy: CSPPolicy, env_name: str, cfg: EvalConfig, progress: bool = True
) -> dict[float, np.ndarray]:
    """Per-sigma success arrays (NUM_TASKS, episodes_per_task) of the policy on the env's tasks."""
    policy.eval()
    return {s: rollout_tasks(policy, env_name, s, cfg, progress) for s in cfg.sigmas}


def plot_success(results: dict[float, np.ndarray], env_name: str, path: str | Path) -> Path:
    """Bar plot: success rate per evaluation task, one group of bars per sigma."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
