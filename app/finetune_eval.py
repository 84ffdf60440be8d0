"""Evaluation of a fine-tuning agent on its fixed, seeded episodes, and the plots and statistics of sigma.

``evaluate`` runs the agent (or, with ``dummy_action``, a zero-shot env's base policy alone) over one episode
per sub-env of an eval ``ChunkEnv``; ``batch_stats`` summarizes a collected batch; the two plots show sigma
over the evaluation episodes and over fine-tuning.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from app.envs.decoders import ChunkDecoder
from app.plots import pyplot
from modules.nets.keys import ACTION, DONE, ENV_STEPS, NEXT, SUCCESS


def dummy_action(td: TensorDict) -> TensorDict:
    """The policy of a zero-shot env (its decoder ignores the action)."""
    return td.set(ACTION, torch.zeros(td.batch_size[0], 1))


@torch.no_grad()
def evaluate(
    env,
    policy: Callable[[TensorDict], TensorDict],
    max_chunks: int,
    seed: int,
    traces: list | None = None,
    deterministic: bool = False,
) -> float:
    """Success rate of the agent over the eval env's sub-envs (one fixed episode each).

    The episodes (starts, goals) AND the agent's sampling noise are seeded from ``seed``, so every
    evaluation of a run, and of every run with the same eval settings, sees the same draws; torch's global
    generator is restored afterwards. ``deterministic``: act with tanh(mean) instead of sampling.
    With ``traces`` (a list), appends per chunk (env step of each sub-env (N,), sigma chosen (N,), live (N,)),
    the data of the sigma-over-an-episode plot."""
    env.set_seed(seed)
    td = env.reset()
    done = torch.zeros(env.batch_size[0], dtype=torch.bool)
    success = torch.zeros_like(done)
    t = torch.zeros(env.batch_size[0], dtype=torch.long)
    mode = ExplorationType.DETERMINISTIC if deterministic else ExplorationType.RANDOM
    with torch.random.fork_rng(devices=[]), set_exploration_type(mode):
        torch.manual_seed(seed)
        for _ in range(max_chunks):
            # finished sub-envs are reset (their later episodes are ignored) so the batch steps on
            td, td_next = env.step_and_maybe_reset(policy(td))
            if traces is not None and "sigma" in env.decoder.sizes:
                traces.append((t.clone(), env.decoder.split(td[ACTION])["sigma"].clone(), ~done))
            t += td[NEXT, ENV_STEPS].squeeze(-1)
            finished = td[NEXT, DONE].squeeze(-1) & ~done
            success |= finished & td[NEXT, SUCCESS].squeeze(-1)
            done |= finished
            if done.all():
                break
            td = td_next
    return float(success.float().mean())


def plot_sigma_traces(traces: list, method: str, path: Path) -> Path:
    """sigma chosen at each chunk of every evaluation episode, against the episode's env step."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    steps = torch.stack([s for s, _, _ in traces])  # (chunks, N)
    sigmas = torch.stack([g for _, g, _ in traces])
    live = torch.stack([m for _, _, m in traces])
    for k in range(steps.shape[1]):
        keep = live[:, k]
        ax.step(steps[keep, k], sigmas[keep, k], where="post", lw=1.0, alpha=0.7)
    ax.set_xlabel("environment step in the episode")
    ax.set_ylabel("sigma chosen")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{method}: context-noise level per chunk over the evaluation episodes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


SIGMA_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def plot_sigma_over_finetuning(history: list[tuple[int, list[float]]], method: str, path: Path) -> Path:
    """The distribution of the sigma the agent chose while collecting (median, 25-75% and 10-90% bands)
    against the env steps of fine-tuning: the paper expects it to fall as the task is learned."""
    plt = pyplot()
    steps = np.array([s for s, _ in history])
    q = np.array([v for _, v in history])  # (batches, len(SIGMA_QUANTILES))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.fill_between(steps, q[:, 0], q[:, 4], alpha=0.2, lw=0, color="C0", label="10-90%")
    ax.fill_between(steps, q[:, 1], q[:, 3], alpha=0.35, lw=0, color="C0", label="25-75%")
    ax.plot(steps, q[:, 2], color="C0", lw=1.5, label="median")
    ax.set_xlabel("environment steps of fine-tuning")
    ax.set_ylabel("sigma chosen (training chunks)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(f"{method}: context-noise level chosen over fine-tuning")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def batch_stats(batch: TensorDict, decoder: ChunkDecoder) -> dict[str, float]:
    """Training-side metrics of one collected batch: finished episodes' success, sigma chosen."""
    out: dict[str, float] = {}
    done = batch[NEXT, DONE].squeeze(-1)
    if done.any():
        out["train/episode_success"] = float(batch[NEXT, SUCCESS].squeeze(-1)[done].float().mean())
    parts = decoder.split(batch[ACTION])
    if "sigma" in parts:
        out["train/sigma_mean"] = float(parts["sigma"].mean())
        out["train/sigma_std"] = float(parts["sigma"].std()) if parts["sigma"].numel() > 1 else 0.0
    if "sigma" in decoder.sizes:  # a learned sigma: its distribution over the batch
        quantiles = torch.quantile(parts["sigma"].float(), torch.tensor(SIGMA_QUANTILES))
        out |= {
            f"train/sigma_p{round(100 * q)}": float(v)
            for q, v in zip(SIGMA_QUANTILES, quantiles, strict=True)
        }
    return out
