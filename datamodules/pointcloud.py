"""Point-cloud demonstrations as training windows for CSP pre-training, read lazily from an episode store.

A window is (proprioceptive observation at t, point cloud at t, hindsight goal, actions t .. t+L-1), all
from ONE episode. The store names the array hindsight goals come from in its ``goal_key`` attribute
(``achieved_goal`` for cube-single: the cube centre, which the observation does not contain), so a
relabelled goal lives in the space and units the environment's goal has at test time. Windows, episode
splits and goal ranges are those of datamodules/state.py.

Memory: the point clouds (N x 3 floats a step, >98% of the bytes) stay on disk; each DataLoader process
opens the zarr array itself and reads only the frames a batch needs (``__getitems__``: one read per batch).
The low-dimensional arrays (observation, action, goal: tens of floats a step) are loaded, since the
statistics and the goal ranges need them whole anyway. ``load_to_memory=true`` loads the clouds too.

Augmentations (training split only) act on the cloud alone: Gaussian jitter of every coordinate, and a
rotation about the vertical axis through the workspace centre. Goal, proprioception and actions stay in the
world frame, so the rotation is a small perturbation (robustness to camera pose error), not a symmetry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset

from datamodules.episodes import EpisodeStore, StoreRows
from datamodules.state import (
    SEGMENT_KEY,
    StateDataConfig,
    WindowDataModule,
    sample_goal_index,
    split_key,
    split_windows,
)
from modules.nets.keys import ACTION, GOAL, OBS, POINTCLOUD
from modules.nets.pointnet import pointcloud_stats


@dataclass
class PointCloudDataConfig(StateDataConfig):
    """The state data settings (path, split, batch, workers, goal sampling), plus what the point-cloud store
    must look like and how training clouds are augmented."""

    env: str | None = None  # the store's attrs "env" must equal this (e.g. cube-single); None: not checked
    num_points: int = 512  # N every stored cloud must have; a store with another N is refused
    jitter_std: float = 0.002  # metres, Gaussian noise on every coordinate of a training cloud; 0 = off
    rotate_deg: float = 5.0  # max |angle| of a uniform rotation about the vertical axis; 0 = off
    load_to_memory: bool = False  # True: read every cloud into memory at setup (small stores only)
    stats_frames: int = 256  # training frames sampled for the cloud centre and scale

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_points < 1:
            raise ValueError(f"data.num_points must be >= 1, got {self.num_points}")
        if self.jitter_std < 0:
            raise ValueError(f"data.jitter_std must be >= 0 metres, got {self.jitter_std}")
        if not 0.0 <= self.rotate_deg <= 180.0:
            raise ValueError(f"data.rotate_deg must be in [0, 180] degrees, got {self.rotate_deg}")
        if self.stats_frames < 1:
            raise ValueError(f"data.stats_frames must be >= 1, got {self.stats_frames}")


# what the cube's demonstration generator records in attrs "arena_walls": the arena's see-through collision
# walls are not drawn by the sensor (app/tasks/cube/env.py hide_arena_collision_geoms). Stores drawn by the
# robot's collision shapes without this attribute were rendered with the walls drawn, which hid the table and
# the cube from the depth cameras: their clouds show the arm, almost never the cube.
ARENA_WALLS = "hidden"


class DatasetMismatchError(ValueError):
    """An existing episode store does not match the data config (env, keys or cloud size)."""


def check_pointcloud_store(store: EpisodeStore, cfg: PointCloudDataConfig) -> str:
    """Refuse a store that does not match ``cfg``; return the name of its goal array (attrs ``goal_key``).

    Raises:
        DatasetMismatchError: naming the file, the attribute or key, and the stored and expected values.
    """
    path, attrs = store.path, store.attrs
    if cfg.env is not None and attrs.get("env") != cfg.env:
        raise DatasetMismatchError(
            f"{path}: attrs 'env' is {attrs.get('env')!r}, but data.env is {cfg.env!r}; point data.path "
            f"at a {cfg.env} store or generate one with `tmrl demos --env {cfg.env}`"
        )
    if attrs.get("robot_geometry") == "collision" and attrs.get("arena_walls") != ARENA_WALLS:
        raise DatasetMismatchError(
            f"{path}: its clouds were rendered with the arena's collision walls drawn (robot_geometry "
            f"'collision', attrs 'arena_walls' is {attrs.get('arena_walls')!r}, not {ARENA_WALLS!r}): the "
            "walls hid the table and the cube from the cameras; delete the store (or `tmrl demos ... "
            "--overwrite`) to regenerate it"
        )
    goal_key = attrs.get("goal_key")
    if not goal_key:
        raise DatasetMismatchError(
            f"{path}: attrs 'goal_key' is missing; it must name the per-step array hindsight goals come "
            f"from (e.g. 'achieved_goal'), as `tmrl demos --env cube-single` writes it"
        )
    needed = [OBS, ACTION, POINTCLOUD, goal_key] + ([SEGMENT_KEY] if cfg.goal_sampling == "segment" else [])
    for key in needed:
        if key not in store.keys:
            raise DatasetMismatchError(
                f"{path}: key {key!r} is missing (the store has {store.keys}); the point-cloud data "
                f"config needs {needed}"
            )
    shapes = {key: tuple(spec["shape"]) for key, spec in attrs["keys"].items()}
    for key in (OBS, ACTION, goal_key):
        if len(shapes[key]) != 1:
            raise DatasetMismatchError(f"{path}: key {key!r} has per-step shape {shapes[key]}, expected (d,)")
    cloud = shapes[POINTCLOUD]
    if len(cloud) != 2 or cloud[1] != 3:
        raise DatasetMismatchError(f"{path}: key {POINTCLOUD!r} has per-step shape {cloud}, expected (N, 3)")
    if cloud[0] != cfg.num_points:
        raise DatasetMismatchError(
            f"{path}: key {POINTCLOUD!r} has {cloud[0]} points per cloud, but data.num_points is "
            f"{cfg.num_points}; regenerate it (`tmrl demos --num-points {cfg.num_points}`) or set "
            f"data.num_points={cloud[0]}"
        )
    return str(goal_key)


@dataclass(frozen=True)
class CloudAugment:
    """Jitter and a rotation about the vertical (z) axis through ``center_xy``, for one (N, 3) cloud."""

    jitter_std: float  # metres
    rotate_deg: float  # the angle is uniform in [-rotate_deg, rotate_deg]
    center_xy: tuple[float, float]  # the rotation's axis, world metres

    def __call__(self, cloud: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N, 3) -> (N, 3), a new tensor; draws from ``generator`` (None: torch's global RNG)."""
        out = cloud.clone()
        if self.rotate_deg > 0:
            angle = math.radians(self.rotate_deg) * (2.0 * torch.rand((), generator=generator).item() - 1.0)
            c, s = math.cos(angle), math.sin(angle)
            rot = torch.tensor([[c, -s], [s, c]], dtype=cloud.dtype)
            center = torch.tensor(self.center_xy, dtype=cloud.dtype)
            out[:, :2] = (cloud[:, :2] - center) @ rot.T + center  # z unchanged
        if self.jitter_std > 0:
            out += self.jitter_std * torch.randn(out.shape, dtype=out.dtype, generator=generator)
        return out


