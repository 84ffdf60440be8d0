"""Replays of recorded cube-single episodes as frames: the cube task's side of rollout videos.

Kinematic, as the maze's (app/tasks/maze/video.py): the whole scene (arm joints, gripper, cube) is put at
each recorded ``qpos`` and drawn by the task's own RGB sensor (:class:`~app.tasks.cube.env.CubePointCloudEnv`
with ``output="image"``: OGBench's pixel-task colours, shadows off). The target is shown as OGBench shows it
when ``visualize_info`` is on: a cube of the cube's colour at 20% opacity at ``goal_xyz``.
"""

from __future__ import annotations

import mujoco
import numpy as np

from app.tasks.cube.config import CAMERAS, CubeConfig
from app.tasks.cube.env import CubePointCloudEnv
from modules.nets.keys import IMAGE

TARGET_ALPHA = 0.2  # OGBench's target opacity with visualize_info


def render_qpos(
    qpos: np.ndarray, goal_xyz: np.ndarray, size: int = 128, every: int = 1, camera: str = "front_pixels"
) -> np.ndarray:
    """(T', size, size, 3) uint8 frames of the cube-single scene at ``qpos[::every]``.

    Args:
        qpos: (T, nq) the simulator's full ``qpos`` at each step (OGBench's ``info["qpos"]``; nq = 21 for
            cube-single: arm 6, gripper 8, cube position 3 and quaternion 4).
        goal_xyz: (3,) the target cube centre, world metres.
        size: pixels of the square frames.
        every: render every ``every``-th step only (T' = ceil(T / every)).
        camera: a camera of the cube task's ``CAMERAS`` ("front_pixels": OGBench's visual-cube view).

    Raises:
        ValueError: ``qpos`` not (T, nq) finite with T >= 1, ``goal_xyz`` not 3 finite values, ``every`` < 1,
            an unknown camera.
    """
    qpos = np.asarray(qpos, np.float64)
    goal_xyz = np.asarray(goal_xyz, np.float64).reshape(-1)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"render_qpos: every={every!r}; expected an integer >= 1")
    if camera not in CAMERAS:
        raise ValueError(f"render_qpos: camera={camera!r}; expected one of {sorted(CAMERAS)}")
    if goal_xyz.shape != (3,) or not np.isfinite(goal_xyz).all():
        raise ValueError(f"render_qpos: goal_xyz has shape {goal_xyz.shape}; expected 3 finite values")
    if qpos.ndim != 2 or len(qpos) == 0 or not np.isfinite(qpos).all():
        raise ValueError(f"render_qpos: qpos has shape {qpos.shape}; expected finite (T, nq), T >= 1")
    env = CubePointCloudEnv(CubeConfig(cameras=[camera], output=IMAGE, width=size, height=size))
    try:
        sim = env.sim
        model, data = sim._model, sim._data
        if qpos.shape[1] != model.nq:
            raise ValueError(
                f"render_qpos: qpos has {qpos.shape[1]} values per step; the scene has {model.nq}"
            )
        data.mocap_pos[sim._cube_target_mocap_ids[0]] = goal_xyz
        data.mocap_quat[sim._cube_target_mocap_ids[0]] = (1.0, 0.0, 0.0, 0.0)
        for gid in sim._cube_target_geom_ids_list[0]:
            model.geom_rgba[gid, 3] = TARGET_ALPHA
        shown = qpos[::every]
        frames = np.empty((len(shown), size, size, 3), np.uint8)
        for k, q in enumerate(shown):
            data.qpos[:] = q
            mujoco.mj_forward(model, data)  # positions only: nothing is simulated
            frames[k] = env.frames()[0]
    finally:
        env.close()
    return frames
