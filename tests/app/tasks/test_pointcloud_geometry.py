"""Depth back-projection, cropping and fixed-size downsampling (app/envs/pointcloud.py), and the cube
point-cloud environment built on them (app/envs/cube.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.tasks.cube.pointcloud import (
    camera_to_world,
    crop_to_box,
    depth_to_camera_points,
    depth_to_world_points,
    depths_to_pointcloud,
    downsample,
    free_camera_pose,
    intrinsics_from_fovy,
    pose_from_pos_xmat,
    resample_to_n,
)

LOW, HIGH = (-0.5, -0.25, 0.0), (0.5, 0.75, 1.0)  # exactly representable in float32


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues: the rotation by ``angle`` about ``axis`` (3, 3)."""
    k = axis / np.linalg.norm(axis)
    skew = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * skew + (1 - math.cos(angle)) * skew @ skew


def test_intrinsics_from_fovy():
    k = intrinsics_from_fovy(90.0, width=64, height=48)
    assert (k.fx, k.fy, k.cx, k.cy, k.width, k.height) == pytest.approx((24.0, 24.0, 32.0, 24.0, 64, 48))


def test_downward_camera_conventions_by_hand():
    """Camera 2 m above the floor, identity rotation: it looks down (-z), image right = +x, image up = +y."""
    k = intrinsics_from_fovy(90.0, 4, 4)  # f = 2 px, principal point (2, 2)
    pose = pose_from_pos_xmat(np.array([0.0, 0.0, 2.0]), np.eye(3))
    points = depth_to_world_points(np.full((4, 4), 2.0), k, pose)  # (16, 3), row-major pixel order
    assert points.shape == (16, 3)
    np.testing.assert_allclose(points[:, 2], 0.0, atol=1e-12)  # every ray hits the floor
    # pixel (u=3, v=0) is the top-right one: centre (3.5, 0.5) -> x = 1.5 * 2 / 2, y = +1.5 * 2 / 2
    np.testing.assert_allclose(points[3], [1.5, 1.5, 0.0], atol=1e-12)
    np.testing.assert_allclose(points[12], [-1.5, -1.5, 0.0], atol=1e-12)  # bottom-left (u=0, v=3)


def test_known_points_projected_by_hand_are_recovered():
    """World points, projected by hand into a camera with a non-trivial pose, come back exactly."""
    rot = _rotation(np.array([0.3, -1.0, 0.4]), 2.1)
    pos = np.array([0.7, -0.4, 1.3])
    k = intrinsics_from_fovy(60.0, 41, 31)
    # Known points, chosen in the camera frame on pixel centres (u, v) at depth d, then moved to the world.
    pixels = [(0, 0, 0.8), (40, 0, 1.1), (20, 15, 2.0), (7, 30, 0.5), (33, 12, 3.3)]
    world = []
    for u, v, d in pixels:
        cam = np.array([(u + 0.5 - k.cx) * d / k.fx, -(v + 0.5 - k.cy) * d / k.fy, -d])
        world.append(rot @ cam + pos)
    world = np.array(world)
    # Project them back by hand (world -> camera -> pixel) to build the depth image: a check of the above.
    depth = np.zeros((31, 41))
    for p in world:
        x, y, z = rot.T @ (p - pos)
        u, v = k.cx + k.fx * x / -z - 0.5, k.cy - k.fy * y / -z - 0.5
        depth[round(v), round(u)] = -z
    recovered = depth_to_world_points(depth, k, pose_from_pos_xmat(pos, rot.reshape(9)))
    order = np.lexsort((np.array(pixels)[:, 0], np.array(pixels)[:, 1]))  # row-major pixel order
    np.testing.assert_allclose(recovered, world[order], atol=1e-9)


