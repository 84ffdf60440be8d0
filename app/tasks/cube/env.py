"""OGBench cube-single observed as a robot sees it: proprioception plus a camera sensor, either fused
depth-camera point clouds or RGB camera frames (``CubeConfig.output``).

:class:`CubePointCloudEnv` wraps ``cube-single-v0`` in OGBench's ``data_collection`` mode (random arm,
cube and target at every reset; the privileged target info the scripted oracle needs). Its observation is

    {"state": (19,) float32       proprioception: OGBench's cube observation without the cube's dims
                                  (joint pos 6, joint vel 6, (effector xyz - (0.425, 0, 0)) * 10 (3),
                                  cos/sin effector yaw (2), gripper opening * 3 (1), gripper contact (1)),
     "pointcloud": (N, 3) float32 world frame, metres: depth rendered headless from ``config.cameras``,
                                  back-projected, cropped to the workspace box, downsampled to exactly N,
     or "image": (C, H, W, 3) uint8  RGB frames of ``config.cameras`` (``output: image``), drawn as
                                  OGBench's ``visual-cube-single-v0`` draws them (its ``front_pixels``
                                  camera, purple gripper, arm at 10% opacity, target marker hidden), but
                                  with shadows off and only when a frame is asked for,
     "goal": (3,) float32         target cube centre, world frame, metres}

Success (the env's own ``info["success"]``) is ||cube centre - goal|| <= 0.04 m, so a hindsight goal is the
cube centre at a later step (``achieved_goal`` in the episodes), in the same space and units.

Held-out variation: a goal region of the table (``config.heldout_low/high``, by default the corner
x in [0.45, 0.55], y in [0.15, 0.3], 10% of OGBench's target area) that the "train" variation never uses
for a target or an initial cube position; "heldout" draws every target inside it (cubes start outside).
So fine-tuning asks for placements at positions no demonstration was labelled with, next to the covered
region (where the pre-trained policy should have SOME success to build on, METHOD.md section 5).

:func:`rollout_oracle` generates demonstrations as OGBench's "noisy" datasets are made: its Markov
oracle, per-episode noise level xi ~ U(0, noise), Gaussian action noise of std (xi, xi, xi, 3 xi, 10 xi),
a uniform random action with probability ``p_random_action``, and a new target whenever the oracle is done.
Rendering draws no randomness, so the same generator gives the same episode whatever the sensor.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from typing import Any

import gymnasium
import mujoco
import numpy as np

from app.tasks.cube.config import (
    ACTION_DIM,
    CAMERAS,
    CUBE_Z,
    ENV_ID,
    GOAL_DIM,
    PROPRIO_DIM,
    ROBOT_GEOMETRY,
    TABLE_HIGH,
    TABLE_LOW,
    CubeConfig,
    OracleConfig,
)
from app.tasks.cube.pointcloud import (
    Intrinsics,
    depths_to_pointcloud,
    free_camera_pose,
    intrinsics_from_fovy,
    pose_from_pos_xmat,
)
from app.tasks.maze.env import seeded_global_numpy
from modules.nets.keys import IMAGE, POINTCLOUD


@functools.cache
def pixel_materials() -> dict[str, tuple[float, ...]]:
    """Material name -> RGBA of OGBench's pixel tasks (``ob_type='pixels'``: the gripper purple, the arm at
    10% opacity), read from the MJCF model OGBench builds for them (~0.7 s, once per process). Only the
    materials' colours differ from the state task's model: the same geometry, lights and cameras."""
    from ogbench.manipspace.envs.cube_env import CubeEnv

    arena = CubeEnv(env_type="single", ob_type="pixels").build_mjcf_model()
    return {m.full_identifier: tuple(m.rgba) for m in arena.find_all("material") if m.rgba is not None}


HIDDEN_GROUP = 5  # a geom group no sensor draws (ROBOT_GEOMETRY never enables it)


def hide_arena_collision_geoms(model: Any) -> None:
    """Move the collision-only geoms of the world body (the arena's see-through walls: group 3, like the
    robot's collision shapes) to ``HIDDEN_GROUP``, so drawing the robot by its collision shapes does not draw
    them too. A depth render ignores transparency: drawn, the walls (0.4 m high around the table) hide the
    table and the cube from both depth cameras. Geom groups only select what is drawn, not physics."""
    for g in range(model.ngeom):
        if model.geom_bodyid[g] == 0 and model.geom_group[g] == 3:
            model.geom_group[g] = HIDDEN_GROUP


class CubePointCloudEnv:
    """cube-single with camera observations (module docstring); a gymnasium-like reset/step API.

    ``reset(seed)`` and ``step(action)`` return the observation dict with the sensor's output under
    ``config.output`` ("pointcloud" or "image"); ``pointcloud=False`` skips rendering (the dict then has
    neither), for the steps of a chunk whose observation no one reads. ``info`` is OGBench's (privileged
    cube/target state included, for the oracle).
    """

    def __init__(self, config: CubeConfig | None = None) -> None:
        import ogbench  # noqa: F401  (registers the OGBench environments)

        self.config = cfg = config or CubeConfig()
        self.env = gymnasium.make(
            ENV_ID,
            mode="data_collection",
            terminate_at_goal=False,
            visualize_info=False,  # the target marker stays invisible (as in OGBench's pixel tasks)
            width=cfg.width,  # the model's offscreen buffer must be at least the rendered size
            height=cfg.height,
            max_episode_steps=cfg.max_episode_steps,
            # the checker's probe of observation_space resets OGBench's env twice: 2.6 of 5.9 s per env
            disable_env_checker=True,
        )
        self.env.reset(seed=0)  # compiles the MuJoCo model
        self.sim: Any = self.env.unwrapped
        model = self.sim._model
        try:
            self.renderer = mujoco.Renderer(model, cfg.height, cfg.width)
        except mujoco.FatalError as err:  # mujoco picks its GL backend once, when it is first imported
            raise RuntimeError(
                f"headless rendering failed ({err}); set MUJOCO_GL=egl (or osmesa) in the environment before "
                f"anything imports mujoco (it is {os.environ.get('MUJOCO_GL')!r})"
            ) from err
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False  # 5-30x faster software rendering
        if cfg.output == POINTCLOUD:
            self.renderer.enable_depth_rendering()
        else:  # the model is this env's own: recolouring it changes no other env
            for name, rgba in pixel_materials().items():
                model.mat_rgba[model.material(name).id] = rgba
        self._scene_option = mujoco.MjvOption()
        self._scene_option.geomgroup[:] = [int(g in ROBOT_GEOMETRY[cfg.robot_geometry]) for g in range(6)]
        hide_arena_collision_geoms(model)
        self.max_depth = 0.999 * model.vis.map.zfar * model.stat.extent  # pixels at the far plane saw nothing
        self._views = [self._view(name) for name in cfg.cameras]

    def _view(self, name: str) -> tuple[Any, Intrinsics, np.ndarray | None]:
        """(camera argument for update_scene, intrinsics, fixed pose or None = read from data each time)."""
        model, spec, cfg = self.sim._model, CAMERAS[name], self.config
        if spec is None:
            cam_id = model.camera(name).id
            return cam_id, intrinsics_from_fovy(float(model.cam_fovy[cam_id]), cfg.width, cfg.height), None
        cam = mujoco.MjvCamera()
        cam.type = mujoco.mjtCamera.mjCAMERA_FREE
        cam.lookat[:], cam.distance = spec.lookat, spec.distance
        cam.azimuth, cam.elevation = spec.azimuth, spec.elevation
        pose = free_camera_pose(spec.lookat, spec.distance, spec.azimuth, spec.elevation)
        return cam, intrinsics_from_fovy(float(model.vis.global_.fovy), cfg.width, cfg.height), pose

    @property
    def intrinsics(self) -> list[Intrinsics]:
        """Per-camera intrinsics, in ``config.cameras`` order."""
        return [k for _, k, _ in self._views]

    def camera_poses(self) -> list[np.ndarray]:
        """Per-camera (4, 4) camera-to-world transforms (conventions in app/envs/pointcloud.py)."""
        data = self.sim._data
        return [
            pose if pose is not None else pose_from_pos_xmat(data.cam_xpos[cam], data.cam_xmat[cam])
            for cam, _, pose in self._views
        ]

    def _renders(self) -> Iterator[np.ndarray]:
        """One render of the current scene per camera, in ``config.cameras`` order (depth or RGB)."""
        for cam, _, _ in self._views:
            self.renderer.update_scene(self.sim._data, camera=cam, scene_option=self._scene_option)
            yield self.renderer.render()

    def render_depths(self) -> list[np.ndarray]:
        """Per-camera (H, W) float32 depth images in metres (distance along the viewing axis)."""
        return list(self._renders())

    def frames(self) -> np.ndarray:
        """(C, H, W, 3) uint8 RGB frames of the current scene (``output`` "image" only)."""
        self._check_output(IMAGE, "frames")
        return np.stack(list(self._renders()))

    def pointcloud(self) -> np.ndarray:
        """(N, 3) float32 world-frame cloud of the current scene (render, back-project, crop, downsample)."""
        self._check_output(POINTCLOUD, "pointcloud")
        cfg = self.config
        return depths_to_pointcloud(
            self.render_depths(),
            self.intrinsics,
            self.camera_poses(),
            n=cfg.num_points,
            low=cfg.crop_low,
            high=cfg.crop_high,
            method=cfg.downsample,
            voxel_size=cfg.voxel_size,
            max_depth=self.max_depth,
            seed=cfg.cloud_seed,
        )

    def _check_output(self, output: str, method: str) -> None:
        if self.config.output != output:  # the renderer is set up for depth or for RGB, never both
            raise RuntimeError(
                f"CubePointCloudEnv.{method}() needs config.output={output!r}; it is {self.config.output!r}"
            )

    def sense(self) -> np.ndarray:
        """The sensor's output of the current scene: ``pointcloud()`` or ``frames()`` (``config.output``)."""
        return self.pointcloud() if self.config.output == POINTCLOUD else self.frames()

    @property
    def output_spec(self) -> tuple[tuple[int, ...], type]:
        """(per-step shape, dtype) of ``sense()``: ((N, 3), float32) or ((C, H, W, 3), uint8)."""
        if self.config.output == POINTCLOUD:
            return (self.config.num_points, 3), np.float32
        return self.config.frame_shape, np.uint8

    def cube_position(self) -> np.ndarray:
        """(3,) float64 cube centre, world metres (the achieved goal)."""
        return self.sim._data.joint("object_joint_0").qpos[:3].copy()

    def goal(self) -> np.ndarray:
        """(3,) float64 target cube centre, world metres."""
        return self.sim._data.mocap_pos[self.sim._cube_target_mocap_ids[0]].copy()

    def observe(self, ob: np.ndarray, pointcloud: bool = True) -> dict[str, np.ndarray]:
        """Observation dict (module docstring) from OGBench's (28,) state observation ``ob``; the sensor's
        output under ``config.output`` unless ``pointcloud`` is False (the name predates the frames)."""
        obs = {
            "state": np.asarray(ob[:PROPRIO_DIM], dtype=np.float32),
            "goal": self.goal().astype(np.float32),
        }
        if pointcloud:
            obs[self.config.output] = self.sense()
        return obs

    def reset(self, seed: int | None = None, pointcloud: bool = True) -> tuple[dict[str, np.ndarray], dict]:
        """Random arm, cube and target (per ``config.variation``); returns (observation, info)."""
        self.env.reset(seed=seed)
        rng = self.sim.np_random  # seeded by reset: the variation's draws are reproducible from ``seed``
        data = self.sim._data
        data.joint("object_joint_0").qpos[:2] = self._sample_xy(rng, inside=False)
        data.mocap_pos[self.sim._cube_target_mocap_ids[0]] = (*self._target_xy(rng), CUBE_Z)
        mujoco.mj_forward(self.sim._model, data)
        return self.observe(self.sim.compute_observation(), pointcloud), self.sim.compute_ob_info()

    def new_target(self) -> dict:
        """Draw a new target for the cube where it lies (OGBench's data collection); returns the new info."""
        self.sim.set_new_target(return_info=False)
        target = self._target_xy(self.sim.np_random)
        self.sim._data.mocap_pos[self.sim._cube_target_mocap_ids[0]] = (*target, CUBE_Z)
        mujoco.mj_forward(self.sim._model, self.sim._data)
        return self.sim.compute_ob_info()

    def step(
        self, action: np.ndarray, pointcloud: bool = True
    ) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        """One step with ``action`` (5,) in [-1, 1]; returns (obs, reward, terminated, truncated, info)."""
        ob, reward, terminated, truncated, info = self.env.step(np.asarray(action, dtype=np.float64))
        return self.observe(ob, pointcloud), float(reward), bool(terminated), bool(truncated), info

    def _target_xy(self, rng: np.random.Generator) -> np.ndarray:
        """(2,) target for the variation, at least ``min_goal_distance`` from the cube."""
        cube = self.cube_position()[:2]
        for _ in range(1000):
            xy = self._sample_xy(rng, inside=self.config.variation == "heldout")
            if np.linalg.norm(xy - cube) >= self.config.min_goal_distance:
                return xy
        raise RuntimeError(f"no target {self.config.min_goal_distance} m away from the cube at {cube}")

    def _sample_xy(self, rng: np.random.Generator, inside: bool) -> np.ndarray:
        """(2,) uniform in the held-out region if ``inside``, else uniform on the table outside it."""
        lo, hi = np.asarray(self.config.heldout_low), np.asarray(self.config.heldout_high)
        if inside:
            return rng.uniform(lo, hi)
        while True:  # rejection: the region covers at most half of the table (checked in CubeConfig)
            xy = rng.uniform(TABLE_LOW, TABLE_HIGH)
            if not np.all((xy >= lo) & (xy <= hi)):
                return xy

    def close(self) -> None:
        """Free the renderer's GL context and the environment."""
        self.renderer.close()
        self.env.close()


