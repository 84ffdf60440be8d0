"""Tasks as TorchRL environments: a task's low-level ``StepEnv`` and TMRL's high-level ``ChunkEnv``.

Both hold N sub-envs of a task's backend (``app.tasks``) in one process (batch_size [N], float32 tensors on
the CPU) and accept partial resets through the ``RESET`` mask a collector passes. Keys (modules/nets/keys.py):
``OBS`` (N, d_o), ``GOAL`` (N, d_g) and ``SUCCESS`` (N, 1) bool in the observation spec (so they appear
under ``NEXT``), ``REWARD`` (N, 1) and ``DONE``/``TERMINATED``/``TRUNCATED`` (N, 1) bool. ChunkEnv adds
``ENV_STEPS`` (N, 1) int64 and, when its decoder has a feature view of a high-dimensional context (a point
cloud), ``CONTEXT_FEATURE`` (N, F): the frozen policy's features of the clean context, rendered once per
chunk; the context itself stays inside the env.

A decoder (app/envs/decoders.py) turns ChunkEnv's flat high-level action into a chunk of low-level actions;
the chunk runs through ``app.tasks.rollout.run_chunk``, the one open-loop chunk loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

from app.envs.decoders import BasePolicyDecoder, ChunkDecoder, RawDecoder, ZeroShotDecoder
from app.methods import METHODS
from app.tasks.base import Backend
from app.tasks.registry import TaskConfig
from app.tasks.rollout import run_chunk
from modules.nets.keys import (
    ACTION,
    CONTEXT_FEATURE,
    DONE,
    ENV_STEPS,
    GOAL,
    OBS,
    RESET,
    REWARD,
    SUCCESS,
    TERMINATED,
    TRUNCATED,
)
from modules.nets.policy import CSPPolicy


def _set_specs(
    env: EnvBase, backend: Backend, action_dim: int, exec_horizon: int | None, feature_dim: int = 0
) -> None:
    """Observation (+ success, + env_steps for chunks, + CONTEXT_FEATURE), action, reward and done specs."""
    n = backend.num_envs
    flag = Categorical(2, shape=(n, 1), dtype=torch.bool)
    obs = {
        OBS: Unbounded(shape=(n, backend.obs_dim), dtype=torch.float32),
        GOAL: Unbounded(shape=(n, backend.goal_dim), dtype=torch.float32),
        SUCCESS: flag.clone(),
    }
    if exec_horizon is not None:
        obs[ENV_STEPS] = Bounded(0, exec_horizon, shape=(n, 1), dtype=torch.int64)
    if feature_dim:
        obs[CONTEXT_FEATURE] = Unbounded(shape=(n, feature_dim), dtype=torch.float32)
    env.observation_spec = Composite(obs, shape=(n,))
    env.action_spec = Bounded(-1.0, 1.0, shape=(n, action_dim), dtype=torch.float32)
    env.reward_spec = Unbounded(shape=(n, 1), dtype=torch.float32)
    env.full_done_spec = Composite(
        done=flag.clone(), terminated=flag.clone(), truncated=flag.clone(), shape=(n,)
    )


def _state_td(backend: Backend, **extra: np.ndarray) -> TensorDict:
    """Every sub-env's latest observation and flags (copied: the backend's arrays change in place)."""

    def col(a: np.ndarray) -> Tensor:  # (N,) -> (N, 1)
        return torch.from_numpy(a.copy()).unsqueeze(-1)

    done = backend.terminated | backend.truncated
    data = {
        OBS: torch.from_numpy(backend.observation.copy()),
        GOAL: torch.from_numpy(backend.goal.copy()),
        SUCCESS: col(backend.success),
        TERMINATED: col(backend.terminated),
        TRUNCATED: col(backend.truncated),
        DONE: col(done),
    }
    data.update({k: col(v) for k, v in extra.items()})
    return TensorDict(data, batch_size=[backend.num_envs])


def _reset_mask(tensordict: TensorDictBase | None, n: int) -> np.ndarray | None:
    """The collector's ``"_reset"`` (N, 1) mask as (N,) bool numpy, or None (reset all)."""
    if tensordict is None or RESET not in tensordict.keys():
        return None
    return tensordict.get(RESET).reshape(n).cpu().numpy()


