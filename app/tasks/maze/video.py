"""Replays of recorded point-maze episodes as frames: the video side of ``tmrl eval``'s traces.

A replay is kinematic: the point is put at each recorded xy position (its ``qpos``) and the maze is drawn
from above by the task's own camera (:class:`~app.tasks.maze.camera.MazeCamera`), goal marker at the
episode's goal. Nothing is simulated, so a video shows exactly the recorded path whatever batching, seeds or
sub-env produced it. About 90 frames/s at 128 x 128 on one shared core (software EGL, shadows off).
"""

from __future__ import annotations

import numpy as np

from app.tasks.maze.camera import CAMERAS, MazeCamera, MazeCameraConfig
from app.tasks.maze.env import make_maze_env, seeded_global_numpy

# the visual maze's env names (app/tasks/maze/visual.py, whose import pulls in the training stack): the
# state maze behind the prefix
VISUAL_PREFIX = "visual-"


def render_path(
    env_name: str,
    path_xy: np.ndarray,
    goal_xy: np.ndarray,
    size: int = 128,
    every: int = 1,
    marker_radius: float = 1.0,
    view: str = "top",
) -> np.ndarray:
    """(T', size, size, 3) uint8 frames of the point at ``path_xy[::every]`` in maze ``env_name``.

    Args:
        env_name: a point maze ("pointmaze-medium", its OGBench id, or "visual-pointmaze-medium").
        path_xy: (T, 2) the point's recorded xy position at each step of the episode.
        goal_xy: (2,) the episode's goal, where the marker is drawn.
        size: pixels of the square frames.
        every: render every ``every``-th step only (T' = ceil(T / every)); frame k shows step k * every.
        marker_radius: the goal marker's drawn radius in maze units (display only: a cell is 4 units; the
            env counts a goal reached within 0.5).
        view: a camera of ``CAMERAS``: "top" (the whole maze) or "follow" (a few cells around the point).

    Raises:
        ValueError: ``path_xy`` not (T, 2) finite with T >= 1, ``goal_xy`` not 2 finite values, ``every`` < 1,
            an unknown maze, view or size.
    """
    path_xy = np.asarray(path_xy, np.float64)
    goal_xy = np.asarray(goal_xy, np.float64).reshape(-1)
    if path_xy.ndim != 2 or path_xy.shape[1] != 2 or len(path_xy) == 0 or not np.isfinite(path_xy).all():
        raise ValueError(f"render_path: path_xy has shape {path_xy.shape}; expected finite (T, 2), T >= 1")
    if goal_xy.shape != (2,) or not np.isfinite(goal_xy).all():
        raise ValueError(f"render_path: goal_xy has shape {goal_xy.shape}; expected 2 finite values")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"render_path: every={every!r}; expected an integer >= 1")
    if view not in CAMERAS:
        raise ValueError(f"render_path: view={view!r}; expected one of {list(CAMERAS)}")
    cfg = MazeCameraConfig(cameras=[view], width=size, height=size, marker_radius=marker_radius)
    env = make_maze_env(env_name.removeprefix(VISUAL_PREFIX))
    maze = env.unwrapped
    # a reset builds the scene; OGBench's start jitter draws from the global generator: keep it untouched
    with seeded_global_numpy(None, seed=0):
        maze.reset(seed=0, options=dict(task_id=1))
    camera = MazeCamera(maze, cfg)
    shown = path_xy[::every]
    frames = np.empty((len(shown), *cfg.frame_shape), np.uint8)  # (T', 1, size, size, 3)
    try:
        for k, xy in enumerate(shown):
            maze.set_xy(xy)  # qpos = xy, then mj_forward: the point's body moves there
            camera.render(maze.data, goal_xy, out=frames[k])
    finally:
        camera.close()
        env.close()
    return frames[:, 0]