def rollout_oracle(
    env: CubePointCloudEnv,
    length: int,
    rng: np.random.Generator,
    config: OracleConfig | None = None,
    pointcloud: bool = True,
) -> dict[str, np.ndarray]:
    """Roll out one ``length``-step noisy oracle episode (module docstring); a new target each time the
    oracle is done (placed the cube and moved away, or 200 steps). Reproducible from ``rng``.

    Returns per-step arrays, row t = the observation at which action t was taken (T = ``length``):
        ``{"observation": (T, 19) float32 proprioceptive state, the sensor's output under
        ``env.config.output`` unless pointcloud=False ("pointcloud": (T, N, 3) float32 or "image":
        (T, C, H, W, 3) uint8), "action": (T, 5) float32 in [-1, 1], "expert_goal": (T, 3) float32 target
        the oracle was heading for (marks the segments), "achieved_goal": (T, 3) float32 cube centre,
        "success": (T,) bool cube within 0.04 m of the target AFTER action t}``.
    """
    from ogbench.manipspace.oracles.markov.cube_markov import CubeMarkovOracle

    if length <= 0:
        raise ValueError(f"rollout_oracle: length must be > 0, got {length}")
    cfg = config or OracleConfig()
    key = env.config.output
    shape, dtype = env.output_spec
    out = {
        "observation": np.empty((length, PROPRIO_DIM), np.float32),
        **({key: np.empty((length, *shape), dtype)} if pointcloud else {}),
        "action": np.empty((length, ACTION_DIM), np.float32),
        "expert_goal": np.empty((length, GOAL_DIM), np.float32),
        "achieved_goal": np.empty((length, GOAL_DIM), np.float32),
        "success": np.empty(length, bool),
    }
    # The oracle draws its final arm pose from the global np.random: seed it from rng for this episode.
    with seeded_global_numpy(rng):
        obs, info = env.reset(seed=int(rng.integers(2**31)), pointcloud=pointcloud)
        oracle = CubeMarkovOracle(env=env.env, min_norm=cfg.min_norm)
        oracle.reset(None, info)
        noise_std = rng.uniform(0.0, cfg.noise) * np.array([1.0, 1.0, 1.0, 3.0, 10.0])
        for t in range(length):
            if rng.random() < cfg.p_random_action:
                action = rng.uniform(-1.0, 1.0, ACTION_DIM)
            else:
                action = np.asarray(oracle.select_action(None, info)) + rng.normal(0.0, noise_std)
            action = np.clip(action, -1.0, 1.0)
            out["observation"][t], out["action"][t], out["expert_goal"][t] = obs["state"], action, obs["goal"]
            out["achieved_goal"][t] = env.cube_position()
            if pointcloud:
                out[key][t] = obs[key]
            obs, _, _, _, info = env.step(action, pointcloud=pointcloud)
            out["success"][t] = bool(info["success"])
            if oracle.done:
                info = env.new_target()
                oracle.reset(None, info)
                obs["goal"] = env.goal().astype(np.float32)
    return out
