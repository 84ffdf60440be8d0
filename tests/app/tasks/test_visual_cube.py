"""The visual cube task: the RGB camera (OGBench's visual-cube frames), the batched backend that renders them,
camera demonstrations and the task's place in the registry."""

from __future__ import annotations

import gymnasium
import mujoco
import numpy as np
import pytest

from app.tasks.cube.backend import BatchedCube
from app.tasks.cube.config import CubeConfig
from app.tasks.cube.demos import generate_cube_demos
from app.tasks.cube.env import CubePointCloudEnv
from app.tasks.cube.visual_config import VisualCubeDemoConfig
from app.tasks.registry import TASKS, TaskConfig, task_of_context, task_of_env, task_of_fit
from datamodules.episodes import EpisodeStore
from modules.nets.keys import GOAL, IMAGE, OBS, POINTCLOUD

# the floor and the cube only (no robot meshes): ~10x faster frames, for the tests that need no arm
FAST = CubeConfig(cameras=["front_pixels"], output=IMAGE, width=32, height=32, robot_geometry="none")


@pytest.fixture(scope="module")
def fast_env():
    env = CubePointCloudEnv(FAST)
    yield env
    env.close()


def test_the_frames_are_ogbench_visual_cube_frames_without_shadows():
    """Our camera draws exactly what OGBench's visual-cube-single-v0 renders of the same state (its camera,
    its pixel-task colours, the target hidden), with shadows off."""
    ours = CubePointCloudEnv(CubeConfig(cameras=["front_pixels"], output=IMAGE, width=64, height=64))
    reference = gymnasium.make("visual-cube-single-v0", mode="data_collection", disable_env_checker=True)
    try:
        obs, _ = ours.reset(seed=3)
        frames = obs[IMAGE]
        assert frames.shape == (1, 64, 64, 3) and frames.dtype == np.uint8
        reference.reset(seed=0)
        sim, data = reference.unwrapped, reference.unwrapped._data
        src = ours.sim._data
        data.qpos[:], data.qvel[:] = src.qpos, src.qvel
        data.mocap_pos[:], data.mocap_quat[:] = src.mocap_pos, src.mocap_quat
        mujoco.mj_forward(sim._model, data)

        def no_shadows(scene):
            scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False

        np.testing.assert_array_equal(frames[0], sim.render(scene_callback=no_shadows))
    finally:
        ours.close()
        reference.close()


def test_frames_show_the_cube_moving_but_never_the_target(fast_env):
    obs, _ = fast_env.reset(seed=1)
    first = obs[IMAGE]
    assert first.shape == (1, 32, 32, 3) and first.dtype == np.uint8 and first.any()
    assert set(obs) == {"state", "goal", IMAGE}
    model, data = fast_env.sim._model, fast_env.sim._data
    data.mocap_pos[fast_env.sim._cube_target_mocap_ids[0]] += (0.05, 0.1, 0.0)  # the target: invisible
    mujoco.mj_forward(model, data)
    np.testing.assert_array_equal(fast_env.frames(), first)
    data.joint("object_joint_0").qpos[1] += 0.15  # the cube, 15 cm sideways
    mujoco.mj_forward(model, data)
    moved = fast_env.frames()
    assert (moved != first).any(axis=-1).sum() >= 4
    with pytest.raises(RuntimeError, match="pointcloud\\(\\) needs config.output='pointcloud'"):
        fast_env.pointcloud()


def test_the_backend_renders_stale_rows_only_and_hands_out_frames_not_clouds(monkeypatch):
    env = BatchedCube(FAST, 2, seed=0)
    try:
        assert env.pointcloud is None and env.image.shape == (2, 1, 32, 32, 3)
        env.reset()
        first = env.observe()
        assert set(first) == {OBS, GOAL, IMAGE} and POINTCLOUD not in first
        assert first[IMAGE].shape == (2, 1, 32, 32, 3) and first[IMAGE].dtype == np.uint8
        assert first[OBS].shape == (2, 19) and first[GOAL].shape == (2, 3)
        assert not np.array_equal(first[IMAGE][0], first[IMAGE][1])  # two scenes, two cube positions
        calls = []
        original = CubePointCloudEnv.frames
        monkeypatch.setattr(CubePointCloudEnv, "frames", lambda self: calls.append(1) or original(self))
        env.observe()
        assert calls == []  # nothing moved: nothing rendered
        env.step(np.zeros((2, 5), np.float32), np.array([True, False]))
        second = env.observe(np.array([True, True]))
        assert len(calls) == 1  # only the row that stepped
        np.testing.assert_array_equal(second[IMAGE][1], first[IMAGE][1])
    finally:
        env.close()


