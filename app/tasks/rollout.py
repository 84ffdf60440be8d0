"""The ONE open-loop chunk rollout: every evaluator and TMRL's ``ChunkEnv`` execute chunks through it.

Timeline of one sub-env (exec_horizon H = 4, chunk length L = 8; o_t = observation after t actions)::

    low-level t   0    1    2    3    4    5    6    7
    chunk         c0   c1   c2   c3   c4   c5   c6   c7    sampled at o_0 (one batched call for all rows)
    executed      c0   c1   c2   c3                        open loop; reward = sum of their rewards
    dropped                           c4   c5   c6   c7    the tail is never executed
    next obs                          o_4                  steps = 4; the next chunk starts at o_4

    early stop: success (terminated) or the time limit (truncated) right after c1
    executed      c0   c1
    dropped                 c2   c3   ...                  the rest of this chunk is dropped
    next obs                o_2                            steps = 2: the TRUE final observation
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from app.tasks.base import Backend
from modules.nets.policy import CSPPolicy

# (observations of the live rows, their row indices) -> chunk (B, >= H, d_a) of raw actions
Sampler = Callable[[dict[str, np.ndarray], np.ndarray], np.ndarray]


def run_chunk(
    backend: Backend,
    chunk: np.ndarray,
    live: np.ndarray,
    on_step: Callable[[np.ndarray], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Execute ``chunk`` (N, H, d_a) open loop on the rows where ``live`` (N,) is True, each row stopping
    at its episode's end (the rest of its chunk is dropped).

    ``live`` is updated in place (rows that finished are cleared); ``on_step(rows)`` is called after each
    low-level step with the rows just stepped. Returns (reward (N,) float32, the sum of each row's rewards;
    steps (N,) int64, the real env steps each row ran); rows not live get 0 and 0.
    """
    n = backend.num_envs
    if chunk.ndim != 3 or chunk.shape[0] != n or chunk.shape[2] != backend.action_dim:
        raise ValueError(f"chunk has shape {chunk.shape}; expected ({n}, H, {backend.action_dim})")
    reward, steps = np.zeros(n, np.float32), np.zeros(n, np.int64)
    for t in range(chunk.shape[1]):
        if not live.any():
            break
        rows = live.copy()
        out = backend.step(chunk[:, t], rows)
        reward[rows] += out["reward"][rows]
        steps[rows] += 1
        if on_step is not None:
            on_step(np.flatnonzero(rows))
        live &= ~(out["terminated"] | out["truncated"])
    return reward, steps


def rollout(
    backend: Backend,
    sample: Sampler,
    exec_horizon: int,
    on_step: Callable[[np.ndarray], None] | None = None,
    on_done: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Run every row of a freshly reset ``backend`` to the end of its episode: per round, ``sample`` one
    chunk for all live rows at once, then execute its first ``exec_horizon`` actions (``run_chunk``).

    ``on_done(k)`` is called with the number of rows that finished in each round (progress bars).
    Returns a copy of ``success`` (N,) bool.
    """
    live = ~(backend.terminated | backend.truncated)
    chunk = np.zeros((backend.num_envs, exec_horizon, backend.action_dim), np.float32)
    while live.any():
        idx = np.flatnonzero(live)
        obs = {key: value[idx] for key, value in backend.observe(live).items()}
        actions = np.asarray(sample(obs, idx))
        if actions.ndim != 3 or actions.shape[0] != len(idx) or actions.shape[1] < exec_horizon:
            raise ValueError(
                f"the sampler returned actions of shape {actions.shape}; expected ({len(idx)}, >= "
                f"{exec_horizon}, {backend.action_dim})"
            )
        chunk[idx] = actions[:, :exec_horizon]
        before = int(live.sum())
        run_chunk(backend, chunk, live, on_step)
        if on_done is not None:
            on_done(before - int(live.sum()))
    return backend.success.copy()


def policy_sampler(policy: CSPPolicy, sigma: float, generator: torch.Generator, steps: int) -> Sampler:
    """A ``Sampler`` of the CSP policy at ``sigma``: per call, fresh z (B, L, d_a) and eps_c (B, d_c) from
    ``generator`` (CPU), so a seeded generator gives the same noise stream to every evaluation."""
    device = next(policy.parameters()).device

    @torch.no_grad()
    def sample(obs: dict[str, np.ndarray], idx: np.ndarray) -> np.ndarray:
        batch = {key: torch.from_numpy(obs[key]).to(device) for key in policy.input_keys}
        z = torch.randn((len(idx), policy.cfg.chunk_len, policy.action_dim), generator=generator)
        eps_c = torch.randn((len(idx), policy.context_dim), generator=generator)
        noise = dict(action_noise=z.to(device), context_noise=eps_c.to(device))
        return policy.sample(batch, sigma, steps=steps, **noise).cpu().numpy()

    return sample
