"""Maze demonstrations: roll out the scripted waypoint expert and write an episode store
(``tmrl demos --env pointmaze-large --episodes N --out PATH``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from app.tasks.maze.camera import MazeCamera, MazeCameraConfig
from app.tasks.maze.config import ExpertConfig
from app.tasks.maze.env import MazeExpert, goal_indices, make_maze_env, resolve_maze, rollout_expert
from datamodules.episodes import EpisodeStore, write_episodes

VISUAL_PREFIX = "visual-"  # the visual maze task's env names: visual-pointmaze-medium, ...


def generate_maze_demos(
    env: str,
    episodes: int,
    out: str | Path,
    episode_length: int = 1000,
    seed: int = 0,
    expert: ExpertConfig | None = None,
    progress: bool = True,
    overwrite: bool = False,
    camera: MazeCameraConfig | None = None,
) -> EpisodeStore:
    """Roll out ``episodes`` expert episodes of ``episode_length`` steps in maze ``env`` and store them.

    Reproducible: episode ``k`` draws from its own generator spawned from ``seed``, so the same
    arguments give the same store fingerprint. The store's attrs record ``env``, ``env_id``,
    ``goal_indices``, ``obs_dim``, ``action_dim``, ``episode_length``, ``seed``, ``expert`` and
    ``generator``; they are what the data module needs to relabel goals without importing ``app.envs``.

    With a ``camera`` (the visual maze task) every step also stores IMAGE (C, H, W, 3) uint8 frames with
    the goal marker at the expert's current goal (compressed, in small chunks, read lazily); the attrs
    then name env ``visual-<maze>``, ``cameras``, ``image_size`` [H, W] and ``camera``.
    The episodes are those of the state store with the same arguments (the frames draw no randomness).
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
    if camera is not None:
        attrs.update(
            env=VISUAL_PREFIX + short,
            cameras=list(camera.cameras),
            image_size=[camera.height, camera.width],
            camera=dataclasses.asdict(camera),
        )
    bar = tqdm(
        total=episodes * episode_length,
        unit="step",
        unit_scale=True,
        desc=f"demos {attrs['env']}",
        disable=not progress,
    )

    def stream() -> Iterator[dict[str, np.ndarray]]:
        # A generator so write_episodes streams: only one episode is in memory at a time.
        maze_expert = MazeExpert(config)
        for child in np.random.SeedSequence(seed).spawn(episodes):
            rng = np.random.default_rng(child)
            yield rollout_expert(maze_env, maze_expert, episode_length, rng, renderer)
            bar.update(episode_length)

    renderer = None if camera is None else MazeCamera(maze_env.unwrapped, camera)
    try:
        return write_episodes(out, stream(), attrs, overwrite=overwrite)
    finally:
        bar.close()
        if renderer is not None:
            renderer.close()
        maze_env.close()
