"""What fine-tuning takes from a pre-training run: its policy (checked against the target environment), the
path of its demonstrations and, for the cube, its cameras and cloud; and the base policy alone on a
fine-tuning target (``tmrl finetune --zero-shot``).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from app import tracking
from app.envs.batched_maze import TaskConfig
from app.envs.cube import CubeConfig
from app.envs.torchrl_envs import env_dims, make_zero_shot_env
from app.finetune_config import FinetuneConfig
from app.finetune_eval import dummy_action, evaluate
from datamodules.episodes import EpisodeStore
from modules.nets.policy import CSPPolicy


def check_compatible(policy: CSPPolicy, task: TaskConfig, run_id: str) -> None:
    """Refuse a pre-trained policy whose observation/action/goal sizes (or context) do not fit the env."""
    obs_dim, action_dim, goal_dim = env_dims(task)
    want = {"obs_dim": obs_dim, "action_dim": action_dim, "goal_dim": goal_dim}
    have = {"obs_dim": policy.obs_dim, "action_dim": policy.action_dim, "goal_dim": policy.goal_dim}
    cloud = policy.cfg.context_mode == "pointcloud"
    if cloud != task.is_cube:
        raise ValueError(
            f"the policy of run {run_id!r} has context_mode={policy.cfg.context_mode!r}, which does not fit "
            f"task.env={task.env!r}: point-cloud policies fine-tune on 'cube-single', the others on mazes"
        )
    bad = [f"{k}: policy {have[k]} vs env {want[k]}" for k in want if have[k] != want[k]]
    if bad:
        raise ValueError(
            f"the policy of run {run_id!r} does not fit task.env={task.env!r} ({'; '.join(bad)}); "
            f"pre-train on an environment with the same observation and action spaces"
        )


@dataclass
class BaseRun:
    """What fine-tuning takes from the pre-training run."""

    policy: CSPPolicy
    demos_path: str | None  # its data.path
    cube: CubeConfig | None  # its demos.cube: the cameras and cloud the policy saw (cube tasks)


def load_base_policy(cfg: FinetuneConfig, from_run: str, tmp: str) -> BaseRun:
    """Fetch the pre-training run's exported policy, the path of its demonstrations and, for the cube, its
    camera and cloud settings; refuse a run that does not exist, is not a CSP pre-training run, or whose
    policy does not fit the target environment."""
    files = tracking.fetch_pretrain_run(tracking.resolve_uri(cfg.tracking), from_run, tmp)
    policy = CSPPolicy.load(files["policy"]).requires_grad_(False)
    check_compatible(policy, cfg.task, from_run)
    data = yaml.safe_load(files["config"].read_text()) or {}
    cube = None
    if cfg.task.is_cube:
        cube = CubeConfig(**((data.get("demos") or {}).get("cube") or {}))
        if cube.num_points != policy.cfg.num_points:
            raise ValueError(
                f"run {from_run!r}: demos.cube.num_points={cube.num_points} but its policy takes "
                f"{policy.cfg.num_points} points"
            )
    return BaseRun(policy, (data.get("data") or {}).get("path"), cube)


def open_demos(path: str | None, from_run: str) -> EpisodeStore:
    """The demonstrations RLPD mixes in: ``offline.path``, else the pre-training run's ``data.path``."""
    if not path or not Path(path).exists():
        raise FileNotFoundError(
            f"method=rlpd needs the demonstrations of run {from_run!r}, but {path!r} is not on this machine; "
            f"set offline.path=<episode store>"
        )
    return EpisodeStore.open(path)


def zero_shot_on_target(cfg: FinetuneConfig, from_run: str, sigmas: list[float]) -> dict[float, float]:
    """The base policy of ``from_run`` alone on the fine-tuning target's fixed evaluation episodes
    (``cfg.eval``: episodes, seed; ``cfg.chunk``: H_exec, Euler steps), per sigma: what fine-tuning starts
    from, measured exactly as ``eval/base_success_rate``. Creates no MLflow run."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base = load_base_policy(cfg, from_run, tmp)
    max_chunks = math.ceil(cfg.task.max_steps / cfg.chunk.exec_horizon) + 1
    out = {}
    for sigma in sigmas:
        env = make_zero_shot_env(
            cfg.task, cfg.eval.episodes, base.policy, cfg.chunk.exec_horizon, cfg.eval.seed, base.cube,
            cfg.chunk.sample_steps, sigma,
        )  # fmt: skip
        out[sigma] = evaluate(env, dummy_action, max_chunks, cfg.eval.seed)
        print(
            f"[tmrl] zero-shot on the target, sigma={sigma:g}: success {out[sigma]:.1%} "
            f"({cfg.eval.episodes} episodes)"
        )
    return out