def test_tilted_camera_sees_a_plane_and_its_lookat_point():
    """A ray-cast depth image of the floor z = 0 back-projects onto the floor; the centre pixel is lookat."""
    lookat = np.array([0.4, -0.1, 0.0])
    pose = free_camera_pose(lookat, distance=1.5, azimuth_deg=120.0, elevation_deg=-40.0)
    k = intrinsics_from_fovy(45.0, 33, 25)  # odd sizes: the principal point is a pixel centre
    v, u = np.mgrid[0:25, 0:33]
    rays = np.stack([(u + 0.5 - k.cx) / k.fx, -(v + 0.5 - k.cy) / k.fy, -np.ones_like(u, float)], -1)
    rays_world = rays @ pose[:3, :3].T  # (H, W, 3); camera-axis component of each is 1
    depth = -pose[2, 3] / rays_world[..., 2]  # distance along the axis to z = 0
    depth[depth <= 0] = np.inf  # rays above the horizon see nothing
    points = depth_to_world_points(depth, k, pose)
    assert len(points) > 0.5 * depth.size
    np.testing.assert_allclose(points[:, 2], 0.0, atol=1e-9)
    centre = depth_to_world_points(np.where((v == 12) & (u == 16), depth, np.inf), k, pose)
    np.testing.assert_allclose(centre[0], lookat, atol=1e-9)
    # image "up" is world-up-ish for a camera looking down: the top row sees farther from the camera
    top, bottom = depth[0, 16], depth[24, 16]
    assert top > bottom


def test_max_depth_drops_background_pixels():
    k = intrinsics_from_fovy(60.0, 3, 2)
    depth = np.array([[1.0, 7.0, np.nan], [0.0, 2.0, 6.99]])
    assert len(depth_to_camera_points(depth, k, max_depth=6.9)) == 2


def test_crop_keeps_exactly_the_points_inside():
    points = np.array([[0.0, 0.0, 0.5], [0.6, 0.0, 0.5], [0.5, 0.75, 1.0], [0.0, -0.3, 0.2]])
    np.testing.assert_array_equal(crop_to_box(points, LOW, HIGH), points[[0, 2]])


@pytest.mark.parametrize("method", ["voxel", "poisson"])
@pytest.mark.parametrize("count", [5_000, 37])
def test_downsample_returns_exactly_n_points_inside_the_box(method, count):
    rng = np.random.default_rng(1)
    inside = rng.uniform(LOW, HIGH, size=(count, 3))
    outside = rng.uniform(-3, 3, size=(500, 3)) + np.array([4.0, 0.0, 0.0])  # all beyond x = 1
    points = np.concatenate([inside, outside])
    cloud = downsample(points, 256, LOW, HIGH, method=method, voxel_size=0.05, seed=3)
    assert cloud.shape == (256, 3) and cloud.dtype == np.float32
    assert np.all(cloud >= np.array(LOW) - 1e-6) and np.all(cloud <= np.array(HIGH) + 1e-6)
    np.testing.assert_array_equal(cloud, downsample(points, 256, LOW, HIGH, method, 0.05, seed=3))
    if count < 256:  # every input point is kept, the rest are repeats of input points
        np.testing.assert_allclose(np.unique(cloud, axis=0), np.unique(inside.astype(np.float32), axis=0))
    else:  # a different seed draws a different subset
        assert not np.array_equal(cloud, downsample(points, 256, LOW, HIGH, method, 0.05, seed=4))


def test_resample_to_n_keeps_all_points_when_too_few():
    points = np.arange(15.0).reshape(5, 3)
    out = resample_to_n(points, 12, np.random.default_rng(0))
    assert out.shape == (12, 3)
    np.testing.assert_array_equal(out[:5], points)
    assert {tuple(p) for p in out} == {tuple(p) for p in points}


