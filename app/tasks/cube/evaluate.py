"""Zero-shot evaluation of a cube policy (point clouds, or camera frames on the visual cube): Success@K per
sigma (METHOD.md section 3).

For each variation ("train", "heldout"), S fixed, seeded initial states (arm, cube, target) are each rolled
out K times with fresh z and eps_c; Success@K is the fraction of states solved by at least one of the
first K rollouts (``app.evaluation`` computes it, names the metrics and gives their intervals). All S * K
rollouts of one (variation, sigma) run batched in one :class:`BatchedCube`, row s * K + k being state s's
k-th rollout::

    rows       s0k0 s0k1 ... s0k(K-1) | s1k0 ... | ... | s(S-1)k(K-1)
    reset seed seed(0) ...  seed(0)   | seed(1)  | ... | seed(S-1)       (one scene per state)

Each loop iteration renders the clouds (or frames) of the live rows, samples one chunk per live row, and runs
its first ``exec_horizon`` actions open loop (``app.tasks.rollout``); a row stops at success (terminated) or
at ``max_episode_steps`` (truncated). The envs of a variation are built once and reset with the same seeds
for every sigma, so every sigma faces the same S scenes. Given a list for ``replays``, each row's simulator
``qpos`` is recorded per step and the first ``REPLAYS_PER_OUTCOME`` successes and failures of each
(variation, sigma) are appended as replays (``Replay``), which `tmrl eval --videos` films.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from app.evaluation import success_at_k
from app.plots import pyplot
from app.tasks.base import Replay
from app.tasks.cube.backend import BatchedCube
from app.tasks.cube.config import VARIATIONS, CubeConfig, CubeEvalConfig
from app.tasks.rollout import policy_sampler, rollout
from modules.nets.keys import POINTCLOUD
from modules.nets.policy import CSPPolicy

REPLAYS_PER_OUTCOME = 3  # per (variation, sigma): what `tmrl eval --videos N` (N <= 3) picks from


def state_seeds(cfg: CubeEvalConfig, variation: str) -> list[int]:
    """The reset seed of each of the S states of ``variation`` (a function of eval.seed, variation, s)."""
    v = VARIATIONS.index(variation)
    return [int(np.random.SeedSequence([cfg.seed, v, s]).generate_state(1)[0]) for s in range(cfg.states)]


def eval_cube_config(cube: CubeConfig, cfg: CubeEvalConfig, variation: str) -> CubeConfig:
    """The run's cube settings (cameras, cloud) with the evaluated variation and time limit."""
    return dataclasses.replace(cube, variation=variation, max_episode_steps=cfg.max_episode_steps)


def _sensor_mismatch(policy: CSPPolicy, cube: CubeConfig) -> str | None:
    """What the cube's sensor ``cube`` needs of a policy, if ``policy`` does not read it; else None."""
    pcfg = policy.cfg
    if cube.output == POINTCLOUD:
        if pcfg.context_mode != "pointcloud" or pcfg.num_points != cube.num_points:
            return (
                f"a point-cloud policy of {cube.num_points} points; got context_mode={pcfg.context_mode!r}, "
                f"num_points={pcfg.num_points}"
            )
        return None
    views, size = len(cube.cameras), [cube.height, cube.width]
    enc = pcfg.image_encoder
    if pcfg.context_mode != "image_embedding" or enc.views != views or list(enc.image_size) != size:
        return (
            f"an image policy of {views} view(s) of {size[0]}x{size[1]} pixels; got context_mode="
            f"{pcfg.context_mode!r}, image_encoder views={enc.views}, image_size={list(enc.image_size)}"
        )
    return None


def _check_policy(policy: CSPPolicy, cube: CubeConfig, cfg: CubeEvalConfig) -> None:
    """Refuse, before any env is built, a policy that cannot act on this cube task."""
    if (needed := _sensor_mismatch(policy, cube)) is not None:
        raise ValueError(f"the cube evaluation needs {needed}")
    dims, cube_dims = (policy.obs_dim, policy.action_dim), (BatchedCube.obs_dim, BatchedCube.action_dim)
    if dims != cube_dims:
        raise ValueError(f"policy (obs_dim, action_dim) = {dims}; the cube task has {cube_dims}")
    if cfg.exec_horizon > policy.cfg.chunk_len:
        raise ValueError(
            f"eval.exec_horizon={cfg.exec_horizon} exceeds policy chunk_len={policy.cfg.chunk_len}"
        )


