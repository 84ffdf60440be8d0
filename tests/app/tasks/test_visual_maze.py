"""The visual maze task: its cameras, the batched backend that renders them, camera demonstrations and the
task's place in the registry."""

from __future__ import annotations

import numpy as np
import pytest

from app.tasks.maze.backend import BatchedMaze
from app.tasks.maze.camera import MazeCamera, MazeCameraConfig
from app.tasks.maze.demos import generate_maze_demos
from app.tasks.maze.env import make_maze_env
from app.tasks.registry import TASKS, TaskConfig, task_of_context, task_of_env
from datamodules.episodes import EpisodeStore
from modules.nets.keys import GOAL, IMAGE, OBS

CAM = MazeCameraConfig(cameras=["top", "follow"], width=32, height=32)


def marker_pixels(frame: np.ndarray) -> np.ndarray:
    """(K, 2) (row, col) of the goal marker's pink pixels in an (H, W, 3) frame."""
    r, g, b = (frame[..., c].astype(int) for c in range(3))
    return np.argwhere((r > 150) & (r - g > 60) & (b > 60))


def test_camera_settings_are_checked():
    with pytest.raises(ValueError, match=r"unknown cameras \['side'\]"):
        MazeCameraConfig(cameras=["top", "side"])
    with pytest.raises(ValueError, match="camera.width=4"):
        MazeCameraConfig(width=4)
    with pytest.raises(ValueError, match="non-empty list"):
        MazeCameraConfig(cameras="top")
    assert MazeCameraConfig(cameras=["top", "follow"], width=48, height=32).frame_shape == (2, 32, 48, 3)


def test_the_top_camera_draws_the_goal_marker_where_the_goal_is():
    maze = make_maze_env("pointmaze-medium").unwrapped
    maze.reset(seed=0, options=dict(task_id=1))
    camera = MazeCamera(maze, MazeCameraConfig(width=64, height=64))
    try:
        corner_a, corner_b = np.array(maze.ij_to_xy((1, 1))), np.array(maze.ij_to_xy((6, 6)))
        a, b = camera.render(maze.data, corner_a), camera.render(maze.data, corner_b)
    finally:
        camera.close()
    assert a.shape == (1, 64, 64, 3) and a.dtype == np.uint8
    pa, pb = marker_pixels(a[0]), marker_pixels(b[0])
    assert len(pa) >= 4 and len(pb) >= 4  # an enlarged marker: several pixels, not OGBench's one
    # x to the right, y up (as the path plots draw it): cell (1, 1) (low x, low y) is bottom-left, (6, 6)
    # top-right
    assert pa.mean(0)[0] > 32 and pa.mean(0)[1] < 32 and pb.mean(0)[0] < 32 and pb.mean(0)[1] > 32


def test_a_batched_maze_with_cameras_hides_the_goal_vector_and_renders_stale_rows_only(monkeypatch):
    target = TaskConfig(env="pointmaze-medium", task_id=1, max_episode_steps=20)
    env = BatchedMaze(target, 2, seed=0, camera=CAM)
    try:
        assert env.goal_dim == 0 and env.goal.shape == (2, 0) and env.goal_pos.shape == (2, 2)
        env.reset()
        first = env.observe()
        assert set(first) == {OBS, IMAGE} and first[IMAGE].shape == (2, 2, 32, 32, 3)
        assert first[IMAGE].dtype == np.uint8 and first[IMAGE].any()
        calls = []
        original = env._camera.render
        monkeypatch.setattr(env._camera, "render", lambda *a, **k: calls.append(1) or original(*a, **k))
        env.observe()
        assert calls == []  # nothing moved: nothing rendered
        env.step(np.ones((2, 2), np.float32), np.array([True, False]))
        second = env.observe()
        assert len(calls) == 1  # only the row that stepped
        assert not np.array_equal(second[IMAGE][0, 1], first[IMAGE][0, 1])  # the follow view moved with it
        np.testing.assert_array_equal(second[IMAGE][1], first[IMAGE][1])
    finally:
        env.close()
    plain = BatchedMaze(target, 1, seed=0)
    plain.reset()
    assert set(plain.observe()) == {OBS, GOAL} and plain.goal_dim == 2
    plain.close()


def test_camera_demos_are_the_state_demos_plus_frames(tmp_path):
    kwargs = dict(env="pointmaze-medium", episodes=2, episode_length=30, seed=3, progress=False)
    state = generate_maze_demos(out=tmp_path / "state.zarr", **kwargs)
    visual = generate_maze_demos(out=tmp_path / "visual.zarr", camera=CAM, **kwargs)
    assert visual.attrs["env"] == "visual-pointmaze-medium" and visual.attrs["cameras"] == ["top", "follow"]
    assert visual.attrs["image_size"] == [32, 32]
    frames = visual.array(IMAGE)
    assert frames.dtype == np.uint8 and frames.shape == (60, 2, 32, 32, 3) and frames.chunks[0] == 32
    for key in (OBS, "action", "expert_goal"):  # rendering draws no randomness: the same episodes
        np.testing.assert_array_equal(visual.load(key), state.load(key))
    reopened = EpisodeStore.open(tmp_path / "visual.zarr")
    assert reopened.verify()
    # the marker sits at the expert's goal of that step: frames of steps with different goals differ there
    goals = visual.load("expert_goal")
    assert marker_pixels(frames[0][0]).size > 0 and len(np.unique(goals, axis=0)) >= 1


def test_the_visual_maze_owns_its_names_and_the_image_context():
    task = TASKS["visual-maze"]
    assert task_of_env("visual-pointmaze-medium") is task and task_of_env("pointmaze-medium") is TASKS["maze"]
    assert task_of_context("image_embedding") is task
    assert task.dims("visual-pointmaze-medium") == (2, 2, 0)  # the goal is in the frames only
    assert TaskConfig(env="visual-pointmaze-large", task_id=2).task is task
    with pytest.raises(ValueError, match="task_id=9"):
        TaskConfig(env="visual-pointmaze-medium", task_id=9)
    with pytest.raises(ValueError, match="carries no camera settings"):
        task.make_backend(TaskConfig(env="visual-pointmaze-medium"), 1, 0, {})
    with pytest.raises(ValueError, match=r"unknown camera settings \['fov'\]"):
        task.make_backend(TaskConfig(env="visual-pointmaze-medium"), 1, 0, {"fov": 1})
    demos = task.demo_config("visual-pointmaze-medium", 3, None, 0, None, {"width": 48, "height": 48})
    assert demos.env == "visual-pointmaze-medium" and demos.camera.frame_shape == (1, 48, 48, 3)
    with pytest.raises(ValueError, match="--num-points do"):
        task.demo_config("visual-pointmaze-medium", 3, None, 0, None, {"num_points": 5})


def test_tmrl_demos_writes_a_camera_store(tmp_path, capsys):
    from app.cli import main

    out = tmp_path / "v.zarr"
    args = [
        "demos",
        "--env",
        "visual-pointmaze-medium",
        "--episodes",
        "1",
        "--length",
        "12",
        "--out",
        str(out),
    ]
    assert main([*args, "--cameras", "top,follow", "--image-size", "24"]) == 0
    store = EpisodeStore.open(out)
    assert store.array(IMAGE).shape == (12, 2, 24, 24, 3) and store.attrs["cameras"] == ["top", "follow"]
    assert main([*args, "--overwrite", "--num-points", "8"]) == 2
    assert "--num-points do(es) not apply" in capsys.readouterr().err
