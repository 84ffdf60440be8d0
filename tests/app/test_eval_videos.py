"""The choice of episodes to film and the frames a replay becomes (app/eval_videos.py), on hand-made
episodes: which are picked, how long episodes are thinned, where the sigma strip goes."""

from __future__ import annotations

import numpy as np
import pytest

from app.agent_eval import EpisodeTrace
from app.eval_videos import film, frame_steps, trace_replays, write_videos
from app.tasks.base import Replay, pick_replays
from app.tasks.cube.backend import BatchedCube
from app.tasks.cube.config import CubeConfig
from app.tasks.maze.task import MazeTask
from app.tasks.registry import task_of_env


def _trace(episode: int, mode: str, success: bool, steps: int = 9, sigma: bool = True) -> EpisodeTrace:
    obs = np.zeros((steps + 1, 4), np.float32)
    obs[:, 0] = np.linspace(4, 8, steps + 1)
    obs[:, 1] = 4
    starts = np.arange(0, steps, 4)
    chosen = np.linspace(0.1, 0.9, len(starts)).astype(np.float32) if sigma else None
    return EpisodeTrace(episode, mode, obs, np.array([8.0, 4.0]), success, starts, chosen)


def test_trace_replays_pick_the_first_episodes_of_each_outcome_per_mode():
    traces = {
        "deterministic": [_trace(0, "deterministic", False), _trace(1, "deterministic", True),
                          _trace(2, "deterministic", True), _trace(3, "deterministic", False)],
        "stochastic": [_trace(0, "stochastic", True), _trace(1, "stochastic", True)],
    }  # fmt: skip
    labels = [r.label for r in trace_replays(traces, per_outcome=1)]
    assert labels == ["deterministic_episode_1_success", "deterministic_episode_0_failure",
                      "stochastic_episode_0_success"]  # fmt: skip
    both = trace_replays(traces, per_outcome=2)
    assert [r.label.split("_")[2] for r in both if r.group == "deterministic"] == ["1", "2", "0", "3"]
    r = both[0]
    assert r.path.shape == (10, 2) and r.sigma.shape == (9,)  # the xy path, sigma per action
    np.testing.assert_allclose(r.sigma[:4], r.sigma[0])
    assert r.sigma[4] != r.sigma[0]  # one value per chunk of 4 actions
    assert trace_replays({"deterministic": [_trace(0, "deterministic", True, sigma=False)]})[0].sigma is None


def test_pick_replays_keeps_per_outcome_of_each_group_in_order():
    order = [("a", True), ("a", True), ("b", False), ("a", False), ("a", True)]
    rs = [Replay(f"r{i}", ok, np.zeros((2, 2)), np.zeros(2), group=g) for i, (g, ok) in enumerate(order)]
    assert [r.label for r in pick_replays(rs, 1)] == ["r0", "r2", "r3"]
    assert [r.label for r in pick_replays(rs, 2)] == ["r0", "r1", "r2", "r3"]
    assert pick_replays(rs, 0) == []


def test_frame_steps_thin_long_episodes_to_at_most_max_frames():
    assert frame_steps(10, 250) == (1, pytest.approx(np.arange(10)))
    every, steps = frame_steps(1001, 250)
    assert every == 5 and len(steps) == 201 and steps[-1] == 1000
    every, steps = frame_steps(1000, 250)
    assert every == 4 and len(steps) == 250
    with pytest.raises(ValueError, match="length=0"):
        frame_steps(0, 10)


def test_a_replay_with_sigma_gets_the_strip_and_one_without_does_not():
    task = MazeTask()
    with_sigma = trace_replays({"stochastic": [_trace(0, "stochastic", True)]})[0]
    frames = film(task, "pointmaze-medium", with_sigma, sigma_max=1.0, size=64)
    assert frames.shape == (10, 64 + 32, 64, 3)  # one frame per recorded step, the 32-pixel strip under
    plain = film(
        task, "pointmaze-medium", Replay("x", False, with_sigma.path, with_sigma.goal), None, size=64
    )
    assert plain.shape == (10, 64, 64, 3)


def test_write_videos_says_why_when_there_is_nothing_to_film(tmp_path):
    files, note = write_videos(MazeTask(), "pointmaze-medium", [], tmp_path)
    assert files == [] and "no episodes" in note

    class Blind(MazeTask):
        def render_replay(self, env, replay, size=128, every=1):
            raise NotImplementedError("the blind task has no replay renderer")

    r = Replay("a", True, np.zeros((3, 2)), np.zeros(2))
    files, note = write_videos(Blind(), "pointmaze-medium", [r], tmp_path)
    assert files == [] and "blind task has no replay renderer" in note and not list(tmp_path.iterdir())


def test_the_cube_backend_records_the_scene_a_replay_renders():
    from app.agent_eval import _Recorder

    rec = _Recorder(BatchedCube(CubeConfig(output="image", cameras=["front_pixels"], width=32, height=32), 1))
    try:
        rec.reset(seeds=[5])
        for _ in range(3):
            rec.step(np.full((1, 5), 0.5, np.float32), np.ones(1, bool))
        scene = np.stack(rec.scenes[0])
        assert scene.shape == (4, 21) and not np.allclose(scene[0, :6], scene[-1, :6])  # the arm moved
        task = task_of_env("cube-single")
        frames = task.render_replay("cube-single", Replay("c", False, scene, rec.goals[0]), size=32)
        assert frames.shape == (4, 32, 32, 3) and np.abs(frames[0].astype(int) - frames[-1]).sum() > 0
    finally:
        rec.close()