def test_depths_to_pointcloud_fuses_cameras():
    k = intrinsics_from_fovy(90.0, 4, 4)
    above = pose_from_pos_xmat(np.array([0.0, 0.0, 2.0]), np.eye(3))
    shifted = pose_from_pos_xmat(np.array([0.25, 0.5, 2.0]), np.eye(3))
    depth = np.full((4, 4), 2.0)
    cloud = depths_to_pointcloud([depth, depth], [k, k], [above, shifted], 32, (-2, -2, -0.1), (2, 2, 0.1))
    assert cloud.shape == (32, 3)
    assert len(np.unique(cloud, axis=0)) == 32  # 2 x 16 distinct floor points, none lost


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: downsample(np.zeros((4, 3)), 0, LOW, HIGH), "n must be a positive integer"),
        (lambda: downsample(np.zeros((4, 3)), 8, LOW, HIGH, method="fps"), "method must be one of"),
        (lambda: downsample(np.zeros((4, 3)), 8, LOW, HIGH, voxel_size=0.0), "voxel_size must be > 0"),
        (lambda: downsample(np.zeros((4, 3)), 8, HIGH, LOW), "low must be < high"),
        (lambda: downsample(np.zeros((4, 3)), 8, (0, 0), HIGH), "low and high must have 3 coordinates"),
        (lambda: downsample(np.zeros((4, 2)), 8, LOW, HIGH), r"points must have shape \(M, 3\)"),
        (lambda: downsample(np.full((4, 3), 9.0), 8, LOW, HIGH), "no point of the 4 given lies inside"),
        (lambda: intrinsics_from_fovy(180.0, 4, 4), r"fovy_deg must be in \(0, 180\)"),
        (lambda: intrinsics_from_fovy(45.0, 0, 4), "width and height must be positive integers"),
        (
            lambda: depth_to_camera_points(np.ones((3, 4)), intrinsics_from_fovy(45, 3, 4)),
            "depth must have shape",
        ),
        (lambda: pose_from_pos_xmat(np.zeros(3), 2 * np.eye(3)), "xmat must be a rotation matrix"),
        (lambda: pose_from_pos_xmat(np.zeros(2), np.eye(3)), r"pos must have shape \(3,\)"),
        (lambda: camera_to_world(np.zeros((2, 3)), np.eye(3)), r"pose must be a \(4, 4\)"),
        (lambda: free_camera_pose((0, 0, 0), 0.0, 0.0, 0.0), "distance must be > 0"),
    ],
)
def test_bad_arguments_name_themselves(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------------------------------------
# The cube point-cloud environment (MuJoCo, headless EGL): one env for the module (building it takes ~3 s).

CAMS = ("front", "left")  # one camera from OGBench's model, one free camera: both pose paths


@pytest.fixture(scope="module")
def cube_env():
    from app.tasks.cube.config import CubeConfig
    from app.tasks.cube.env import CubePointCloudEnv

    env = CubePointCloudEnv(CubeConfig(cameras=CAMS, num_points=256, width=64, height=64))
    yield env
    env.close()


def test_cube_config_rejects_bad_values():
    from app.tasks.cube.config import CubeConfig

    with pytest.raises(ValueError, match="cameras must be a non-empty list of"):
        CubeConfig(cameras=("top",))
    with pytest.raises(ValueError, match="variation must be one of"):
        CubeConfig(variation="test")
    with pytest.raises(ValueError, match="heldout_low/high must be"):
        CubeConfig(heldout_low=(0.5, 0.2), heldout_high=(0.7, 0.3))


def test_cube_camera_poses_match_mujoco(cube_env):
    """Our poses equal what MuJoCo renders from (the mean of its two eyes' GL cameras)."""
    for (cam, _, _), pose in zip(cube_env._views, cube_env.camera_poses(), strict=True):
        cube_env.renderer.update_scene(cube_env.sim._data, camera=cam)
        eyes = cube_env.renderer.scene.camera
        np.testing.assert_allclose(pose[:3, 3], (np.array(eyes[0].pos) + eyes[1].pos) / 2, atol=1e-5)
        np.testing.assert_allclose(-pose[:3, 2], eyes[0].forward, atol=1e-5)
        np.testing.assert_allclose(pose[:3, 1], eyes[0].up, atol=1e-5)


def test_cube_pointcloud_has_n_points_in_the_box_and_sees_the_cube(cube_env):
    cfg = cube_env.config
    for seed in (0, 1):
        obs, _ = cube_env.reset(seed=seed)
        cloud = obs["pointcloud"]
        assert cloud.shape == (256, 3) and cloud.dtype == np.float32
        assert obs["state"].shape == (19,) and obs["goal"].shape == (3,)
        assert np.all(cloud >= np.array(cfg.crop_low) - 1e-6) and np.all(
            cloud <= np.array(cfg.crop_high) + 1e-6
        )
        # At reset the gripper is >= 0.2 m up, so points near the cube are the cube's own surface.
        cube = cube_env.cube_position()
        local = (cloud - cube) @ cube_env.sim._data.body("object_0").xmat.reshape(3, 3)  # cube frame
        near = local[np.linalg.norm(local, axis=1) < 0.05]
        assert len(near) >= 8
        assert np.abs(near).max() <= 0.02 + 0.006  # on the 4 cm cube (6 mm: voxel averaging at edges)
        assert near[:, 2].max() > 0.015  # its top face is seen
        # The target marker is not rendered: nothing at the goal (arm >= 0.2 m up, cube elsewhere).
        assert np.linalg.norm(obs["goal"] - cube) >= cfg.min_goal_distance
        assert np.linalg.norm(cloud - obs["goal"], axis=1).min() > 0.03


def test_the_shipped_sensor_drawing_the_robot_by_collision_shapes_sees_the_cube():
    """configs/csp_pointcloud.yaml's sensor (cameras left and right, the robot's collision shapes): the
    arena's collision walls, in the same geom group, are not drawn; drawn, they hid the table and the cube
    from both depth cameras (no point within 5 cm of the cube at reset)."""
    from app.tasks.cube.config import CubeConfig
    from app.tasks.cube.env import HIDDEN_GROUP, CubePointCloudEnv

    env = CubePointCloudEnv(CubeConfig(num_points=256, robot_geometry="collision"))
    try:
        model = env.sim._model
        walls = [g for g in range(model.ngeom) if model.geom(g).name.startswith("wall")]
        assert walls and all(model.geom_group[g] == HIDDEN_GROUP for g in walls)
        assert not env._scene_option.geomgroup[HIDDEN_GROUP]
        for seed in (0, 1):
            env.reset(seed=seed)
            cloud, cube = env.pointcloud(), env.cube_position()
            assert (np.linalg.norm(cloud - cube, axis=1) < 0.05).sum() >= 8
    finally:
        env.close()


def test_cube_variations_keep_the_heldout_region_apart(cube_env):
    lo, hi = np.array(cube_env.config.heldout_low), np.array(cube_env.config.heldout_high)

    def inside(xy: np.ndarray) -> bool:
        return bool(np.all((xy[:2] >= lo) & (xy[:2] <= hi)))

    try:
        for seed in range(8):
            cube_env.config.variation = "train"
            obs, _ = cube_env.reset(seed=seed, pointcloud=False)
            assert not inside(obs["goal"]) and not inside(cube_env.cube_position())
            assert np.linalg.norm(obs["goal"][:2] - cube_env.cube_position()[:2]) >= 0.08
            assert not inside(cube_env.new_target()["privileged/target_block_pos"])
            cube_env.config.variation = "heldout"
            obs, _ = cube_env.reset(seed=seed, pointcloud=False)
            assert inside(obs["goal"]) and not inside(cube_env.cube_position())
            assert inside(cube_env.new_target()["privileged/target_block_pos"])
    finally:
        cube_env.config.variation = "train"


def test_rollout_oracle_episode_writes_as_an_episode_store(cube_env, tmp_path):
    from app.tasks.cube.env import rollout_oracle
    from datamodules.episodes import write_episodes

    episode = rollout_oracle(cube_env, 12, np.random.default_rng(0))
    shapes = {key: (value.shape, value.dtype) for key, value in episode.items()}
    assert shapes == {
        "observation": ((12, 19), np.float32),
        "pointcloud": ((12, 256, 3), np.float32),
        "action": ((12, 5), np.float32),
        "expert_goal": ((12, 3), np.float32),
        "achieved_goal": ((12, 3), np.float32),
        "success": ((12,), np.bool_),
    }
    assert np.all(np.abs(episode["action"]) <= 1.0)
    again = rollout_oracle(cube_env, 12, np.random.default_rng(0), pointcloud=False)
    np.testing.assert_array_equal(again["action"], episode["action"])  # reproducible from the rng
    store = write_episodes(tmp_path / "cube.zarr", [episode, episode], {"env": "cube-single"})
    np.testing.assert_array_equal(store.episode(1)["pointcloud"], episode["pointcloud"])
