"""Demonstrations as high-level chunk transitions, for RLPD-style offline mixing (METHOD.md section 2).

RLPD fills half of each replay batch with demonstration data, so a demo transition must mean exactly
what an online ``ChunkEnv`` transition means: same keys, dtypes and shapes, same reward, discount
(``env_steps``) and termination semantics. Only the raw-action methods (SAC/RLPD) can use them: the demos
carry the low-level actions that were executed, never the latent (z, sigma, eps_c) that would have
produced them, so a demo's high-level action is the raw chunk itself, flattened action-major exactly as
``app.envs.torchrl_envs.RawDecoder`` reads it back (``flat.reshape(N, H, d_a)``).

One demo transition, exec_horizon H = 4 (o_t = stored observation row t, a_t = action taken at o_t)::

    row          t      t+1    t+2    t+3    t+4
    executed     a_t    a_t+1  a_t+2  a_t+3          action = [a_t .. a_t+3] flat, (4 * d_a,)
    reached             o_t+1  o_t+2  o_t+3  o_t+4   success at step k <=> |o_t+k+1[goal] - goal| <= tol
    no success                               next    env_steps = 4, reward 0, not terminated

    success right after a_t+1 (k = 1):
    executed     a_t    a_t+1
    dropped                    a_t+2  a_t+3          never executed, still stored in "action" (below)
    reached             o_t+1  o_t+2                 next = o_t+2, env_steps = 2, reward = success_reward,
                                                     terminated = done = success = True

The stored action keeps all H actions even when the chunk stops early: online, ChunkEnv stores the
high-level action the agent CHOSE (the whole chunk) and silently drops its unexecuted tail, and the critic
learns Q(s, chunk) for that whole chunk. Storing the demo's real continuation is the natural filler: the
tail never affects the transition, exactly as online.

The last action of an episode has no stored next state (OGBench records no state after it), so a
window ending at the episode's end is dropped, UNLESS success occurs before its last action: then every
state the transition needs is stored, and those rare successful windows are the reward signal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import ReplayBuffer

from datamodules.episodes import EpisodeStore
from modules.nets.keys import ACTION, GOAL, OBS
from modules.tmrl.loss import ENV_STEPS, NEXT, REWARD, TERMINATED

# ChunkEnv's remaining flag names (TorchRL's own)
SUCCESS, TRUNCATED, DONE = "success", "truncated", "done"


def _check_int(name: str, value: object, who: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{who}: {name}={value!r}; expected an integer >= 1")
    return int(value)


def _read_store(store: EpisodeStore) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Observations (N, d_o) float32, actions (N, d_a) float32 and the goal indices, all checked."""
    missing = [key for key in (OBS, ACTION) if key not in store.keys]
    if missing:
        raise KeyError(f"episode store {store.path} has no {missing} (its keys are {store.keys})")
    goal_indices = store.attrs.get("goal_indices")
    if goal_indices is None:
        raise KeyError(
            f"episode store {store.path} has no 'goal_indices' attribute: success cannot be computed "
            "without knowing which observation dims are the position"
        )
    obs = store.load(OBS).astype(np.float32, copy=False)
    act = store.load(ACTION).astype(np.float32, copy=False)
    if obs.ndim != 2 or act.ndim != 2:
        raise ValueError(
            f"episode store {store.path}: expected flat per-step '{OBS}' and '{ACTION}', got shapes "
            f"{obs.shape[1:]} and {act.shape[1:]}"
        )
    bad = isinstance(goal_indices, bool | str) or not isinstance(goal_indices, Sequence)
    if (
        bad
        or not goal_indices
        or any(not isinstance(i, int) or not 0 <= i < obs.shape[1] for i in goal_indices)
    ):
        raise ValueError(
            f"episode store {store.path}: goal_indices={goal_indices!r}; expected a non-empty list of "
            f"observation dims in [0, {obs.shape[1]})"
        )
    return obs, act, list(goal_indices)


