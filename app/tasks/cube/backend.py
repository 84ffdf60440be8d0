"""N cube envs stepped together at the numpy level: the backend of cube fine-tuning and of the cube's
zero-shot evaluation (the counterpart of :class:`app.tasks.maze.backend.BatchedMaze`), for either sensor
output (``CubeConfig.output``): point clouds (the cube task) or RGB frames (the visual cube task).

Rendering is the expensive part (one depth render per camera, ~25 ms each; an RGB frame ~90 ms with the
robot's meshes), so physics steps never render: sensor rows are marked stale by ``step``/``reset`` and
rendered only when ``observe`` asks for them, which a chunked env does once per chunk, at the observation
the next chunk is decided from.

Episodes end at success (``terminated``: the cube within 0.04 m of the target, OGBench's own test) or after
``config.max_episode_steps`` steps (``truncated``); the reward is 1.0 on success, else 0.0, as for the mazes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from app.tasks.base import SubEnvBatch
from app.tasks.cube.config import ACTION_DIM, GOAL_DIM, PROPRIO_DIM, CubeConfig
from app.tasks.cube.env import CubePointCloudEnv
from modules.nets.keys import GOAL, IMAGE, OBS, POINTCLOUD


class BatchedCube(SubEnvBatch):
    """N :class:`CubePointCloudEnv` (random cube and target per reset, per ``config.variation``).

    State arrays (one row per sub-env) hold each sub-env's latest values; rows a mask leaves out keep theirs.

    Attributes:
        observation: (N, 19) float32 proprioceptive state; goal: (N, 3) float32 target cube centre.
        pointcloud: (N, P, 3) float32 world-frame clouds (``output`` "pointcloud", else None), or
        image: (N, C, H, W, 3) uint8 RGB frames (``output`` "image", else None); a row's is valid after
            ``render_stale`` (or ``observe``) asked for it.
        cube: (N, 3) float32 cube centres (the achieved goal).
        reward, terminated, truncated, success, step_count: per-row, as in ``BatchedMaze``.
    """

    obs_dim, goal_dim, action_dim = PROPRIO_DIM, GOAL_DIM, ACTION_DIM

    def __init__(self, config: CubeConfig, num_envs: int, seed: int = 0) -> None:
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"BatchedCube num_envs={num_envs!r}; expected an integer >= 1")
        self.config, self.num_envs = config, num_envs
        self.max_episode_steps = config.max_episode_steps
        self._envs = [CubePointCloudEnv(config) for _ in range(num_envs)]
        n, (shape, dtype) = num_envs, self._envs[0].output_spec
        self.observation = np.zeros((n, self.obs_dim), np.float32)
        self.goal = np.zeros((n, self.goal_dim), np.float32)
        self.cube = np.zeros((n, 3), np.float32)
        self._sensed = np.zeros((n, *shape), dtype)  # the sensor's latest output per row
        self.pointcloud = self._sensed if config.output == POINTCLOUD else None
        self.image = self._sensed if config.output == IMAGE else None
        self.reward = np.zeros(n, np.float32)
        self.terminated = np.zeros(n, bool)
        self.truncated = np.zeros(n, bool)
        self.success = np.zeros(n, bool)
        self.step_count = np.zeros(n, np.int64)
        self._stale = np.ones(n, bool)  # sensor rows that no longer show their scene
        self._was_reset = np.zeros(n, bool)
        self.seed(seed)

    def seed(self, seed: int | None) -> None:
        """Re-seed the generator that draws every later reset's seed; None draws fresh entropy."""
        self._rng = np.random.default_rng(seed)

    def _write(self, k: int, obs: dict[str, np.ndarray]) -> None:
        self.observation[k], self.goal[k] = obs["state"], obs["goal"]
        self.cube[k] = self._envs[k].cube_position()
        self._stale[k] = True

    def reset(self, mask: np.ndarray | None = None, seeds: Sequence[int] | None = None) -> None:
        """Reset the sub-envs where ``mask`` (N,) is True (all if None); ``seeds`` (one per reset row, in
        row order) fix their scenes, else they come from this batch's generator."""
        idx = np.flatnonzero(self._mask(mask, "reset"))
        if seeds is not None and len(seeds) != len(idx):
            raise ValueError(f"BatchedCube.reset: {len(seeds)} seeds for {len(idx)} sub-envs to reset")
        for i, k in enumerate(idx):
            seed = int(seeds[i]) if seeds is not None else int(self._rng.integers(2**31))
            obs, _ = self._envs[k].reset(seed=seed, pointcloud=False)
            self._write(k, obs)
        self.reward[idx] = 0.0
        self.terminated[idx] = self.truncated[idx] = self.success[idx] = False
        self.step_count[idx] = 0
        self._was_reset[idx] = True

    def step(self, actions: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """Step the sub-envs where ``mask`` is True with ``actions`` (N, 5), clipped to [-1, 1]; no rendering.

        Returns copies of ``reward``, ``terminated``, ``truncated`` and ``success`` (N,).
        """
        idx, actions = self._rows_to_step(actions, mask)
        actions = np.clip(actions, -1.0, 1.0)
        for k in idx:
            obs, _, _, _, info = self._envs[k].step(actions[k], pointcloud=False)
            self._write(k, obs)
            self.success[k] = bool(info["success"])
        self.step_count[idx] += 1
        self.reward[idx] = self.success[idx]
        self.terminated[idx] = self.success[idx]
        # a time limit reached on the very step that succeeds is a success, not a truncation
        self.truncated[idx] = (self.step_count[idx] >= self.max_episode_steps) & ~self.success[idx]
        return {k: getattr(self, k).copy() for k in ("reward", "terminated", "truncated", "success")}

    def render_stale(self, mask: np.ndarray | None = None, force: bool = False) -> np.ndarray:
        """Render the stale sensor rows among the rows of ``mask`` (all if None; ``force``: every row of it,
        stale or not); returns a copy of the sensor array (``pointcloud`` or ``image``; rows outside the
        mask may be stale)."""
        rows = self._mask(mask, "render_stale")
        for k in np.flatnonzero(rows if force else rows & self._stale):
            self._sensed[k] = self._envs[k].sense()
            self._stale[k] = False
        return self._sensed.copy()

    def observe(self, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Copies of OBS (N, 19), GOAL (N, 3) and the sensor's output: POINTCLOUD (N, P, 3) float32 or IMAGE
        (N, C, H, W, 3) uint8, per ``config.output`` (the stale rows of ``rows``, all if None, rendered
        first; other rows' may be stale)."""
        sensed = self.render_stale(rows)
        return {OBS: self.observation.copy(), GOAL: self.goal.copy(), self.config.output: sensed}

    def scene(self, k: int) -> np.ndarray:
        """Sub-env ``k``'s simulator ``qpos`` (nq,) float64: what a video replays (cube/video.py)."""
        return self._envs[k].sim._data.qpos.copy()

    def close(self) -> None:
        """Free every sub-env's renderer and simulation."""
        for env in self._envs:
            env.close()
