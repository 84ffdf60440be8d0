"""Depth images -> world-frame point clouds of a fixed size: pure geometry in numpy (no MuJoCo import).

Conventions (MuJoCo's, which are OpenGL's):

- A camera frame has +x to the right of the image, +y up the image, and the camera LOOKS ALONG -z. A
  camera pose is the (4, 4) camera-to-world transform ``T``: ``T[:3, :3]``'s columns are the camera's x,
  y, z axes in world coordinates (exactly MuJoCo's ``data.cam_xmat[i].reshape(3, 3)``) and ``T[:3, 3]``
  is its position (``data.cam_xpos[i]``).
- Images are indexed ``depth[v, u]``: row ``v`` = 0 is the TOP of the image, column ``u`` = 0 the left
  (what ``mujoco.Renderer`` returns). Pixel (u, v) covers [u, u+1) x [v, v+1); its ray goes through its
  centre (u + 0.5, v + 0.5).
- Depth is the metric distance along the viewing axis (z-depth, not the length of the ray): what
  ``mujoco.Renderer`` returns in depth mode (it linearizes the z-buffer with the model's near/far planes).
  Pixels with no geometry read the far plane; pass ``max_depth`` to drop them.

So a point at depth ``d`` seen at pixel centre (u, v) has camera coordinates
``x = (u + 0.5 - cx) * d / fx``, ``y = -(v + 0.5 - cy) * d / fy``, ``z = -d``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DOWNSAMPLERS = ("voxel", "poisson")


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels: focal lengths (fx, fy), principal point (cx, cy), image size."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int


def intrinsics_from_fovy(fovy_deg: float, width: int, height: int) -> Intrinsics:
    """Intrinsics of a MuJoCo camera with vertical field of view ``fovy_deg`` rendering ``width x height``.

    MuJoCo's ``fovy`` spans the image height; pixels are square, so fx = fy = (height / 2) / tan(fovy / 2),
    and the principal point is the image centre.
    """
    if not 0.0 < fovy_deg < 180.0:
        raise ValueError(f"fovy_deg must be in (0, 180) degrees, got {fovy_deg}")
    if int(width) != width or width < 1 or int(height) != height or height < 1:
        raise ValueError(f"width and height must be positive integers, got width={width}, height={height}")
    f = 0.5 * height / math.tan(math.radians(fovy_deg) / 2.0)
    return Intrinsics(fx=f, fy=f, cx=width / 2.0, cy=height / 2.0, width=int(width), height=int(height))


def pose_from_pos_xmat(pos: np.ndarray, xmat: np.ndarray) -> np.ndarray:
    """(4, 4) camera-to-world transform from a position (3,) and a rotation (3, 3) or flat (9,) row-major.

    ``xmat`` is MuJoCo's ``data.cam_xmat[i]``: its columns are the camera axes in world coordinates.
    """
    pos = np.asarray(pos, dtype=np.float64)
    rot = np.asarray(xmat, dtype=np.float64)
    if pos.shape != (3,):
        raise ValueError(f"pos must have shape (3,), got {pos.shape}")
    if rot.shape == (9,):
        rot = rot.reshape(3, 3)
    if rot.shape != (3, 3):
        raise ValueError(f"xmat must have shape (3, 3) or (9,), got {rot.shape}")
    if not np.allclose(rot.T @ rot, np.eye(3), atol=1e-5) or np.linalg.det(rot) < 0:
        raise ValueError("xmat must be a rotation matrix (orthonormal, determinant +1)")
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = rot, pos
    return pose


def free_camera_pose(
    lookat: Sequence[float], distance: float, azimuth_deg: float, elevation_deg: float
) -> np.ndarray:
    """(4, 4) camera-to-world transform of a MuJoCo FREE camera (``mjvCamera`` of type mjCAMERA_FREE).

    MuJoCo's convention: forward = (cos(el) cos(az), cos(el) sin(az), sin(el)), up = (-sin(el) cos(az),
    -sin(el) sin(az), cos(el)), position = lookat - distance * forward (elevation < 0 looks down).
    """
    if distance <= 0:
        raise ValueError(f"distance must be > 0, got {distance}")
    lookat_arr = np.asarray(lookat, dtype=np.float64)
    if lookat_arr.shape != (3,):
        raise ValueError(f"lookat must have 3 coordinates, got shape {lookat_arr.shape}")
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    forward = np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    up = np.array([-math.sin(el) * math.cos(az), -math.sin(el) * math.sin(az), math.cos(el)])
    right = np.cross(forward, up)
    return pose_from_pos_xmat(lookat_arr - distance * forward, np.stack([right, up, -forward], axis=1))


def depth_to_camera_points(
    depth: np.ndarray, intrinsics: Intrinsics, max_depth: float = np.inf
) -> np.ndarray:
    """Back-project a depth image (H, W) to camera-frame points (M, 3), float64.

    Keeps the pixels with a finite depth in (0, max_depth); M is their number (row-major pixel order).
    """
    depth = np.asarray(depth)
    expected = (intrinsics.height, intrinsics.width)
    if depth.shape != expected:
        raise ValueError(
            f"depth must have shape (height, width) = {expected} from intrinsics, got {depth.shape}"
        )
    if not max_depth > 0:
        raise ValueError(f"max_depth must be > 0, got {max_depth}")
    v, u = np.nonzero(np.isfinite(depth) & (depth > 0) & (depth < max_depth))  # (M,) each
    d = depth[v, u].astype(np.float64)
    x = (u + 0.5 - intrinsics.cx) * d / intrinsics.fx
    y = -(v + 0.5 - intrinsics.cy) * d / intrinsics.fy  # image rows grow downwards, camera +y is up
    return np.stack([x, y, -d], axis=1)  # the camera looks along -z


def camera_to_world(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """Map camera-frame points (M, 3) to the world frame with a (4, 4) camera-to-world ``pose``."""
    points, pose = _check_points(points, "points"), np.asarray(pose, dtype=np.float64)
    if pose.shape != (4, 4):
        raise ValueError(f"pose must be a (4, 4) camera-to-world transform, got shape {pose.shape}")
    return points @ pose[:3, :3].T + pose[:3, 3]


def depth_to_world_points(
    depth: np.ndarray, intrinsics: Intrinsics, pose: np.ndarray, max_depth: float = np.inf
) -> np.ndarray:
    """Back-project a depth image (H, W) to world-frame points (M, 3), float64 (see module conventions)."""
    return camera_to_world(depth_to_camera_points(depth, intrinsics, max_depth), pose)


def crop_to_box(points: np.ndarray, low: Sequence[float], high: Sequence[float]) -> np.ndarray:
    """The points (K, 3) of ``points`` (M, 3) inside the closed axis-aligned box [low, high]."""
    points = _check_points(points, "points")
    lo, hi = _check_box(low, high)
    return points[np.all((points >= lo) & (points <= hi), axis=1)]


def resample_to_n(points: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``n`` rows of ``points`` (M, 3), M >= 1: a random subset when M > n, else all M points plus
    n - M repeats drawn with replacement (duplicates add no new geometry, so max-pooled features are
    unchanged by them). Returns (n, 3) in the input dtype.
    """
    points = _check_points(points, "points")
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    m = len(points)
    if m == 0:
        raise ValueError("points is empty: cannot resample 0 points to n (is the crop box empty?)")
    if m >= n:
        return points[np.sort(rng.choice(m, size=n, replace=False))]
    return np.concatenate([points, points[rng.integers(0, m, size=n - m)]])


