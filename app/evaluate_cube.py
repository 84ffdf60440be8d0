"""Zero-shot evaluation of a point-cloud policy on the cube task: Success@K per sigma (METHOD.md section 3).

For each variation ("train", "heldout"), S fixed, seeded initial states (arm, cube, target) are each rolled
out K times with fresh z and eps_c; Success@K is the fraction of states solved by at least one of the
first K rollouts. All S * K rollouts of one (variation, sigma) run batched in one :class:`BatchedCube`,
row s * K + k being state s's k-th rollout::

    rows       s0k0 s0k1 ... s0k(K-1) | s1k0 ... | ... | s(S-1)k(K-1)
    reset seed seed(0) ...  seed(0)   | seed(1)  | ... | seed(S-1)       (one scene per state)

Each loop iteration renders the clouds of the live rows, samples one chunk per live row, and runs its
first ``exec_horizon`` actions open loop (the timeline in app/evaluate.py); a row stops at success
(terminated) or at ``max_steps`` (truncated). The envs of a variation are built once and reset with the
same seeds for every sigma, so every sigma faces the same S scenes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from app.envs.batched_cube import BatchedCube
from app.envs.cube import VARIATIONS, CubeConfig
from app.evaluate import _pyplot
from modules.nets.keys import GOAL, OBS, POINTCLOUD
from modules.nets.policy import CSPPolicy


@dataclass
class CubeEvalConfig:
    """Zero-shot Success@K evaluation on the point-cloud cube task (run at the end of pre-training)."""

    enabled: bool = True
    sigmas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    variations: list[str] = field(default_factory=lambda: list(VARIATIONS))  # CubeConfig.variation values
    # S * K rollouts per (variation, sigma); at ~0.35 rollouts/s on 2 cores (a cloud render per chunk
    # dominates), 2 variations x 5 sigmas x 8 x 3 x 200 steps take up to ~15 minutes
    states: int = 8  # S fixed initial states per variation
    rollouts: int = 3  # K_max independent rollouts per state (fresh z and eps_c each)
    exec_horizon: int = 8  # actions executed open loop from each sampled chunk
    sample_steps: int = 10  # Euler steps per chunk
    max_steps: int = 200  # env steps per rollout (replaces demos.cube.max_episode_steps)
    seed: int = 0  # fixes the S scenes of each variation and the noise draws

    def __post_init__(self) -> None:
        for name in ("states", "rollouts", "exec_horizon", "sample_steps", "max_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"eval.{name} must be >= 1, got {value!r}")
        if not self.sigmas or any(not 0.0 <= s <= 1.0 for s in self.sigmas):
            raise ValueError(f"eval.sigmas must be a non-empty list of values in [0, 1], got {self.sigmas}")
        if len(set(self.sigmas)) != len(self.sigmas):
            raise ValueError(f"eval.sigmas has duplicates: {self.sigmas}")
        bad = [v for v in self.variations if v not in VARIATIONS]
        if not self.variations or bad or len(set(self.variations)) != len(self.variations):
            raise ValueError(
                f"eval.variations must be a non-empty list of distinct values from {list(VARIATIONS)}, "
                f"got {self.variations}"
            )


def state_seeds(cfg: CubeEvalConfig, variation: str) -> list[int]:
    """The reset seed of each of the S states of ``variation`` (a function of eval.seed, variation, s)."""
    v = VARIATIONS.index(variation)
    return [int(np.random.SeedSequence([cfg.seed, v, s]).generate_state(1)[0]) for s in range(cfg.states)]


def eval_cube_config(cube: CubeConfig, cfg: CubeEvalConfig, variation: str) -> CubeConfig:
    """The run's cube settings (cameras, cloud) with the evaluated variation and time limit."""
    return dataclasses.replace(cube, variation=variation, max_episode_steps=cfg.max_steps)


def _check_policy(policy: CSPPolicy, cube: CubeConfig, cfg: CubeEvalConfig) -> None:
    """Refuse, before any env is built, a policy that cannot act on this cube task."""
    if policy.cfg.context_mode != "pointcloud" or policy.cfg.num_points != cube.num_points:
        raise ValueError(
            f"the cube evaluation needs a point-cloud policy of {cube.num_points} points; got context_mode="
            f"{policy.cfg.context_mode!r}, num_points={policy.cfg.num_points}"
        )
    dims, cube_dims = (policy.obs_dim, policy.action_dim), (BatchedCube.obs_dim, BatchedCube.action_dim)
    if dims != cube_dims:
        raise ValueError(f"policy (obs_dim, action_dim) = {dims}; the cube task has {cube_dims}")
    if cfg.exec_horizon > policy.cfg.chunk_len:
        raise ValueError(
            f"eval.exec_horizon={cfg.exec_horizon} exceeds policy chunk_len={policy.cfg.chunk_len}"
        )


