"""Cube demonstrations: roll out the noisy scripted oracle with point-cloud or camera-frame observations and
write an episode store (``tmrl demos --env cube-single|visual-cube-single --episodes N --out PATH``)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from app.tasks.cube.config import (
    ACTION_DIM,
    CUBE_ENVS,
    GOAL_DIM,
    PROPRIO_DIM,
    VISUAL_CUBE_ENVS,
    CubeConfig,
    OracleConfig,
    check_output,
    resolve_cube,
)
from datamodules.episodes import EpisodeStore, write_episodes
from datamodules.pointcloud import ARENA_WALLS
from modules.nets.keys import POINTCLOUD

# Rows per stored chunk for point-cloud stores. A lazy read of one frame decodes its whole chunk
# (chunk_rows x N x 12 bytes: 0.8 MB at 64 rows and N = 1024), so chunks stay small; the default 8192
# rows of episodes.py would make every random frame read decode tens of megabytes. Camera frames get
# fewer rows still (write_episodes halves a large step's chunk: 16 rows of 64 x 64 RGB).
CUBE_CHUNK_ROWS = 64


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
    """Roll out ``episodes`` noisy-oracle episodes of ``episode_length`` steps on a cube task (``env``:
    "cube-single" with ``cube.output`` "pointcloud", or "visual-cube-single" with "image").

    Per step the store holds ``observation`` (19,) proprioception, the sensor's output (``pointcloud``
    (N, 3) world metres, or ``image`` (C, H, W, 3) uint8 RGB frames), ``action`` (5,), ``expert_goal`` (3,)
    (the oracle's target: marks segments), ``achieved_goal`` (3,) (the cube centre: hindsight goals come
    from it, the cube is not in the observation) and ``success``. Reproducible like
    :func:`generate_maze_demos` (episode ``k`` draws from the ``k``-th child of ``seed``), and rendering
    draws no randomness: the two sensors' stores of the same arguments hold the same low-dim arrays. The
    attrs record the env, dims, cameras, variation, ``goal_key="achieved_goal"``, the full cube and
    oracle settings, and ``num_points`` and the crop box (clouds) or ``image_size`` [H, W] (frames).
    """
    from app.tasks.cube.env import CubePointCloudEnv, rollout_oracle  # starts MuJoCo: only when needed

    short, env_id = resolve_cube(env, CUBE_ENVS + VISUAL_CUBE_ENVS)
    if episodes <= 0:
        raise ValueError(f"episodes must be > 0, got {episodes}")
    if episode_length <= 0:
        raise ValueError(f"episode_length must be > 0, got {episode_length}")
    cube = cube or CubeConfig()
    check_output(short, cube)
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
        "cameras": list(cube.cameras),
        "variation": cube.variation,
        "robot_geometry": cube.robot_geometry,
        "episode_length": episode_length,
        "seed": seed,
        "cube": json.loads(json.dumps(dataclasses.asdict(cube))),  # tuples -> lists
        "expert": dataclasses.asdict(oracle),
        "generator": "cube_oracle",
        "arena_walls": ARENA_WALLS,  # drawn or not by the sensor (datamodules/pointcloud.py refuses "drawn")
    }
    if cube.output == POINTCLOUD:
        attrs.update(num_points=cube.num_points, crop_low=list(cube.crop_low), crop_high=list(cube.crop_high))
    else:
        attrs["image_size"] = [cube.height, cube.width]
    bar = tqdm(total=episodes * episode_length, unit="step", desc=f"demos {short}", disable=not progress)
    cube_env = CubePointCloudEnv(cube)

    def stream() -> Iterator[dict[str, np.ndarray]]:
        # one episode in memory at a time: its clouds or frames are the bulk of the store
        for child in np.random.SeedSequence(seed).spawn(episodes):
            yield rollout_oracle(cube_env, episode_length, np.random.default_rng(child), oracle)
            bar.update(episode_length)

    try:
        return write_episodes(out, stream(), attrs, overwrite=overwrite, chunk_rows=chunk_rows)
    finally:
        bar.close()
        cube_env.close()