def downsample(
    points: np.ndarray,
    n: int,
    low: Sequence[float],
    high: Sequence[float],
    method: str = "voxel",
    voxel_size: float = 0.01,
    seed: int = 0,
) -> np.ndarray:
    """Crop ``points`` (M, 3) to the box [low, high] and downsample to exactly ``n`` points (n, 3) float32.

    ``method``: "voxel" averages the points in each cell of a ``voxel_size`` grid anchored at ``low`` (8 ms
    for 10k points; averages of points in a box stay in the box), "poisson" keeps a Poisson-disk subset of
    about ``n`` evenly spaced points (slower, ~50 ms). Either is then resampled to exactly ``n`` with a
    generator seeded by ``seed`` (:func:`resample_to_n`), so the same input and seed give the same cloud.

    Raises:
        ValueError: a bad argument (named in the message), or no point inside the box.
    """
    import point_cloud_utils as pcu  # local import: a compiled extension only this function needs

    if method not in DOWNSAMPLERS:
        raise ValueError(f"method must be one of {DOWNSAMPLERS}, got {method!r}")
    if not voxel_size > 0:
        raise ValueError(f"voxel_size must be > 0, got {voxel_size}")
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    lo, hi = _check_box(low, high)
    inside = crop_to_box(points, lo, hi)
    if len(inside) == 0:
        raise ValueError(f"no point of the {len(points)} given lies inside the crop box low={lo}, high={hi}")
    if method == "voxel":
        kept = pcu.downsample_point_cloud_on_voxel_grid(voxel_size, inside, min_bound=lo, max_bound=hi)
    elif len(inside) > n:
        # pcu treats random_seed=0 as "seed from the clock": shift by one to stay deterministic.
        idx = pcu.downsample_point_cloud_poisson_disk(
            inside, -1.0, target_num_samples=n, random_seed=seed + 1
        )
        kept = inside[idx]
    else:
        kept = inside
    kept = np.asarray(kept, dtype=np.float64).reshape(-1, 3)
    return resample_to_n(kept, n, np.random.default_rng(seed)).astype(np.float32)


def depths_to_pointcloud(
    depths: Sequence[np.ndarray],
    intrinsics: Sequence[Intrinsics],
    poses: Sequence[np.ndarray],
    n: int,
    low: Sequence[float],
    high: Sequence[float],
    method: str = "voxel",
    voxel_size: float = 0.01,
    max_depth: float = np.inf,
    seed: int = 0,
) -> np.ndarray:
    """Fuse depth images from several cameras into one world-frame cloud of exactly ``n`` points (n, 3).

    Each depth (H_i, W_i) is back-projected with its intrinsics and (4, 4) camera-to-world pose, the
    union is cropped to [low, high] and downsampled (:func:`downsample`). Returns float32.
    """
    if not len(depths) == len(intrinsics) == len(poses) or not depths:
        raise ValueError(
            f"depths, intrinsics and poses must be non-empty and of equal length, got "
            f"{len(depths)}, {len(intrinsics)}, {len(poses)}"
        )
    parts = [
        depth_to_world_points(d, k, p, max_depth) for d, k, p in zip(depths, intrinsics, poses, strict=True)
    ]
    return downsample(np.concatenate(parts), n, low, high, method, voxel_size, seed)


def _check_points(points: np.ndarray, name: str) -> np.ndarray:
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"{name} must have shape (M, 3), got {points.shape}")
    return points


def _check_box(low: Sequence[float], high: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    if lo.shape != (3,) or hi.shape != (3,):
        raise ValueError(f"low and high must have 3 coordinates each, got shapes {lo.shape} and {hi.shape}")
    if not np.all(lo < hi):
        raise ValueError(f"low must be < high on every axis, got low={lo.tolist()}, high={hi.tolist()}")
    return lo, hi