@torch.no_grad()
def rollout_states(
    policy: CSPPolicy, env: BatchedCube, sigma: float, cfg: CubeEvalConfig, variation: str, progress=False
) -> np.ndarray:
    """Roll out every state ``cfg.rollouts`` times at ``sigma`` in ``env`` (S * K sub-envs, module
    docstring); returns the (S, K) bool success array."""
    s, k = cfg.states, cfg.rollouts
    if env.num_envs != s * k:
        raise ValueError(f"BatchedCube of {env.num_envs} sub-envs; eval needs states * rollouts = {s * k}")
    _check_policy(policy, env.config, cfg)
    env.reset(seeds=np.repeat(state_seeds(cfg, variation), k))
    device = next(policy.parameters()).device
    # the same noise stream for every sigma (common random numbers across the sigma sweep)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + VARIATIONS.index(variation))
    live = np.ones(env.num_envs, bool)
    actions = np.zeros((env.num_envs, env.action_dim), np.float32)
    desc = f"eval {variation} sigma={sigma:g}"
    bar = tqdm(desc=desc, total=env.num_envs, disable=not progress, leave=False)
    while live.any():
        idx = np.flatnonzero(live)
        clouds = env.observe_clouds(live)[idx]  # (B, P, 3), rendered for the live rows only
        batch = {OBS: torch.from_numpy(env.observation[idx]), POINTCLOUD: torch.from_numpy(clouds)}
        if policy.goal_dim:
            batch[GOAL] = torch.from_numpy(env.goal[idx])
        batch = {key: v.to(device) for key, v in batch.items()}
        z = torch.randn((len(idx), policy.cfg.chunk_len, policy.action_dim), generator=gen)
        eps_c = torch.randn((len(idx), policy.context_dim), generator=gen)
        chunk = policy.sample(
            batch, sigma, action_noise=z.to(device), context_noise=eps_c.to(device), steps=cfg.sample_steps
        )
        chunk = chunk[:, : cfg.exec_horizon].cpu().numpy()  # (B, H, 5)
        for h in range(cfg.exec_horizon):
            actions[idx] = chunk[:, h]
            out = env.step(actions, live)
            done = out["terminated"] | out["truncated"]
            bar.update(int((done & live).sum()))
            live &= ~done
            if not live.any():
                break
    bar.close()
    return env.success.reshape(s, k).copy()


def success_at_k(success: np.ndarray) -> np.ndarray:
    """(K,) Success@k for k = 1..K from an (S, K) success array: entry k-1 = the fraction of states
    solved by at least one of their first k rollouts."""
    success = np.asarray(success, bool)
    if success.ndim != 2 or success.shape[1] < 1:
        raise ValueError(f"success must be (states, rollouts), got shape {success.shape}")
    return np.logical_or.accumulate(success, axis=1).mean(axis=0)


def evaluate_cube(
    policy: CSPPolicy, cube: CubeConfig, cfg: CubeEvalConfig, progress: bool = True
) -> dict[tuple[str, float], np.ndarray]:
    """(variation, sigma) -> (S, K) success of the policy's rollouts from each variation's fixed states.

    ``cube`` is the run's ``demos.cube`` (cameras, cloud size); its variation and time limit are replaced.
    """
    _check_policy(policy, cube, cfg)
    policy.eval()
    results = {}
    for variation in cfg.variations:
        env = BatchedCube(eval_cube_config(cube, cfg, variation), cfg.states * cfg.rollouts, seed=cfg.seed)
        try:
            for sigma in cfg.sigmas:
                results[variation, sigma] = rollout_states(policy, env, sigma, cfg, variation, progress)
        finally:
            env.close()
    return results


def metrics(results: dict[tuple[str, float], np.ndarray]) -> dict[str, float]:
    """MLflow metrics (no '@' or '=' in the names): ``eval/<variation>/success_at_<k>_sigma_<s>`` for every
    k, and ``eval/<variation>/success_sigma_<s>``, the fraction of all S * K rollouts that succeeded."""
    out = {}
    for (variation, sigma), success in results.items():
        for k, value in enumerate(success_at_k(success), start=1):
            out[f"eval/{variation}/success_at_{k}_sigma_{sigma:g}"] = float(value)
        out[f"eval/{variation}/success_sigma_{sigma:g}"] = float(success.mean())
    return out


def summary(results: dict[tuple[str, float], np.ndarray]) -> list[str]:
    """One printable line per (variation, sigma): per-rollout success and Success@1..K."""
    lines = []
    for (variation, sigma), success in results.items():
        at_k = ", ".join(f"@{k} {v:.0%}" for k, v in enumerate(success_at_k(success), start=1))
        lines.append(
            f"[tmrl] zero-shot cube {variation} sigma={sigma:g}: success {success.mean():.1%} of "
            f"{success.size} rollouts ({success.shape[0]} states x {success.shape[1]}); Success{at_k}"
        )
    return lines


def _plotted_ks(k_max: int) -> list[int]:
    """1, 2, 4, ... up to k_max, and k_max itself."""
    ks = [2**i for i in range(k_max.bit_length()) if 2**i <= k_max]
    return sorted(set(ks) | {k_max})


def plot_success_at_k(results: dict[tuple[str, float], np.ndarray], path: str | Path) -> Path:
    """One panel per variation: Success@K against sigma, one line per K (1, 2, 4, ..., K_max)."""
    plt = _pyplot()
    variations = list(dict.fromkeys(v for v, _ in results))
    fig, axes = plt.subplots(1, len(variations), figsize=(4.2 * len(variations), 3.4), squeeze=False)
    for ax, variation in zip(axes[0], variations, strict=True):
        sigmas = sorted(s for v, s in results if v == variation)
        curves = np.stack([success_at_k(results[variation, s]) for s in sigmas])  # (n_sigma, K)
        states = results[variation, sigmas[0]].shape[0]
        for k in _plotted_ks(curves.shape[1]):
            ax.plot(sigmas, curves[:, k - 1], "o-", label=f"Success@{k}")
        ax.set_xlabel("sigma")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{variation} ({states} states)")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("fraction of states solved")
    fig.suptitle("zero-shot on cube-single: Success@K")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
