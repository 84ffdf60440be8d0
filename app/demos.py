"""Demonstration generation: roll out a scripted expert and write an episode store.

``tmrl demos --env pointmaze-large --episodes N --out PATH`` calls :func:`generate_maze_demos`;
``tmrl demos --env cube-single --episodes N --out PATH`` calls :func:`generate_cube_demos` (point clouds).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from app.envs.maze import ExpertConfig, MazeExpert, goal_indices, make_maze_env, resolve_maze, rollout_expert
from datamodules.episodes import EpisodeStore, write_episodes

if TYPE_CHECKING:  # app.envs.cube sets MUJOCO_GL and starts MuJoCo: imported only when cube demos are made
    from app.envs.cube import CubeConfig, OracleConfig

CUBE_ENVS = ("cube-single",)  # short names of the point-cloud cube tasks (app/envs/cube.py)
# Rows per stored chunk for point-cloud stores. A lazy read of one frame decodes its whole chunk
# (chunk_rows x N x 12 bytes: 0.8 MB at 64 rows and N = 1024), so chunks stay small; the default 8192
# rows of episodes.py would make every random frame read decode tens of megabytes.
CUBE_CHUNK_ROWS = 64


def generate_maze_demos(
    env: str,
    episodes: int,
    out: str | Path,
    episode_length: int = 1000,
    seed: int = 0,
    expert: ExpertConfig | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> EpisodeStore:
    """Roll out ``episodes`` expert episodes of ``episode_length`` steps in maze ``env`` and store them.

    Reproducible: episode ``k`` draws from its own generator spawned from ``seed``, so the same
    arguments give the same store fingerprint. The store's attrs record ``env``, ``env_id``,
    ``goal_indices``, ``obs_dim``, ``action_dim``, ``episode_length``, ``seed``, ``expert`` and
    ``generator``; they are what the data module needs to relabel goals without importing ``app.envs``.
    """
    if episodes <= 0:
        raise ValueError(f"episodes must be > 0, got {episodes}")
    if episode_length <= 0:
        raise ValueError(f"episode_length must be > 0, got {episode_length}")
    short, env_id = resolve_maze(env)
    config = expert or ExpertConfig()
    maze_env = make_maze_env(short)
    obs_dim = int(np.prod(maze_env.observation_space.shape))
    action_dim = int(np.prod(maze_env.action_space.shape))
    attrs = {
        "env": short,
        "env_id": env_id,
        "goal_indices": goal_indices(short),
        "obs_dim": obs_dim,
        "action_dim": action_dim,
        "episode_length": episode_length,
        "seed": seed,
        "expert": dataclasses.asdict(config),
        "generator": "maze_expert",
    }
    bar = tqdm(
        total=episodes * episode_length,
        unit="step",
        unit_scale=True,
        desc=f"demos {short}",
        disable=not progress,
    )

    def stream() -> Iterator[dict[str, np.ndarray]]:
        # A generator so write_episodes streams: only one episode is in memory at a time.
        maze_expert = MazeExpert(config)
        for child in np.random.SeedSequence(seed).spawn(episodes):
            yield rollout_expert(maze_env, maze_expert, episode_length, np.random.default_rng(child))
            bar.update(episode_length)

    try:
        return write_episodes(out, stream(), attrs, overwrite=overwrite)
    finally:
        bar.close()
        maze_env.close()


def is_cube_env(name: str) -> bool:
    """True for the short name or OGBench id of a point-cloud cube task (see :func:`resolve_cube`)."""
    return name in CUBE_ENVS or name in {f"{short}-v0" for short in CUBE_ENVS}


def resolve_cube(name: str) -> tuple[str, str]:
    """Map a cube task's short name ("cube-single") or OGBench id ("cube-single-v0") to (short, id)."""
    for short in CUBE_ENVS:
        if name in (short, f"{short}-v0"):
            return short, f"{short}-v0"
    raise ValueError(f"unknown cube environment {name!r}; expected one of {sorted(CUBE_ENVS)}")


def generate_cube_demos(
    env: str,
    episodes: int,
    out: str | Path,
    episode_length: int = 200,
    seed: int = 0,
    cube: CubeConfig | None = None,
    oracle: OracleConfig | None = None,
    progress: bool = True,
    overwrite: bool = False,
    chunk_rows: int = CUBE_CHUNK_ROWS,
) -> EpisodeStore:
    """Roll out ``episodes`` noisy-oracle episodes of ``episode_length`` steps on the point-cloud cube task.

    Per step the store holds ``observation`` (19,) proprioception, ``pointcloud`` (N, 3) world metres,
    ``action`` (5,), ``expert_goal`` (3,) (the oracle's target: marks segments), ``achieved_goal`` (3,) (the
    cube centre: hindsight goals come from it, the cube is not in the observation) and ``success``.
    Reproducible like :func:`generate_maze_demos` (episode ``k`` draws from the ``k``-th child of
    ``seed``). The attrs record the env, dims, ``num_points``, cameras, crop box, variation,
    ``goal_key="achieved_goal"`` and the full cube and oracle settings.
    """
    from app.envs.cube import (
        ACTION_DIM,
        GOAL_DIM,
        PROPRIO_DIM,
        CubeConfig,
        CubePointCloudEnv,
        OracleConfig,
        rollout_oracle,
    )

    short, env_id = resolve_cube(env)
    if episodes <= 0:
        raise ValueError(f"episodes must be > 0, got {episodes}")
    if episode_length <= 0:
        raise ValueError(f"episode_length must be > 0, got {episode_length}")
    cube = cube or CubeConfig()
    # the env's time limit is for evaluation; a longer demonstration episode must not run past it
    cube = dataclasses.replace(cube, max_episode_steps=max(cube.max_episode_steps, episode_length))
    oracle = oracle or OracleConfig()
    attrs = {
        "env": short,
        "env_id": env_id,
        "obs_dim": PROPRIO_DIM,
        "action_dim": ACTION_DIM,
        "goal_dim": GOAL_DIM,
        "goal_key": "achieved_goal",
        "num_points": cube.num_points,
        "cameras": list(cube.cameras),
        "crop_low": list(cube.crop_low),
        "crop_high": list(cube.crop_high),
        "variation": cube.variation,
        "robot_geometry": cube.robot_geometry,
        "episode_length": episode_length,
        "seed": seed,
        "cube": json.loads(json.dumps(dataclasses.asdict(cube))),  # tuples -> lists
        "expert": dataclasses.asdict(oracle),
        "generator": "cube_oracle",
    }
    bar = tqdm(total=episodes * episode_length, unit="step", desc=f"demos {short}", disable=not progress)
    cube_env = CubePointCloudEnv(cube)

    def stream() -> Iterator[dict[str, np.ndarray]]:
        # one episode in memory at a time: (T, N, 3) clouds are the bulk of the store
        for child in np.random.SeedSequence(seed).spawn(episodes):
            yield rollout_oracle(cube_env, episode_length, np.random.default_rng(child), oracle)
            bar.update(episode_length)

    try:
        return write_episodes(out, stream(), attrs, overwrite=overwrite, chunk_rows=chunk_rows)
    finally:
        bar.close()
        cube_env.close()