def _windows(starts: np.ndarray, ends: np.ndarray, horizon: int, stride: int) -> tuple[np.ndarray, ...]:
    """First rows (M,) of every H-step window inside one episode, and that episode's end row (M,)."""
    first, end = [], []
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        t = np.arange(s, e - horizon + 1, stride, dtype=np.int64)  # empty for an episode shorter than H
        first.append(t)
        end.append(np.full(len(t), e, np.int64))
    return np.concatenate(first), np.concatenate(end)


def demo_chunks(
    store: EpisodeStore,
    goal: np.ndarray,
    goal_tol: float,
    exec_horizon: int,
    success_reward: float = 1.0,
    stride: int | None = None,
) -> TensorDict:
    """Every H-step window of every demonstration, as a ChunkEnv transition toward ``goal``.

    Args:
        store: demonstrations with per-step ``observation`` (N, d_o) and ``action`` (N, d_a) and a
            ``goal_indices`` attribute (the observation dims compared with the goal).
        goal: (d_g,) the TARGET task's goal, d_g = len(goal_indices); the demos are relabelled to it.
        goal_tol: success <=> ||obs[goal_indices] - goal|| <= goal_tol (OGBench point maze: 1.0).
        exec_horizon: H, actions per transition (the online ChunkEnv's exec_horizon).
        success_reward: the reward of a transition that reaches the goal (OGBench: 1.0 per success step,
            and a chunk stops at its first one, so the online chunk reward is exactly this).
        stride: rows between the starts of consecutive windows; None = H (non-overlapping).

    Returns:
        TensorDict, batch [M], keys (float32 unless noted): ``observation`` (M, d_o), ``goal`` (M, d_g),
        ``action`` (M, H * d_a) in [-1, 1], action-major; under ``next``: ``observation``, ``goal``,
        ``reward`` (M, 1), bool (M, 1) ``terminated`` = ``done`` = ``success``, ``truncated`` (always
        False: demos have no time limit) and int64 ``env_steps`` (M, 1).

    Raises:
        KeyError: the store lacks ``observation``/``action`` or the ``goal_indices`` attribute.
        ValueError: goal of the wrong size, exec_horizon/stride < 1, goal_tol < 0, or no window fits.
    """
    horizon = _check_int("exec_horizon", exec_horizon, "demo_chunks")
    stride = horizon if stride is None else _check_int("stride", stride, "demo_chunks")
    if not (isinstance(goal_tol, Real) and math.isfinite(goal_tol) and goal_tol >= 0):
        raise ValueError(f"demo_chunks: goal_tol={goal_tol!r}; expected a finite number >= 0")
    obs, act, goal_indices = _read_store(store)
    goal = np.asarray(goal, dtype=np.float32)
    if goal.shape != (len(goal_indices),):
        raise ValueError(
            f"demo_chunks: goal has shape {goal.shape}; expected ({len(goal_indices)},) to match "
            f"goal_indices={goal_indices} of {store.path}"
        )

    first, ep_end = _windows(store.episode_starts, store.episode_ends, horizon, stride)  # (M0,), (M0,)
    reached = first[:, None] + np.arange(1, horizon + 1)  # (M0, H) row of the state after action k
    stored = reached < ep_end[:, None]  # (M0, H) the episode's last action has no stored next state
    pos = obs[:, goal_indices][np.minimum(reached, len(obs) - 1)]  # (M0, H, d_g), clipped rows masked below
    hit = stored & (np.linalg.norm(pos - goal, axis=-1) <= goal_tol)  # (M0, H)
    success = hit.any(axis=1)  # (M0,)
    keep = success | stored[:, -1]  # a window with no next state is kept only if it succeeds before
    first, hit, success = first[keep], hit[keep], success[keep]
    if len(first) == 0:
        raise ValueError(
            f"demo_chunks: no window of exec_horizon={horizon} steps (plus a next state) fits in any of the "
            f"{store.num_episodes} episodes of {store.path}"
        )
    env_steps = np.where(success, hit.argmax(axis=1) + 1, horizon)  # (M,) argmax = FIRST success
    rows = first[:, None] + np.arange(horizon)  # (M, H) rows of the H actions
    m = len(first)
    action = np.clip(act[rows], -1.0, 1.0).reshape(m, horizon * act.shape[1])  # (M, H * d_a) action-major

    def col(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:  # (M,) -> (M, 1)
        return torch.as_tensor(a, dtype=dtype).reshape(m, 1)

    goal_t = torch.from_numpy(goal)
    flag = col(success, torch.bool)
    nxt = {
        OBS: torch.from_numpy(obs[first + env_steps]),  # (M, d_o): fancy indexing copies
        GOAL: goal_t.expand(m, -1).clone(),  # (M, d_g)
        REWARD: col(np.where(success, success_reward, 0.0), torch.float32),
        TERMINATED: flag,
        TRUNCATED: torch.zeros(m, 1, dtype=torch.bool),
        DONE: flag.clone(),
        SUCCESS: flag.clone(),
        ENV_STEPS: col(env_steps, torch.int64),
    }
    root = {
        OBS: torch.from_numpy(obs[first]),  # (M, d_o)
        GOAL: goal_t.expand(m, -1).clone(),  # (M, d_g)
        ACTION: torch.from_numpy(np.ascontiguousarray(action, dtype=np.float32)),
        NEXT: TensorDict(nxt, batch_size=[m]),
    }
    return TensorDict(root, batch_size=[m])


def mixed_sample(
    online: ReplayBuffer,
    offline: TensorDictBase,
    batch_size: int,
    offline_fraction: float = 0.5,
    generator: torch.Generator | None = None,
) -> TensorDict:
    """One RLPD batch: ``round(batch_size * offline_fraction)`` demo transitions, the rest online.

    The offline rows are drawn uniformly with replacement using ``generator``; the online rows come from
    ``online.sample(n)`` (its own sampler and RNG). Only the keys present in both are kept (e.g. the
    collector's bookkeeping is dropped), and the result is ``[online rows, offline rows]`` on the online
    data's device. Python's ``round`` rounds halves to even (batch 5 at 0.5 takes 2 offline rows).

    Raises:
        ValueError: batch_size < 1, offline_fraction outside [0, 1], an empty source that is needed, or a
            shared key whose per-row shape or dtype differs (e.g. a latent-action method's online actions
            against the demos' raw chunks: demos only fit the raw-action methods).
    """
    batch_size = _check_int("batch_size", batch_size, "mixed_sample")
    if not (isinstance(offline_fraction, Real) and 0.0 <= offline_fraction <= 1.0):
        raise ValueError(f"mixed_sample: offline_fraction={offline_fraction!r}; expected a number in [0, 1]")
    n_off = round(batch_size * offline_fraction)
    n_on = batch_size - n_off
    if len(online) == 0:
        # even with n_on = 0 the online buffer defines which keys the batch keeps
        raise ValueError("mixed_sample: the online replay buffer is empty")
    if n_off and offline.batch_size[0] == 0:
        raise ValueError("mixed_sample: the offline TensorDict is empty")
    on = online.sample(n_on)  # (n_on,); sample(0) still carries the keys
    idx = torch.randint(offline.batch_size[0], (n_off,), generator=generator)
    off = offline[idx]  # (n_off,)
    on_keys = set(on.keys(include_nested=True, leaves_only=True))
    keys = [k for k in off.keys(include_nested=True, leaves_only=True) if k in on_keys]
    on, off = on.select(*keys), off.select(*keys)
    for key in keys:
        a, b = on.get(key), off.get(key)
        if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
            raise ValueError(
                f"mixed_sample: key {key!r} is {tuple(a.shape[1:])} {a.dtype} online but "
                f"{tuple(b.shape[1:])} {b.dtype} offline (demo chunks only fit raw-action methods)"
            )
    if on.device is not None:
        off = off.to(on.device)
    return torch.cat([on, off], dim=0)
