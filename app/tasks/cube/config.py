"""The cube task's settings: its constants, the sensor (cameras and what they hand out: a depth point cloud
or RGB frames), the scripted oracle's noise, the Success@K evaluation and the `tmrl fit` schema of
point-cloud runs (the camera-frame runs' is in app/tasks/cube/visual_config.py).

Light on purpose: loading a config imports neither MuJoCo nor the renderer (app/tasks/cube/env.py does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from app.schema import DemoConfig, FitConfig
from app.tasks.cube.pointcloud import DOWNSAMPLERS
from datamodules.pointcloud import PointCloudDataConfig
from modules.nets.keys import IMAGE, POINTCLOUD

ENV_ID = "cube-single-v0"
PROPRIO_DIM = 19  # leading dims of OGBench's cube observation that are the robot's own (layout above)
GOAL_DIM = 3
ACTION_DIM = 5
CUBE_Z = 0.02  # a cube resting on the table (half its 4 cm edge)
# OGBench's sampling area for cube positions and targets (ManipSpaceEnv._object/_target_sampling_bounds).
TABLE_LOW, TABLE_HIGH = (0.3, -0.3), (0.55, 0.3)
VARIATIONS = ("train", "heldout")
CUBE_ENVS = ("cube-single",)  # short names of the point-cloud cube tasks
VISUAL_PREFIX = "visual-"
VISUAL_CUBE_ENVS = tuple(VISUAL_PREFIX + env for env in CUBE_ENVS)  # the camera-frame tasks (OGBench's names)
# What the cameras hand out per step, named by the batch key it is read under: a fused depth cloud (N, 3)
# float32, or RGB frames (C, H, W, 3) uint8 drawn as OGBench's pixel tasks draw the scene.
OUTPUTS = (POINTCLOUD, IMAGE)
# What the depth cameras see of the robot -> the MuJoCo geom groups rendered (group 1: floor and cube,
# 2: the robot's visual meshes, 185k triangles, which bound software rendering to ~45 renders/s;
# 3: its collision primitives, ~2x faster, and the invisible walls, which the default crop box excludes).
ROBOT_GEOMETRY: dict[str, tuple[int, ...]] = {"visual": (0, 1, 2), "collision": (0, 1, 3), "none": (0, 1)}


def env_output(env: str) -> str:
    """What the demonstrations of cube env ``env`` (short name or id) record: frames for "visual-*", else
    clouds."""
    return IMAGE if env.startswith(VISUAL_PREFIX) else POINTCLOUD


def resolve_cube(name: str, envs: tuple[str, ...] = CUBE_ENVS) -> tuple[str, str]:
    """Map a cube task's short name ("cube-single") or OGBench id ("cube-single-v0") among ``envs`` to
    (short, id)."""
    for short in envs:
        if name in (short, f"{short}-v0"):
            return short, f"{short}-v0"
    raise ValueError(f"unknown cube environment {name!r}; expected one of {sorted(envs)}")


@dataclass(frozen=True)
class FreeCamera:
    """A MuJoCo free camera (not in the model): looks at ``lookat`` from ``distance`` metres."""

    lookat: tuple[float, float, float]
    distance: float
    azimuth: float  # degrees about world z; 180 looks along -x (from the front, like the "front" camera)
    elevation: float  # degrees; negative looks down


# Camera name -> None for a camera defined in OGBench's model (pose and fovy read from MuJoCo), or a free
# camera. "front_pixels" is the camera of OGBench's visual-cube tasks. "left"/"right" are as seen in the
# "front" camera's image (world -y / +y), both 45 deg to the side.
CAMERAS: dict[str, FreeCamera | None] = {
    "front": None,
    "front_pixels": None,
    "left": FreeCamera((0.425, 0.0, 0.05), 1.0, 135.0, -35.0),
    "right": FreeCamera((0.425, 0.0, 0.05), 1.0, -135.0, -35.0),
}


@dataclass
class CubeConfig:
    """The cube task: cameras, what they hand out, rendering, cloud size, workspace crop and variation."""

    # keys of CAMERAS, fused into one cloud; each camera is one render (~45/s with the robot's meshes)
    cameras: list[str] = field(default_factory=lambda: ["left", "right"])
    # "pointcloud": depth renders fused into one cloud; "image": one RGB frame per camera in OGBench's pixel
    # colours (a purple gripper, the arm at 10% opacity: ~2x the render time of opaque meshes). Only the
    # cloud uses num_points, crop_*, downsample, voxel_size and cloud_seed.
    output: str = POINTCLOUD
    width: int = 96  # rendered image size, pixels (per camera; hardly changes the render time)
    height: int = 96
    num_points: int = 512  # N: every cloud has exactly N points
    robot_geometry: str = "visual"  # "visual" | "collision" | "none": keys of ROBOT_GEOMETRY
    # workspace crop box, world metres: the table area inside the cube's walls (x 0.22..0.63, y +-0.38),
    # from 5 mm above the floor (drops the floor, keeps the 4 cm cube) up to the gripper's working height
    crop_low: list[float] = field(default_factory=lambda: [0.225, -0.375, 0.005])
    crop_high: list[float] = field(default_factory=lambda: [0.625, 0.375, 0.5])
    downsample: str = "voxel"  # "voxel" (fast) or "poisson" (evenly spaced, ~10x slower)
    voxel_size: float = 0.01  # metres
    cloud_seed: int = 0  # seeds the resampling to exactly N, so a scene always gives the same cloud
    variation: str = "train"  # "train" | "heldout" (module docstring)
    heldout_low: list[float] = field(default_factory=lambda: [0.45, 0.15])  # held-out goal region (x, y), m
    heldout_high: list[float] = field(default_factory=lambda: [0.55, 0.3])
    # targets are redrawn until this far (xy, metres) from the cube: twice the 0.04 m success radius, so no
    # episode starts solved (OGBench draws them independently; its evaluation tasks are >= 0.15 m apart)
    min_goal_distance: float = 0.08
    max_episode_steps: int = 200  # the env's time limit (truncation), OGBench's evaluation length

    def __post_init__(self) -> None:
        # lists (the config loader's sequence type); a caller's tuples are accepted and copied
        self.cameras = list(self.cameras)
        self.crop_low, self.crop_high = list(self.crop_low), list(self.crop_high)
        self.heldout_low, self.heldout_high = list(self.heldout_low), list(self.heldout_high)
        unknown = [c for c in self.cameras if c not in CAMERAS]
        if not self.cameras or unknown:
            raise ValueError(
                f"cameras must be a non-empty list of {sorted(CAMERAS)}, got {list(self.cameras)}"
            )
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {list(OUTPUTS)}, got {self.output!r}")
        if min(self.width, self.height) < 8:
            raise ValueError(f"width and height must be >= 8 pixels, got {self.width}x{self.height}")
        if self.robot_geometry not in ROBOT_GEOMETRY:
            raise ValueError(
                f"robot_geometry must be one of {sorted(ROBOT_GEOMETRY)}, got {self.robot_geometry!r}"
            )
        if self.num_points < 1:
            raise ValueError(f"num_points must be >= 1, got {self.num_points}")
        if len(self.crop_low) != 3 or len(self.crop_high) != 3:
            raise ValueError(
                f"crop_low and crop_high need 3 coordinates, got {self.crop_low}, {self.crop_high}"
            )
        if not all(lo < hi for lo, hi in zip(self.crop_low, self.crop_high, strict=True)):
            raise ValueError(
                f"crop_low must be < crop_high on every axis, got {self.crop_low}, {self.crop_high}"
            )
        if self.downsample not in DOWNSAMPLERS:
            raise ValueError(f"downsample must be one of {DOWNSAMPLERS}, got {self.downsample!r}")
        if self.voxel_size <= 0:
            raise ValueError(f"voxel_size must be > 0, got {self.voxel_size}")
        if self.variation not in VARIATIONS:
            raise ValueError(f"variation must be one of {VARIATIONS}, got {self.variation!r}")
        self._check_heldout()
        if not 0.0 <= self.min_goal_distance <= 0.1:  # <= 0.1: the held-out region always has room
            raise ValueError(f"min_goal_distance must be in [0, 0.1] metres, got {self.min_goal_distance}")
        if self.max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {self.max_episode_steps}")

    @property
    def frame_shape(self) -> tuple[int, int, int, int]:
        """(C, H, W, 3): one step's RGB frames (``output`` "image")."""
        return (len(self.cameras), self.height, self.width, 3)

    def _check_heldout(self) -> None:
        lo, hi = np.asarray(self.heldout_low), np.asarray(self.heldout_high)
        inside_table = np.all(lo >= TABLE_LOW) and np.all(hi <= TABLE_HIGH)
        if lo.shape != (2,) or hi.shape != (2,) or not np.all(lo < hi) or not inside_table:
            raise ValueError(
                f"heldout_low/high must be (x, y) with low < high inside the table area "
                f"{TABLE_LOW}..{TABLE_HIGH}, got {self.heldout_low}, {self.heldout_high}"
            )
        area = float(np.prod(hi - lo) / np.prod(np.subtract(TABLE_HIGH, TABLE_LOW)))
        # rejection sampling outside the region must stay cheap, and "train" keep most of the table
        if area > 0.5:
            raise ValueError(
                f"the held-out region covers {area:.0%} of the table area; at most 50% is allowed"
            )