@torch.no_grad()
def rollout_states(
    policy: CSPPolicy,
    env: BatchedCube,
    sigma: float,
    cfg: CubeEvalConfig,
    variation: str,
    progress=False,
    replays: list[Replay] | None = None,
) -> np.ndarray:
    """Roll out every state ``cfg.rollouts`` times at ``sigma`` in ``env`` (S * K sub-envs, module
    docstring); returns the (S, K) bool success array; ``replays``: append the rows to film to it."""
    s, k = cfg.states, cfg.rollouts
    if env.num_envs != s * k:
        raise ValueError(f"BatchedCube of {env.num_envs} sub-envs; eval needs states * rollouts = {s * k}")
    _check_policy(policy, env.config, cfg)
    env.reset(seeds=np.repeat(state_seeds(cfg, variation), k))
    # the same noise stream for every sigma (common random numbers across the sigma sweep)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + VARIATIONS.index(variation))
    sample = policy_sampler(policy, sigma, gen, cfg.sample_steps)
    desc = f"eval {variation} sigma={sigma:g}"
    paths = None if replays is None else [[env.scene(row)] for row in range(env.num_envs)]

    def record(rows: np.ndarray) -> None:
        for row in rows:
            paths[row].append(env.scene(row))

    goals = env.goal.copy()
    with tqdm(desc=desc, total=env.num_envs, disable=not progress, leave=False) as bar:
        success = rollout(
            env, sample, cfg.exec_horizon, on_step=None if paths is None else record, on_done=bar.update
        )
    if paths is not None:
        replays += _replays(success, paths, goals, variation, sigma, k)
    return success.reshape(s, k)


def _replays(success, paths, goals, variation: str, sigma: float, k: int) -> list[Replay]:
    """The first REPLAYS_PER_OUTCOME successful and failed rows (row order) as replays of their qpos."""
    chosen = []
    for wanted, word in ((True, "success"), (False, "failure")):
        for row in np.flatnonzero(success == wanted)[:REPLAYS_PER_OUTCOME]:
            state, rollout_k = divmod(int(row), k)
            label = f"{variation}_sigma_{sigma:g}_state_{state}_rollout_{rollout_k}_{word}"
            title = f"{variation} s{sigma:g} st{state} r{rollout_k} {'ok' if wanted else 'fail'}"
            path = np.stack(paths[row])
            chosen.append(
                Replay(label, wanted, path, goals[row], group=f"{variation}_sigma_{sigma:g}", title=title)
            )
    return chosen


def evaluate_cube(
    policy: CSPPolicy,
    cube: CubeConfig,
    cfg: CubeEvalConfig,
    progress: bool = True,
    replays: list[Replay] | None = None,
) -> dict[tuple[str, float], np.ndarray]:
    """(variation, sigma) -> (S, K) success of the policy's rollouts from each variation's fixed states.

    ``cube`` is the run's ``demos.cube`` (cameras, cloud size); its variation and time limit are replaced.
    ``replays``: a list to append the rows to film to (module docstring).
    """
    _check_policy(policy, cube, cfg)
    policy.eval()
    results = {}
    for variation in cfg.variations:
        env = BatchedCube(eval_cube_config(cube, cfg, variation), cfg.states * cfg.rollouts, seed=cfg.seed)
        try:
            for sigma in cfg.sigmas:
                results[variation, sigma] = rollout_states(
                    policy, env, sigma, cfg, variation, progress, replays
                )
        finally:
            env.close()
    return results


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


def plot_success_at_k(
    results: dict[tuple[str, float], np.ndarray], path: str | Path, env: str = "cube-single"
) -> Path:
    """One panel per variation: Success@K against sigma, one line per K (1, 2, 4, ..., K_max); ``env`` names
    the task in the title."""
    plt = pyplot()
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
    fig.suptitle(f"zero-shot on {env}: Success@K")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
