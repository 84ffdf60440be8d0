"""OGBench tasks as TorchRL environments: the low-level maze ``MazeEnv`` and TMRL's high-level ``ChunkEnv``.

Both hold N sub-envs in one process (batch_size [N], float32 tensors on the CPU) and accept partial resets
through the ``"_reset"`` mask a collector passes. Keys: ``OBS`` (N, d_o), ``GOAL`` (N, d_g) and ``"success"``
(N, 1) bool in the observation spec (so they appear under ``"next"``), ``"reward"`` (N, 1) and
``"done"``/``"terminated"``/``"truncated"`` (N, 1) bool. ChunkEnv adds ``"env_steps"`` (N, 1) int64.

ChunkEnv runs a maze (``BatchedMaze``) or the point-cloud cube (``BatchedCube``). On the cube the clouds
stay inside the env: they are rendered once per chunk, for the decoder, and the agent sees
``CONTEXT_FEATURE`` (N, F) instead, the frozen policy's PointNet features of the clean cloud.

A decoder turns ChunkEnv's flat high-level action into a chunk of low-level actions: ``BasePolicyDecoder``
through the frozen CSP policy (TMRL, fixed-sigma ablation, DSRL), ``RawDecoder`` as the chunk itself (SAC).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Protocol

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

from app.envs.batched_cube import BatchedCube
from app.envs.batched_maze import BatchedMaze, TaskConfig, maze_dims
from app.envs.cube import CubeConfig
from modules.nets.keys import CONTEXT_FEATURE, GOAL, OBS, POINTCLOUD
from modules.nets.policy import CSPPolicy

HEADS = ("z", "sigma", "eps_c")  # the parts of the high-level action a layout may hold
Z_MODES = ("repeat", "full")
Z_MAPS = ("atanh", "erfinv", "linear")
EPS_MAPS = ("atanh", "linear")
_ERFINV_CLIP = 1.0 - 1e-6  # erfinv(+-1) is infinite; the clip caps |z| at about 4.9


def _atanh(u: Tensor, bound: float) -> Tensor:
    """atanh(u) clipped to [-bound, bound]: the pre-tanh value of a squashed-Gaussian action, so an actor
    whose pre-tanh distribution is N(0, 1) hands out exactly N(0, 1) noise (up to the clip)."""
    edge = math.tanh(bound)
    return torch.atanh(u.clamp(-edge, edge))


class ChunkDecoder(Protocol):
    """What ChunkEnv needs from a decoder."""

    action_dim: int  # D, size of the flat high-level action in [-1, 1]^D
    chunk_len: int  # actions per decoded chunk (ChunkEnv executes the first exec_horizon of them)
    env_action_dim: int  # d_a, size of one low-level action

    def __call__(self, action: Tensor, obs: Mapping[str, Tensor]) -> Tensor: ...


Backend = BatchedMaze | BatchedCube


def make_backend(task: TaskConfig, num_envs: int, seed: int, cube: CubeConfig | None = None) -> Backend:
    """The numpy-level batch of ``task``: a BatchedMaze, or for the cube a BatchedCube with the cameras and
    cloud of ``cube`` (the pre-training run's ``demos.cube``) and the task's variation and time limit."""
    if not task.is_cube:
        return BatchedMaze(task, num_envs, seed)
    if cube is None:
        raise ValueError(
            "task.env='cube-single' needs the cameras and point-cloud settings the policy was trained with "
            "(the pre-training run's demos.cube); got cube=None"
        )
    cube = replace(cube, variation=task.variation, max_episode_steps=task.max_steps)
    return BatchedCube(cube, num_envs, seed)


def env_dims(task: TaskConfig) -> tuple[int, int, int]:
    """(obs_dim, action_dim, goal_dim) of ``task``'s environment."""
    if task.is_cube:
        return BatchedCube.obs_dim, BatchedCube.action_dim, BatchedCube.goal_dim
    return (*maze_dims(task.env), 2)


def _check_action(action: Tensor, dim: int, who: str) -> None:
    if not isinstance(action, Tensor) or action.ndim != 2 or action.shape[1] != dim:
        shape = tuple(action.shape) if isinstance(action, Tensor) else type(action).__name__
        raise ValueError(f"{who}: action is {shape}; expected a tensor of shape (N, {dim})")


class BasePolicyDecoder:
    """Flat action in [-1, 1]^D -> (z, sigma, eps_c) -> a chunk from the frozen CSP policy.

    Args:
        policy: the pre-trained policy. It is put in eval mode with gradients off and never changed.
        heads: ordered subset of ``HEADS``, the layout of the flat action; must hold "z". Absent heads take
            defaults: sigma = ``fixed_sigma``, eps_c = zeros.
        sigma_max: sigma = sigma_max * (u + 1) / 2, so u in [-1, 1] spans [0, sigma_max].
        fixed_sigma: the context-noise level when "sigma" is not a head.
        eps_bound: bound of eps_c (or of its code): |eps_c| <= eps_bound.
        eps_map: "atanh": eps_c = atanh(u) clipped to the bound, so an actor head with a N(0, 1) pre-tanh
            distribution gives exactly the N(0, I) context noise of pre-training; "linear": eps_c =
            eps_bound * u. A policy with a context code map (``context_code_dim`` d > 0, needed for point
            clouds) takes the code instead: the eps_c head has d outputs and eps_c =
            ``policy.context_noise_from_code(code)``.
        z_mode: "repeat": d_z = d_a, one vector repeated over the chunk; "full": d_z = L * d_a (with a
            N(0, 1) actor and "atanh", exactly the noise the base policy was trained on).
        z_map: "atanh": z = atanh(u), clipped to +-z_bound (see eps_map); "erfinv": z = sqrt(2) erfinv(u),
            so a UNIFORM u gives N(0, 1) noise; "linear": z = 3 u.
        z_bound: the clip of the "atanh" map.
        steps: Euler steps per chunk; None = the policy's ``cfg.sample_steps``.
    """

    def __init__(
        self,
        policy: CSPPolicy,
        heads: list[str],
        sigma_max: float = 1.0,
        fixed_sigma: float = 0.0,
        eps_bound: float = 1.0,
        z_mode: str = "repeat",
        z_map: str = "erfinv",
        steps: int | None = None,
        z_bound: float = 4.0,
        eps_map: str = "linear",
    ) -> None:
        heads = list(heads)
        if "z" not in heads or len(set(heads)) != len(heads) or not set(heads) <= set(HEADS):
            raise ValueError(f"heads={heads!r}; expected distinct names from {list(HEADS)} including 'z'")
        for name, value, ok, want in (
            ("sigma_max", sigma_max, 0 < sigma_max <= 1, "in (0, 1]"),
            ("fixed_sigma", fixed_sigma, 0 <= fixed_sigma <= 1, "in [0, 1]"),
            ("eps_bound", eps_bound, eps_bound > 0, "> 0"),
            ("z_mode", z_mode, z_mode in Z_MODES, f"one of {list(Z_MODES)}"),
            ("z_map", z_map, z_map in Z_MAPS, f"one of {list(Z_MAPS)}"),
            ("z_bound", z_bound, z_bound > 0, "> 0"),
            ("eps_map", eps_map, eps_map in EPS_MAPS, f"one of {list(EPS_MAPS)}"),
            ("steps", steps, steps is None or (isinstance(steps, int) and steps >= 1), "None or >= 1"),
        ):
            if not ok:
                raise ValueError(f"BasePolicyDecoder {name}={value!r}; expected {want}")
        cloud = policy.cfg.context_mode == "pointcloud"
        if cloud and "eps_c" in heads and not policy.context_code_dim:
            raise ValueError(
                f"the policy's context is a point cloud ({policy.context_dim} numbers) with no context code "
                f"map, too large for an eps_c head; pre-train with policy.context_code_dim > 0 (e.g. 16), "
                f"or fine-tune without the eps_c head (method=dsrl)"
            )
        self.policy = policy.eval().requires_grad_(False)  # frozen: only sampled, never trained
        self.heads, self.sigma_max, self.fixed_sigma = heads, sigma_max, fixed_sigma
        self.eps_bound, self.z_mode, self.z_map, self.steps = eps_bound, z_mode, z_map, steps
        self.z_bound, self.eps_map = z_bound, eps_map
        self.chunk_len, self.env_action_dim = policy.cfg.chunk_len, policy.action_dim
        self.feature_dim = policy.cfg.width if cloud else 0  # CONTEXT_FEATURE size; 0: none
        d_z = policy.action_dim * (policy.cfg.chunk_len if z_mode == "full" else 1)
        sizes = {"z": d_z, "sigma": 1, "eps_c": policy.context_code_dim or policy.context_dim}
        self.sizes = {h: sizes[h] for h in heads}  # layout of the flat action, in order
        self.action_dim = sum(self.sizes.values())

    def split(self, action: Tensor) -> dict[str, Tensor]:
        """Decode a flat action (N, D) into z (N, L, d_a), sigma (N,) and eps_c (N, d_c), defaults filled
        (eps_c is the code (N, d) when the policy has a context code map)."""
        _check_action(action, self.action_dim, "BasePolicyDecoder")
        # a squashed Gaussian can land a hair outside [-1, 1] in float32; the maps assume the box
        chunks = action.clamp(-1.0, 1.0).split(list(self.sizes.values()), dim=-1)
        parts = dict(zip(self.heads, chunks, strict=True))
        n, length, d_a = action.shape[0], self.chunk_len, self.env_action_dim
        u = parts["z"]  # (N, d_z)
        if self.z_map == "atanh":
            z = _atanh(u, self.z_bound)
        elif self.z_map == "erfinv":
            z = math.sqrt(2.0) * torch.erfinv(u.clamp(-_ERFINV_CLIP, _ERFINV_CLIP))
        else:
            z = 3.0 * u
        z = z[:, None, :].expand(n, length, d_a) if self.z_mode == "repeat" else z.reshape(n, length, d_a)
        if "sigma" in parts:
            sigma = self.sigma_max * (parts["sigma"][:, 0] + 1.0) / 2.0  # (N,)
        else:
            sigma = action.new_full((n,), self.fixed_sigma)
        if "eps_c" in parts:
            u = parts["eps_c"]
            eps_c = _atanh(u, self.eps_bound) if self.eps_map == "atanh" else self.eps_bound * u  # (N, d_c)
        else:
            eps_c = action.new_zeros((n, self.policy.context_dim))  # no head: the clean context
        return {"z": z, "sigma": sigma, "eps_c": eps_c}

    def inputs(self, obs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The policy's inputs from the env's observation (OBS, GOAL if the policy has one, POINTCLOUD)."""
        device = next(self.policy.parameters()).device
        keys = [OBS] + [GOAL] * (self.policy.goal_dim > 0) + [POINTCLOUD] * (self.feature_dim > 0)
        return {k: obs[k].to(device) for k in keys}

    @torch.no_grad()
    def __call__(self, action: Tensor, obs: Mapping[str, Tensor]) -> Tensor:
        """Chunk (N, L, d_a) of raw low-level actions for all N sub-envs in one batched sample call."""
        device = next(self.policy.parameters()).device
        parts = {k: v.to(device) for k, v in self.split(action).items()}
        eps_c = parts["eps_c"]
        if "eps_c" in self.sizes and self.policy.context_code_dim:
            eps_c = self.policy.context_noise_from_code(eps_c)  # (N, d) code -> (N, d_c)
        chunk = self.policy.sample(
            self.inputs(obs), parts["sigma"], action_noise=parts["z"], context_noise=eps_c, steps=self.steps
        )
        return chunk.to(action.device, torch.float32)

    @torch.no_grad()
    def features(self, obs: Mapping[str, Tensor]) -> Tensor:
        """(N, F) PointNet features of the CLEAN clouds (sigma = 0): the agent's view of the scene."""
        batch = self.inputs(obs)
        zeros = batch[OBS].new_zeros(batch[OBS].shape[0])
        eps = batch[OBS].new_zeros(batch[OBS].shape[0], self.policy.context_dim)
        _, cloud = self.policy.noised_context(batch, zeros, eps)  # sigma = 0: the normalized cloud itself
        return self.policy.noised_encoder(cloud).float().cpu()


class RawDecoder:
    """The flat action IS the chunk: exec_horizon * d_a values in [-1, 1] (the SAC baseline).

    Args:
        exec_horizon: actions per chunk.
        action_dim: d_a, size of one low-level action (``self.action_dim`` is the flat size H * d_a).
    """

    def __init__(self, exec_horizon: int, action_dim: int) -> None:
        for name, value in (("exec_horizon", exec_horizon), ("action_dim", action_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RawDecoder {name}={value!r}; expected an integer >= 1")
        self.chunk_len, self.env_action_dim = exec_horizon, action_dim
        self.action_dim = exec_horizon * action_dim

    def __call__(self, action: Tensor, obs: Mapping[str, Tensor]) -> Tensor:
        """(N, H * d_a) -> (N, H, d_a), action-major (the first d_a values are the first action)."""
        _check_action(action, self.action_dim, "RawDecoder")
        return action.reshape(action.shape[0], self.chunk_len, self.env_action_dim)


class ZeroShotDecoder:
    """The base policy alone with fresh N(0, I) action and context noise, at sigma = 0 by default (BC
    zero-shot, METHOD.md section 2): the reference a fine-tuning agent must not start below. Its
    one-number action is ignored.

    Args:
        policy: the pre-trained policy (frozen).
        steps: Euler steps per chunk; None = the policy's ``cfg.sample_steps``.
        sigma: the context-noise level, in [0, 1].
    """

    action_dim = 1

    def __init__(self, policy: CSPPolicy, steps: int | None = None, sigma: float = 0.0) -> None:
        if not 0.0 <= sigma <= 1.0:
            raise ValueError(f"ZeroShotDecoder sigma={sigma!r}; expected a value in [0, 1]")
        self.sigma = float(sigma)
        self.policy = policy.eval().requires_grad_(False)
        self.chunk_len, self.env_action_dim, self.steps = policy.cfg.chunk_len, policy.action_dim, steps
        self._inputs = BasePolicyDecoder(policy, ["z"], steps=steps)

    @torch.no_grad()
    def __call__(self, action: Tensor, obs: Mapping[str, Tensor]) -> Tensor:
        """Chunk (N, L, d_a): z and eps_c drawn from torch's global generator (seed it for a fixed set)."""
        _check_action(action, 1, "ZeroShotDecoder")
        chunk = self.policy.sample(self._inputs.inputs(obs), self.sigma, steps=self.steps)
        return chunk.to(action.device, torch.float32)

    def features(self, obs: Mapping[str, Tensor]) -> Tensor:
        return self._inputs.features(obs)

    @property
    def feature_dim(self) -> int:
        return self._inputs.feature_dim


def _set_specs(
    env: EnvBase, backend: Backend, action_dim: int, exec_horizon: int | None, feature_dim: int = 0
) -> None:
    """Observation (+ success, + env_steps for chunks, + CONTEXT_FEATURE), action, reward and done specs."""
    n = backend.num_envs
    flag = Categorical(2, shape=(n, 1), dtype=torch.bool)
    obs = {
        OBS: Unbounded(shape=(n, backend.obs_dim), dtype=torch.float32),
        GOAL: Unbounded(shape=(n, backend.goal_dim), dtype=torch.float32),
        "success": flag.clone(),
    }
    if exec_horizon is not None:
        obs["env_steps"] = Bounded(0, exec_horizon, shape=(n, 1), dtype=torch.int64)
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
        "success": col(backend.success),
        "terminated": col(backend.terminated),
        "truncated": col(backend.truncated),
        "done": col(done),
    }
    data.update({k: col(v) for k, v in extra.items()})
    return TensorDict(data, batch_size=[backend.num_envs])


def _reset_mask(tensordict: TensorDictBase | None, n: int) -> np.ndarray | None:
    """The collector's ``"_reset"`` (N, 1) mask as (N,) bool numpy, or None (reset all)."""
    if tensordict is None or "_reset" not in tensordict.keys():
        return None
    return tensordict.get("_reset").reshape(n).cpu().numpy()


class MazeEnv(EnvBase):
    """The low-level maze env: one environment step per TorchRL step, action Bounded(-1, 1, (N, d_a)).

    Args:
        task: the target task (maze, start and goal cells, time limit).
        num_envs: N sub-envs, stepped together in this process.
        seed: seed of the start/goal jitter (``set_seed`` re-seeds it).
    """

    def __init__(self, task: TaskConfig, num_envs: int, seed: int = 0) -> None:
        super().__init__(batch_size=torch.Size([num_envs]), device="cpu")
        self.maze = BatchedMaze(task, num_envs, seed)
        _set_specs(self, self.maze, self.maze.action_dim, exec_horizon=None)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDictBase:
        self.maze.reset(_reset_mask(tensordict, self.maze.num_envs))
        return _state_td(self.maze)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get("action").detach().cpu().numpy()  # (N, d_a)
        out = self.maze.step(action, np.ones(self.maze.num_envs, bool))
        return _state_td(self.maze).set("reward", torch.from_numpy(out["reward"]).unsqueeze(-1))

    def _set_seed(self, seed: int | None) -> None:
        self.maze.seed(seed)


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
        cube: the cube's cameras and cloud (the pre-training run's ``demos.cube``); cube tasks only.
    """

    def __init__(
        self,
        task: TaskConfig,
        num_envs: int,
        decoder: ChunkDecoder,
        exec_horizon: int,
        seed: int = 0,
        cube: CubeConfig | None = None,
    ) -> None:
        if isinstance(exec_horizon, bool) or not isinstance(exec_horizon, int) or exec_horizon < 1:
            raise ValueError(f"ChunkEnv exec_horizon={exec_horizon!r}; expected an integer >= 1")
        if exec_horizon > decoder.chunk_len:
            raise ValueError(
                f"ChunkEnv exec_horizon={exec_horizon} exceeds the decoder's chunk length {decoder.chunk_len}"
            )
        super().__init__(batch_size=torch.Size([num_envs]), device="cpu")
        self.backend = make_backend(task, num_envs, seed, cube)
        if decoder.env_action_dim != self.backend.action_dim:
            want = self.backend.action_dim
            raise ValueError(f"decoder makes {decoder.env_action_dim}-d actions; {task.env} expects {want}")
        self.decoder, self.exec_horizon = decoder, exec_horizon
        self.clouds = isinstance(self.backend, BatchedCube)
        # the agent's view of the cloud: only a base policy with a PointNet can give one
        self.feature_dim = getattr(decoder, "feature_dim", 0) if self.clouds else 0
        self._env_steps = np.zeros(num_envs, np.int64)  # real env steps of each sub-env's last chunk
        _set_specs(self, self.backend, decoder.action_dim, exec_horizon, self.feature_dim)

    def _observation(self, rows: np.ndarray | None = None) -> dict[str, Tensor]:
        """What the decoder reads: OBS, GOAL and, on the cube, the clouds (rendered for ``rows`` if stale)."""
        b = self.backend
        obs = {OBS: torch.from_numpy(b.observation.copy()), GOAL: torch.from_numpy(b.goal.copy())}
        if self.clouds:
            obs[POINTCLOUD] = torch.from_numpy(b.observe_clouds(rows))
        return obs

    def _state(self, rows: np.ndarray | None = None) -> TensorDict:
        """The TorchRL observation; on the cube it renders the clouds of ``rows`` for CONTEXT_FEATURE."""
        td = _state_td(self.backend, env_steps=self._env_steps)
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
        chunk = self.decoder(tensordict.get("action"), self._observation())  # (N, L, d_a)
        bad_shape = chunk.ndim != 3 or chunk.shape[0] != n or chunk.shape[2] != b.action_dim
        if bad_shape or chunk.shape[1] < self.exec_horizon:
            raise ValueError(
                f"decoder returned a chunk of shape {tuple(chunk.shape)}; expected ({n}, >= "
                f"{self.exec_horizon}, {b.action_dim})"
            )
        chunk = chunk[:, : self.exec_horizon].detach().cpu().numpy()  # (N, H, d_a)
        reward = np.zeros(n, np.float32)
        self._env_steps[:] = 0
        live = np.ones(n, bool)
        for t in range(self.exec_horizon):
            out = b.step(chunk[:, t], live)
            reward[live] += out["reward"][live]
            self._env_steps[live] += 1
            # a finished sub-env stops here: the rest of its chunk is dropped, its last obs stays put
            live &= ~(out["terminated"] | out["truncated"])
            if not live.any():
                break
        # a terminated sub-env's next state is never bootstrapped from: its cloud need not be rendered
        td = self._state(rows=~b.terminated)
        return td.set("reward", torch.from_numpy(reward).unsqueeze(-1))

    def _set_seed(self, seed: int | None) -> None:
        self.backend.seed(seed)


# The high-level action layout per method; None = raw environment actions, no base policy.
METHODS: dict[str, dict[str, Any] | None] = {
    "tmrl": {"heads": ["z", "sigma", "eps_c"]},
    "fixed_sigma": {"heads": ["z", "eps_c"]},  # the ablation: sigma fixed at decoder_kw's fixed_sigma
    "dsrl": {"heads": ["z"], "fixed_sigma": 0.0},  # CSP at sigma = 0 is plain BC: steer the noise only
    "sac": None,
    "rlpd": None,  # sac + replay batches half from the demonstrations (app/finetune.py)
}


def make_chunk_env(
    task: TaskConfig,
    num_envs: int,
    policy: CSPPolicy | None,
    method: str,
    exec_horizon: int,
    seed: int = 0,
    cube: CubeConfig | None = None,
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
        decoder: ChunkDecoder = RawDecoder(exec_horizon, env_dims(task)[1])
    else:
        if policy is None:
            raise ValueError(f"method {method!r} needs the pre-trained policy; got policy=None")
        if "heads" in decoder_kw:
            raise ValueError(f"decoder_kw may not set 'heads': method {method!r} fixes {layout['heads']}")
        decoder = BasePolicyDecoder(policy, **{**decoder_kw, **layout})
    return ChunkEnv(task, num_envs, decoder, exec_horizon, seed, cube)


def make_zero_shot_env(
    task: TaskConfig,
    num_envs: int,
    policy: CSPPolicy,
    exec_horizon: int,
    seed: int = 0,
    cube: CubeConfig | None = None,
    steps: int | None = None,
    sigma: float = 0.0,
) -> ChunkEnv:
    """ChunkEnv that runs the base policy alone (``ZeroShotDecoder`` at ``sigma``): with the eval env's seed
    it rolls out the same fixed episodes, so its success is the base's zero-shot success on them."""
    return ChunkEnv(task, num_envs, ZeroShotDecoder(policy, steps, sigma), exec_horizon, seed, cube)
