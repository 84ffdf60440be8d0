"""Maze demonstrations: roll out the scripted waypoint expert and write an episode store
(``tmrl demos --env pointmaze-large --episodes N --out PATH``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from app.tasks.maze.config import ExpertConfig
from app.tasks.maze.env import MazeExpert, goal_indices, make_maze_env, resolve_maze, rollout_expert
from datamodules.episodes import EpisodeStore, write_episodes


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