class PointCloudWindowDataset(Dataset):
    """Windows (observation, point cloud, hindsight goal, action chunk); clouds are read on demand."""

    def __init__(
        self,
        path: str,
        observations: np.ndarray,  # (S, d_o) all episodes concatenated, S = store steps
        actions: np.ndarray,  # (S, d_a)
        goals: np.ndarray,  # (S, d_g) the store's goal_key array
        windows: np.ndarray,  # (W, 2) (start, goal_end) from window_starts
        chunk_len: int,
        goal_sampling: str = "future",
        goal_geometric_p: float = 0.01,
        goal_end_p: float = 0.0,
        clouds: np.ndarray | None = None,  # (S, N, 3) in memory, or None: read from ``path`` on demand
        augment: CloudAugment | None = None,
    ) -> None:
        self.path = path
        self.observations, self.actions, self.goals = observations, actions, goals
        self.windows = windows
        self.chunk_len = chunk_len
        self.goal_args = (goal_sampling, goal_geometric_p, goal_end_p)
        self.augment = augment
        self.source = StoreRows(path, POINTCLOUD, clouds)

    @property
    def clouds(self) -> zarr.Array | np.ndarray:
        """(S, N, 3) clouds: the in-memory array, or the zarr array opened by THIS process."""
        return self.source.array

    def __len__(self) -> int:
        return len(self.windows)

    def _read_clouds(self, rows: np.ndarray) -> np.ndarray:
        """(R, N, 3) float32 clouds at the sorted, unique store rows ``rows``, in one read."""
        return self.source.read(rows).astype(np.float32, copy=False)

    def _item(self, start: int, end: int, cloud: np.ndarray, generator) -> dict[str, torch.Tensor]:
        g = sample_goal_index(start, end, *self.goal_args, generator)
        pc = torch.from_numpy(cloud)
        return {
            OBS: torch.from_numpy(self.observations[start]),  # (d_o,)
            GOAL: torch.from_numpy(self.goals[g]),  # (d_g,)
            POINTCLOUD: self.augment(pc, generator) if self.augment is not None else pc,  # (N, 3)
            ACTION: torch.from_numpy(self.actions[start : start + self.chunk_len]),  # (L, d_a)
        }

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """The items of a whole batch, with ONE read of the clouds they need (the DataLoader calls this);
        ``keys`` as :func:`datamodules.state.split_key` reads them."""
        indices, generators = zip(*map(split_key, keys), strict=True) if keys else ((), ())
        windows = self.windows[np.asarray(indices, dtype=np.int64)]  # (B, 2)
        rows, inverse = np.unique(windows[:, 0], return_inverse=True)
        clouds = self._read_clouds(rows)  # (R, N, 3)
        parts = zip(windows.tolist(), inverse, generators, strict=True)
        return [self._item(s, e, clouds[j], g) for (s, e), j, g in parts]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        return self.__getitems__([key])[0]


