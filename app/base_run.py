"""What fine-tuning takes from a pre-training run: its policy (checked against the target environment), the
path of its demonstrations and its sensor settings; and the base policy alone on a
fine-tuning target (``tmrl finetune --zero-shot``).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from app import tracking
from app.envs.torchrl_envs import make_zero_shot_env
from app.finetune_config import FinetuneConfig
from app.finetune_eval import dummy_action, evaluate
from app.tasks.registry import TaskConfig
from datamodules.episodes import EpisodeStore
from modules.nets.policy import CSPPolicy


def check_compatible(policy: CSPPolicy, task: TaskConfig, run_id: str) -> None:
    """Refuse a pre-trained policy whose context or observation/action/goal sizes do not fit the target."""
    task.task.check_policy(policy, task, f"the policy of run {run_id!r}")


def check_views(policy: CSPPolicy, sensor: dict[str, Any], run_id: str) -> None:
    """Refuse an image policy that reads more views than its sensor renders: one pre-trained with
    ``data.frame_stack`` > 1 (fine-tuning renders one frame per camera per chunk and stacks none)."""
    if policy.cfg.context_mode != "image_embedding" or "cameras" not in sensor:
        return
    views, cameras = policy.cfg.image_encoder.views, len(sensor["cameras"])
    if views != cameras:
        raise ValueError(
            f"the policy of run {run_id!r} reads {views} views per observation but its sensor renders "
            f"{cameras} camera(s) {list(sensor['cameras'])}; a policy pre-trained on stacked frames "
            "(data.frame_stack > 1) cannot be fine-tuned: fine-tuning renders one frame per camera per chunk"
        )


@dataclass
class BaseRun:
    """What fine-tuning takes from the pre-training run."""

    policy: CSPPolicy
    demos_path: str | None  # its data.path
    sensor: dict[str, Any]  # the sensor the policy saw (cameras, cloud), for tasks with one; {} otherwise


def load_base_policy(cfg: FinetuneConfig, from_run: str, tmp: str) -> BaseRun:
    """Fetch the pre-training run's exported policy and the path of its demonstrations; refuse a run that
    does not exist, is not a CSP pre-training run, or whose policy does not fit the target environment.
    The sensor travels in the policy; a policy saved before it did gets it from the run's config.yaml."""
    files = tracking.fetch_pretrain_run(tracking.resolve_uri(cfg.tracking), from_run, tmp)
    policy = CSPPolicy.load(files["policy"]).requires_grad_(False)
    check_compatible(policy, cfg.task, from_run)
    data = yaml.safe_load(files["config"].read_text()) or {}
    sensor = dict(policy.sensor) or cfg.task.task.legacy_sensor(data, policy, f"run {from_run!r}")
    check_views(policy, sensor, from_run)
    return BaseRun(policy, (data.get("data") or {}).get("path"), sensor)


def open_demos(path: str | None, from_run: str) -> EpisodeStore:
    """The demonstrations RLPD mixes in: ``offline.path``, else the pre-training run's ``data.path``."""
    if not path or not Path(path).exists():
        raise FileNotFoundError(
            f"method=rlpd needs the demonstrations of run {from_run!r}, but {path!r} is not on this machine; "
            f"set offline.path=<episode store>"
        )
    return EpisodeStore.open(path).check()  # a damaged or non-finite store is refused before any run


def zero_shot_on_target(cfg: FinetuneConfig, from_run: str, sigmas: list[float]) -> dict[float, float]:
    """The base policy of ``from_run`` alone on the fine-tuning target's fixed evaluation episodes
    (``cfg.eval``: episodes, seed; ``cfg.chunk``: H_exec, Euler steps), per sigma: what fine-tuning starts
    from, measured exactly as ``eval/base_success_rate``. Creates no MLflow run."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base = load_base_policy(cfg, from_run, tmp)
    max_chunks = math.ceil(cfg.task.max_episode_steps / cfg.chunk.exec_horizon) + 1
    out = {}
    for sigma in sigmas:
        env = make_zero_shot_env(
            cfg.task, cfg.eval.episodes, base.policy, cfg.chunk.exec_horizon, cfg.eval.seed, base.sensor,
            cfg.chunk.sample_steps, sigma,
        )  # fmt: skip
        out[sigma] = evaluate(env, dummy_action, max_chunks, cfg.eval.seed)
        print(
            f"[tmrl] zero-shot on the target, sigma={sigma:g}: success {out[sigma]:.1%} "
            f"({cfg.eval.episodes} episodes)"
        )
    return out