def test_camera_demos_are_the_point_cloud_demos_with_frames(tmp_path):
    kwargs = dict(episodes=2, episode_length=12, seed=5, progress=False)
    cloud = CubeConfig(num_points=16, width=32, height=32, robot_geometry="none")
    clouds = generate_cube_demos("cube-single", out=tmp_path / "pc.zarr", cube=cloud, **kwargs)
    frames = generate_cube_demos("visual-cube-single-v0", out=tmp_path / "img.zarr", cube=FAST, **kwargs)
    attrs = frames.attrs
    assert attrs["env"] == "visual-cube-single" and attrs["env_id"] == "visual-cube-single-v0"
    assert attrs["goal_key"] == "achieved_goal" and attrs["cameras"] == ["front_pixels"]
    assert attrs["image_size"] == [32, 32] and "num_points" not in attrs and clouds.attrs["num_points"] == 16
    image = frames.array(IMAGE)
    assert image.dtype == np.uint8 and image.shape == (24, 1, 32, 32, 3) and POINTCLOUD not in frames.keys
    # rendering draws no randomness: the same episodes, step for step
    for key in (OBS, "action", "expert_goal", "achieved_goal", "success"):
        np.testing.assert_array_equal(frames.load(key), clouds.load(key))
    assert EpisodeStore.open(tmp_path / "img.zarr").verify()
    with pytest.raises(ValueError, match="visual-cube-single demonstrations record 'image'"):
        generate_cube_demos("visual-cube-single", out=tmp_path / "bad.zarr", cube=cloud, **kwargs)


def test_the_visual_cube_owns_its_names_and_not_the_maze_frames():
    task = TASKS["visual-cube"]
    assert task_of_env("visual-cube-single") is task and task_of_env("visual-cube-single-v0") is task
    assert task_of_env("cube-single") is TASKS["cube"]
    assert task_of_fit("image_embedding", "visual-cube-single") is task
    assert task_of_fit("image_embedding", "visual-pointmaze-medium") is TASKS["visual-maze"]
    assert task_of_context("image_embedding") is TASKS["visual-maze"]  # the first to feed the mode
    assert task.dims("visual-cube-single") == (19, 5, 3)  # the target is given, clean, beside the frames
    assert TaskConfig(env="visual-cube-single", variation="heldout").task is task
    with pytest.raises(ValueError, match="variation"):
        TaskConfig(env="visual-cube-single", variation="corner")
    with pytest.raises(ValueError, match="carries no sensor settings"):
        task.make_backend(TaskConfig(env="visual-cube-single"), 1, 0, {})
    demos = task.demo_config("visual-cube-single", 3, None, 0, None, {"width": 48, "height": 48})
    assert isinstance(demos, VisualCubeDemoConfig) and demos.env == "visual-cube-single"
    assert demos.cube.output == IMAGE and demos.cube.frame_shape == (1, 48, 48, 3)
    assert demos.cube.cameras == ["front_pixels"] and demos.episode_length == 200
    with pytest.raises(ValueError, match="--num-points do"):
        task.demo_config("visual-cube-single", 3, None, 0, None, {"num_points": 5})
    with pytest.raises(ValueError, match="record 'image'"):
        VisualCubeDemoConfig(cube=CubeConfig())


def test_tmrl_demos_writes_a_visual_cube_store(tmp_path, capsys):
    from app.cli import main

    out = tmp_path / "v.zarr"
    args = ["demos", "--env", "visual-cube-single", "--episodes", "1", "--length", "6", "--out", str(out),
            "--robot-geometry", "none"]  # fmt: skip
    assert main([*args, "--image-size", "24"]) == 0
    store = EpisodeStore.open(out)
    assert store.array(IMAGE).shape == (6, 1, 24, 24, 3) and store.attrs["image_size"] == [24, 24]
    assert main([*args, "--overwrite", "--num-points", "8"]) == 2
    assert "--num-points do(es) not apply" in capsys.readouterr().err