def cloud_statistics(
    clouds: zarr.Array | np.ndarray, rows: np.ndarray, max_frames: int, seed: int
) -> dict[str, np.ndarray]:
    """``pointcloud_center`` (3,) and isotropic ``pointcloud_scale`` (3,) of the clouds at store ``rows``.

    Reads a seeded sample of at most ``max_frames`` frames (the whole array never is), and reduces it with
    the policy's own definition (``modules.nets.pointnet.pointcloud_stats``).
    """
    if len(rows) > max_frames:
        rows = np.random.default_rng(seed).choice(rows, max_frames, replace=False)
    rows = np.unique(rows)
    sample = clouds[rows] if isinstance(clouds, np.ndarray) else clouds.oindex[rows]  # (F, N, 3)
    return {key: value.astype(np.float32) for key, value in pointcloud_stats(np.asarray(sample)).items()}


def episode_rows(episode_ends: np.ndarray, episodes: np.ndarray) -> np.ndarray:
    """(R,) int64 store rows of the given episodes, in order."""
    begins = np.concatenate([[0], episode_ends[:-1]])
    parts = [np.arange(begins[e], episode_ends[e], dtype=np.int64) for e in episodes]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class PointCloudDataModule(WindowDataModule):
    """Demonstration windows with point clouds from an episode store (module docstring)."""

    def setup(self, stage: str | None = None) -> None:
        """Check the store against the config, split episodes, compute statistics, build the datasets."""
        if self.train_set is not None:  # idempotent: the app calls it before Trainer.fit does
            return
        cfg = self.cfg
        store = EpisodeStore.open(cfg.path)
        goal_key = check_pointcloud_store(store, cfg)
        obs = store.load(OBS).astype(np.float32)
        act = store.load(ACTION).astype(np.float32)
        goal = store.load(goal_key).astype(np.float32)
        ends = store.episode_ends
        train_w, val_w, train_eps = split_windows(store, cfg, self.chunk_len, self.seed)
        rows = episode_rows(ends, train_eps)
        clouds = store.load(POINTCLOUD).astype(np.float32) if cfg.load_to_memory else None
        cloud_source = clouds if clouds is not None else store.array(POINTCLOUD)
        self.stats = {
            f"{OBS}_mean": obs[rows].mean(0),
            f"{OBS}_std": obs[rows].std(0),
            f"{GOAL}_mean": goal[rows].mean(0),
            f"{GOAL}_std": goal[rows].std(0),
            f"{ACTION}_min": act[rows].min(0),
            f"{ACTION}_max": act[rows].max(0),
            **cloud_statistics(cloud_source, rows, cfg.stats_frames, self.seed),
        }
        augment = None
        if cfg.jitter_std > 0 or cfg.rotate_deg > 0:
            augment = CloudAugment(cfg.jitter_std, cfg.rotate_deg, self._rotation_center(store))
        args = (str(cfg.path), obs, act, goal)
        kwargs = dict(
            chunk_len=self.chunk_len,
            goal_sampling=cfg.goal_sampling,
            goal_geometric_p=cfg.goal_geometric_p,
            goal_end_p=cfg.goal_end_p,
            clouds=clouds,
        )
        self.train_set = PointCloudWindowDataset(*args, train_w, augment=augment, **kwargs)
        self.val_set = PointCloudWindowDataset(*args, val_w, augment=None, **kwargs)
        self.store = store

    def _rotation_center(self, store: EpisodeStore) -> tuple[float, float]:
        """(x, y) of the workspace centre: the crop box's centre, else the training clouds' mean point."""
        attrs = store.attrs
        if "crop_low" in attrs and "crop_high" in attrs:
            low, high = np.asarray(attrs["crop_low"], float), np.asarray(attrs["crop_high"], float)
            return float((low[0] + high[0]) / 2), float((low[1] + high[1]) / 2)
        center = self.stats[f"{POINTCLOUD}_center"]
        return float(center[0]), float(center[1])

    @property
    def goal_dim(self) -> int:
        return int(self.train_set.goals.shape[1])

    @property
    def num_points(self) -> int:
        return int(self.cfg.num_points)
