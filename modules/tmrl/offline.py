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

The demonstrations come as plain arrays (the app reads them from its episode store), so this module
depends on no data-loading code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import ReplayBuffer

from modules.nets.keys import (
    ACTION,
    DONE,
    ENV_STEPS,
    GOAL,
    NEXT,
    OBS,
    REWARD,
    SUCCESS,
    TERMINATED,
    TRUNCATED,
)


def _check_int(name: str, value: object, who: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{who}: {name}={value!r}; expected an integer >= 1")
    return int(value)


def _check_demos(
    observation: np.ndarray,
    action: np.ndarray,
    episode_ends: np.ndarray,
    goal_indices: Sequence[int],
    source: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Observations (N, d_o) float32, actions (N, d_a) float32, episode ends (E,) int64 and the goal
    indices, all checked."""
    obs = np.asarray(observation, dtype=np.float32)
    act = np.asarray(action, dtype=np.float32)
    if obs.ndim != 2 or act.ndim != 2:
        raise ValueError(
            f"{source}: expected flat per-step '{OBS}' and '{ACTION}', got shapes "
            f"{obs.shape[1:]} and {act.shape[1:]}"
        )
    ends = np.asarray(episode_ends)
    if (
        len(act) != len(obs)
        or ends.ndim != 1
        or len(ends) == 0
        or not np.issubdtype(ends.dtype, np.integer)
        or ends[-1] != len(obs)
        or bool((np.diff(ends, prepend=0) < 0).any())
    ):
        raise ValueError(
            f"{source}: episode_ends={ends!r} with {len(obs)} observation and {len(act)} action rows; "
            "expected equal row counts and a non-empty, non-decreasing 1-D integer array ending at the "
            "row count"
        )
    bad = isinstance(goal_indices, bool | str) or not isinstance(goal_indices, Sequence)
    if (
        bad
        or not goal_indices
        or any(not isinstance(i, int) or not 0 <= i < obs.shape[1] for i in goal_indices)
    ):
        raise ValueError(
            f"{source}: goal_indices={goal_indices!r}; expected a non-empty list of "
            f"observation dims in [0, {obs.shape[1]})"
        )
    return obs, act, ends.astype(np.int64, copy=False), list(goal_indices)


def _windows(starts: np.ndarray, ends: np.ndarray, horizon: int, stride: int) -> tuple[np.ndarray, ...]:
    """First rows (M,) of every H-step window inside one episode, and that episode's end row (M,)."""
    first, end = [], []
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        t = np.arange(s, e - horizon + 1, stride, dtype=np.int64)  # empty for an episode shorter than H
        first.append(t)
        end.append(np.full(len(t), e, np.int64))
    return np.concatenate(first), np.concatenate(end)


def demo_chunks(
    observation: np.ndarray,
    action: np.ndarray,
    episode_ends: np.ndarray,
    goal_indices: Sequence[int],
    goal: np.ndarray,
    goal_tol: float,
    exec_horizon: int,
    success_reward: float = 1.0,
    stride: int | None = None,
    source: str = "demonstrations",
) -> TensorDict:
    """Every H-step window of every demonstration, as a ChunkEnv transition toward ``goal``.

    Args:
        observation: (N, d_o) per-step observations of all episodes, one after the other.
        action: (N, d_a) the action taken at each observation (clipped to [-1, 1] here).
        episode_ends: (E,) int, EXCLUSIVE end row of each episode; episode i spans rows
            [episode_ends[i-1], episode_ends[i]) (start 0 for i = 0), the last ends at N.
        goal_indices: the observation dims compared with the goal (e.g. the x, y position).
        goal: (d_g,) the TARGET task's goal, d_g = len(goal_indices); the demos are relabelled to it.
        goal_tol: success <=> ||obs[goal_indices] - goal|| <= goal_tol (OGBench point maze: 1.0).
        exec_horizon: H, actions per transition (the online ChunkEnv's exec_horizon).
        success_reward: the reward of a transition that reaches the goal (OGBench: 1.0 per success step,
            and a chunk stops at its first one, so the online chunk reward is exactly this).
        stride: rows between the starts of consecutive windows; None = H (non-overlapping).
        source: what the demonstrations are, for error messages (e.g. "episode store <path>").

    Returns:
        TensorDict, batch [M], keys (float32 unless noted): ``observation`` (M, d_o), ``goal`` (M, d_g),
        ``action`` (M, H * d_a) in [-1, 1], action-major; under ``next``: ``observation``, ``goal``,
        ``reward`` (M, 1), bool (M, 1) ``terminated`` = ``done`` = ``success``, ``truncated`` (always
        False: demos have no time limit) and int64 ``env_steps`` (M, 1).

    Raises:
        ValueError: non-flat or mismatched arrays, bad episode ends or goal indices, goal of the wrong
            size, exec_horizon/stride < 1, goal_tol < 0, or no window fits.
    """
    horizon = _check_int("exec_horizon", exec_horizon, "demo_chunks")
    stride = horizon if stride is None else _check_int("stride", stride, "demo_chunks")
    if not (isinstance(goal_tol, Real) and math.isfinite(goal_tol) and goal_tol >= 0):
        raise ValueError(f"demo_chunks: goal_tol={goal_tol!r}; expected a finite number >= 0")
    obs, act, ends, goal_indices = _check_demos(observation, action, episode_ends, goal_indices, source)
    goal = np.asarray(goal, dtype=np.float32)
    if goal.shape != (len(goal_indices),):
        raise ValueError(
            f"demo_chunks: goal has shape {goal.shape}; expected ({len(goal_indices)},) to match "
            f"goal_indices={goal_indices} of {source}"
        )

    starts = np.concatenate([[0], ends[:-1]])  # (E,) first row of each episode
    first, ep_end = _windows(starts, ends, horizon, stride)  # (M0,), (M0,)
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
            f"{len(ends)} episodes of {source}"
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