class StepEnv(EnvBase):
    """A task's low-level env: one environment step per TorchRL step, action Bounded(-1, 1, (N, d_a)).

    Args:
        task: the target task (maze start and goal cells, or cube variation; the time limit).
        num_envs: N sub-envs, stepped together in this process.
        seed: seed of the start/goal draws (``set_seed`` re-seeds it).
        sensor: the sensor settings a task with one needs (a policy's ``sensor``).
    """

    def __init__(
        self, task: TaskConfig, num_envs: int, seed: int = 0, sensor: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(batch_size=torch.Size([num_envs]), device="cpu")
        self.backend = task.task.make_backend(task, num_envs, seed, sensor or {})
        _set_specs(self, self.backend, self.backend.action_dim, exec_horizon=None)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDictBase:
        self.backend.reset(_reset_mask(tensordict, self.backend.num_envs))
        return _state_td(self.backend)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get("action").detach().cpu().numpy()  # (N, d_a)
        out = self.backend.step(action, np.ones(self.backend.num_envs, bool))
        return _state_td(self.backend).set(REWARD, torch.from_numpy(out[REWARD]).unsqueeze(-1))

    def _set_seed(self, seed: int | None) -> None:
        self.backend.seed(seed)


class ChunkEnv(EnvBase):
    """TMRL's high-level env: one TorchRL step = one decoded chunk, its first ``exec_horizon`` actions run.

    Timeline of one sub-env (exec_horizon H = 4, chunk length L = 8; o_t = observation after t actions)::

        low-level t   0    1    2    3    4    5    6    7
        chunk         c0   c1   c2   c3   c4   c5   c6   c7    decoder(a, o_0, goal): one batched call
        executed      c0   c1   c2   c3                        open loop; reward = sum of their 4 rewards
        dropped                           c4   c5   c6   c7    the tail is never executed
        next obs                          o_4                  env_steps = 4; the next chunk starts at o_4

        early stop: success (terminated) or max_steps (truncated) right after c1
        executed      c0   c1
        dropped                 c2   c3   c4   ...       c7    the rest of this chunk is dropped
        next obs                o_2                            env_steps = 2, done: the TRUE final obs
        reset         only later, in _reset, when the collector passes "_reset" (never inside _step)

    Args:
        task: the target task (maze start and goal cells, or cube variation; the low-level time limit).
        num_envs: N sub-envs decoded in one batch.
        decoder: flat action (N, D) in [-1, 1] -> chunk (N, >= exec_horizon, d_a); see ``make_chunk_env``.
        exec_horizon: H, low-level actions executed per high-level step.
        seed: seed of the start/goal draws.
        sensor: the sensor settings of the policy behind the decoder (its ``sensor``), for tasks with one.
        backend: the sub-envs of another ChunkEnv of ``num_envs`` to step instead of making new ones, for
            envs that are never stepped at the same time (a rendered cube sub-env holds ~330 MB: its
            MuJoCo model, data and renderer); seeding and resetting either env reseeds and resets both.
    """

    def __init__(
        self,
        task: TaskConfig,
        num_envs: int,
        decoder: ChunkDecoder,
        exec_horizon: int,
        seed: int = 0,
        sensor: Mapping[str, Any] | None = None,
        backend: Any = None,
    ) -> None:
        if isinstance(exec_horizon, bool) or not isinstance(exec_horizon, int) or exec_horizon < 1:
            raise ValueError(f"ChunkEnv exec_horizon={exec_horizon!r}; expected an integer >= 1")
        if exec_horizon > decoder.chunk_len:
            raise ValueError(
                f"ChunkEnv exec_horizon={exec_horizon} exceeds the decoder's chunk length {decoder.chunk_len}"
            )
        super().__init__(batch_size=torch.Size([num_envs]), device="cpu")
        if backend is not None and backend.num_envs != num_envs:
            have = backend.num_envs
            raise ValueError(f"ChunkEnv num_envs={num_envs} but the shared backend has {have} sub-envs")
        if backend is None:
            backend = task.task.make_backend(task, num_envs, seed, sensor or {})
        self.backend = backend
        if decoder.env_action_dim != self.backend.action_dim:
            want = self.backend.action_dim
            raise ValueError(f"decoder makes {decoder.env_action_dim}-d actions; {task.env} expects {want}")
        self.decoder, self.exec_horizon = decoder, exec_horizon
        self.feature_dim = decoder.feature_dim  # the agent's view of a high-dimensional context; 0: none
        self._env_steps = np.zeros(num_envs, np.int64)  # real env steps of each sub-env's last chunk
        _set_specs(self, self.backend, decoder.action_dim, exec_horizon, self.feature_dim)

    def _observation(self, rows: np.ndarray | None = None) -> dict[str, Tensor]:
        """What the decoder reads: the backend's observation (a sensor's rendered for ``rows`` if stale)."""
        return {key: torch.from_numpy(value) for key, value in self.backend.observe(rows).items()}

    def _state(self, rows: np.ndarray | None = None) -> TensorDict:
        """The TorchRL observation; with a feature view it observes ``rows`` for CONTEXT_FEATURE."""
        td = _state_td(self.backend, **{ENV_STEPS: self._env_steps})
        if self.feature_dim:
            td.set(CONTEXT_FEATURE, self.decoder.features(self._observation(rows)))
        return td

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDictBase:
        mask = _reset_mask(tensordict, self.backend.num_envs)
        self.backend.reset(mask)
        self._env_steps[slice(None) if mask is None else mask] = 0
        return self._state()

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        b, n = self.backend, self.backend.num_envs
        chunk = self.decoder(tensordict.get(ACTION), self._observation())  # (N, L, d_a)
        bad_shape = chunk.ndim != 3 or chunk.shape[0] != n or chunk.shape[2] != b.action_dim
        if bad_shape or chunk.shape[1] < self.exec_horizon:
            raise ValueError(
                f"decoder returned a chunk of shape {tuple(chunk.shape)}; expected ({n}, >= "
                f"{self.exec_horizon}, {b.action_dim})"
            )
        chunk = chunk[:, : self.exec_horizon].detach().cpu().numpy()  # (N, H, d_a)
        reward, self._env_steps[:] = run_chunk(b, chunk, np.ones(n, bool))
        # a terminated sub-env's next state is never bootstrapped from: its sensor need not be rendered
        td = self._state(rows=~b.terminated)
        return td.set(REWARD, torch.from_numpy(reward).unsqueeze(-1))

    def _set_seed(self, seed: int | None) -> None:
        self.backend.seed(seed)


def make_chunk_env(
    task: TaskConfig,
    num_envs: int,
    policy: CSPPolicy | None,
    method: str,
    exec_horizon: int,
    seed: int = 0,
    sensor: Mapping[str, Any] | None = None,
    **decoder_kw: Any,
) -> ChunkEnv:
    """ChunkEnv with the decoder of ``method`` (one of ``METHODS``).

    ``decoder_kw`` go to :class:`BasePolicyDecoder` (sigma_max, fixed_sigma, eps_bound, z_mode, z_map,
    steps); a method's own settings win (dsrl always runs at sigma = 0). For "sac" the policy and
    ``decoder_kw`` are not used.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    layout = METHODS[method]
    if layout is None:
        decoder: ChunkDecoder = RawDecoder(exec_horizon, task.task.target_dims(task)[1])
    else:
        if policy is None:
            raise ValueError(f"method {method!r} needs the pre-trained policy; got policy=None")
        if "heads" in decoder_kw:
            raise ValueError(f"decoder_kw may not set 'heads': method {method!r} fixes {layout['heads']}")
        decoder = BasePolicyDecoder(policy, **{**decoder_kw, **layout})
    return ChunkEnv(task, num_envs, decoder, exec_horizon, seed, sensor)


def make_zero_shot_env(
    task: TaskConfig,
    num_envs: int,
    policy: CSPPolicy,
    exec_horizon: int,
    seed: int = 0,
    sensor: Mapping[str, Any] | None = None,
    steps: int | None = None,
    sigma: float = 0.0,
    backend: Any = None,
) -> ChunkEnv:
    """ChunkEnv that runs the base policy alone (``ZeroShotDecoder`` at ``sigma``): with the eval env's seed
    it rolls out the same fixed episodes, so its success is the base's zero-shot success on them;
    ``backend``: the eval env's sub-envs, to step those instead of making more (see ``ChunkEnv``)."""
    decoder = ZeroShotDecoder(policy, steps, sigma)
    return ChunkEnv(task, num_envs, decoder, exec_horizon, seed, sensor, backend=backend)