@dataclass
class OracleConfig:
    """Noise of the scripted demonstrations; defaults are OGBench's cube-single "noisy" dataset settings."""

    noise: float = 0.1  # per-episode noise level xi ~ U(0, noise); action noise std (xi, xi, xi, 3xi, 10xi)
    p_random_action: float = 0.1  # probability of a uniform random action instead of the oracle's
    min_norm: float = 0.4  # CubeMarkovOracle's minimum norm of the position command

    def __post_init__(self) -> None:
        if self.noise < 0:
            raise ValueError(f"OracleConfig.noise must be >= 0, got {self.noise}")
        if not 0.0 <= self.p_random_action <= 1.0:
            raise ValueError(f"OracleConfig.p_random_action must be in [0, 1], got {self.p_random_action}")
        if self.min_norm < 0:
            raise ValueError(f"OracleConfig.min_norm must be >= 0, got {self.min_norm}")


@dataclass
class CubeEvalConfig:
    """Zero-shot Success@K evaluation on the point-cloud cube task (run at the end of pre-training)."""

    enabled: bool = True
    sigmas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    variations: list[str] = field(default_factory=lambda: list(VARIATIONS))  # CubeConfig.variation values
    # S * K rollouts per (variation, sigma); at ~0.35 rollouts/s on 2 cores (a cloud render per chunk
    # dominates), 2 variations x 5 sigmas x 8 x 3 x 200 steps take up to ~15 minutes
    states: int = 8  # S fixed initial states per variation
    rollouts: int = 3  # K_max independent rollouts per state (fresh z and eps_c each)
    exec_horizon: int = 8  # actions executed open loop from each sampled chunk
    sample_steps: int = 10  # Euler steps per chunk
    max_episode_steps: int = 200  # env steps per rollout (replaces demos.cube.max_episode_steps)
    seed: int = 0  # fixes the S scenes of each variation and the noise draws

    def __post_init__(self) -> None:
        for name in ("states", "rollouts", "exec_horizon", "sample_steps", "max_episode_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"eval.{name} must be >= 1, got {value!r}")
        if not self.sigmas or any(not 0.0 <= s <= 1.0 for s in self.sigmas):
            raise ValueError(f"eval.sigmas must be a non-empty list of values in [0, 1], got {self.sigmas}")
        if len(set(self.sigmas)) != len(self.sigmas):
            raise ValueError(f"eval.sigmas has duplicates: {self.sigmas}")
        bad = [v for v in self.variations if v not in VARIATIONS]
        if not self.variations or bad or len(set(self.variations)) != len(self.variations):
            raise ValueError(
                f"eval.variations must be a non-empty list of distinct values from {list(VARIATIONS)}, "
                f"got {self.variations}"
            )


@dataclass
class PointCloudDemoConfig(DemoConfig):
    """Point-cloud demonstrations: the cube task's cameras and cloud, and its scripted oracle's noise."""

    env: str = "cube-single"
    episodes: int = 100
    episode_length: int = 200
    cube: CubeConfig = field(default_factory=CubeConfig)
    oracle: OracleConfig = field(default_factory=OracleConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_output(self.env, self.cube)


def check_output(env: str, cube: CubeConfig) -> None:
    """Refuse sensor settings ``cube`` whose output is not what cube env ``env``'s demonstrations record."""
    if cube.output != env_output(env):
        raise ValueError(
            f"demos.cube.output={cube.output!r}, but {env} demonstrations record {env_output(env)!r}; set "
            f"demos.cube.output: {env_output(env)} (or demos.env to the task of the sensor you want)"
        )


@dataclass
class PointCloudFitConfig(FitConfig):
    """`tmrl fit` with ``policy.context_mode: pointcloud``: point-cloud data and demonstrations, and the
    cube task's Success@K evaluation (in ``demos.cube``'s cameras and cloud)."""

    data: PointCloudDataConfig = field(default_factory=PointCloudDataConfig)
    demos: PointCloudDemoConfig = field(default_factory=PointCloudDemoConfig)
    eval: CubeEvalConfig = field(default_factory=CubeEvalConfig)

    def __post_init__(self) -> None:
        sizes = {
            "data.num_points": self.data.num_points,
            "policy.num_points": self.policy.num_points,
            "demos.cube.num_points": self.demos.cube.num_points,
        }
        if len(set(sizes.values())) != 1:
            raise ValueError(
                f"the point count must agree: {sizes}; set policy.num_points: ${{data.num_points}} "
                "and demos.cube.num_points: ${data.num_points}"
            )
        if self.eval.enabled and self.eval.exec_horizon > self.policy.chunk_len:  # refused before training
            raise ValueError(
                f"eval.exec_horizon={self.eval.exec_horizon} exceeds policy.chunk_len={self.policy.chunk_len}"
            )
