"""Tests for app/envs/maze.py (env factory, scripted expert) and app/demos.py (demo generation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.tasks.maze.config import ExpertConfig
from app.tasks.maze.demos import generate_maze_demos
from app.tasks.maze.env import (
    GOAL_INDICES,
    MAZES,
    MazeExpert,
    goal_indices,
    make_maze_env,
    resolve_maze,
    rollout_expert,
    run_expert_task,
)
from datamodules.episodes import EpisodeStore


@pytest.fixture(scope="module")
def large_env():
    env = make_maze_env("pointmaze-large")
    yield env
    env.close()


def test_names_resolve_and_unknown_names_are_refused() -> None:
    assert resolve_maze("pointmaze-large") == ("pointmaze-large", "pointmaze-large-navigate-v0")
    assert resolve_maze("pointmaze-giant-navigate-v0") == ("pointmaze-giant", "pointmaze-giant-navigate-v0")
    assert set(MAZES) == {"pointmaze-medium", "pointmaze-large", "pointmaze-giant", "pointmaze-teleport"}
    with pytest.raises(ValueError, match="Did you mean 'pointmaze-large'") as err:
        make_maze_env("pointmaze-lrge")
    assert "pointmaze-medium" in str(err.value)  # the known names are listed
    with pytest.raises(ValueError, match="unknown maze environment 'cartpole'"):
        goal_indices("cartpole")
    assert goal_indices("pointmaze-medium") == [0, 1] == list(GOAL_INDICES)


def test_env_goal_lives_in_the_goal_space_of_the_observation(large_env) -> None:
    ob, info = large_env.reset(seed=0, options=dict(task_id=1, render_goal=False))
    assert ob.shape == (2,) and info["goal"][list(GOAL_INDICES)].shape == (2,)
    # Task 1 of the large maze goes from cell (1, 1) to cell (7, 10): xy = (j * 4 - 4, i * 4 - 4) +- 1.
    np.testing.assert_allclose(info["goal"], [36.0, 24.0], atol=1.01)


@pytest.mark.parametrize(
    "kwargs",
    [dict(noise_std=-0.1), dict(gain=0.0), dict(gain=1.5), dict(goal_tol=0.0), dict(goal_jitter=2.0)],
)
def test_expert_config_validates(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="ExpertConfig." + next(iter(kwargs))):
        ExpertConfig(**kwargs)


def test_expert_needs_reset_first() -> None:
    with pytest.raises(RuntimeError, match="before reset"):
        MazeExpert().act(np.zeros(2))


def test_noiseless_expert_solves_evaluation_task(large_env) -> None:
    expert = MazeExpert(ExpertConfig(noise_std=0.0))
    steps = run_expert_task(large_env, expert, task_id=1, rng=np.random.default_rng(0), max_steps=1000)
    # The shortest path of task 1 is about 20 cells of 4 units at 0.2 units per step: ~260 steps measured.
    assert steps is not None and steps < 400


@pytest.mark.parametrize("name", ["pointmaze-medium", "pointmaze-giant", "pointmaze-teleport"])
def test_noisy_expert_solves_evaluation_tasks_of_other_mazes(name: str) -> None:
    env = make_maze_env(name)
    expert = MazeExpert(ExpertConfig(noise_std=0.3))
    # The teleport maze's task 1 needs the expert to avoid its inbound teleports (a random jump otherwise).
    for task_id in (1, 5):
        assert (
            run_expert_task(env, expert, task_id, np.random.default_rng(task_id), max_steps=1000) is not None
        )
    env.close()


def test_noiseless_actions_are_unit_moves_along_the_maze_path(large_env) -> None:
    expert = MazeExpert(ExpertConfig(noise_std=0.0))
    expert.reset(large_env, np.random.default_rng(0))
    maze = large_env.unwrapped
    expert.set_goal(np.asarray(maze.ij_to_xy((7, 10))))  # bottom-right corner of the large maze
    # From cell (1, 1) the only open neighbour on the shortest path is (2, 1) (y grows with i): go +y.
    action = expert.act(np.asarray(maze.ij_to_xy((1, 1))))
    np.testing.assert_allclose(action, [0.0, 1.0], atol=1e-9)
    # Inside the goal cell the expert heads straight for the goal point.
    goal = np.asarray(maze.ij_to_xy((7, 10)))
    action = expert.act(goal + np.array([1.5, 0.0]))
    np.testing.assert_allclose(action, [-1.0, 0.0], atol=1e-9)


def test_rollout_shapes_bounds_goals_and_global_rng_untouched(large_env) -> None:
    expert = MazeExpert(ExpertConfig(noise_std=0.5))
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    episode = rollout_expert(large_env, expert, 600, np.random.default_rng(1))
    np.testing.assert_array_equal(np.random.get_state()[1], before)  # OGBench's global-RNG use is sandboxed

    assert sorted(episode) == ["action", "expert_goal", "observation"]
    assert episode["observation"].shape == (600, 2) and episode["observation"].dtype == np.float32
    assert episode["action"].shape == (600, 2) and episode["action"].dtype == np.float32
    assert np.all(np.abs(episode["action"]) <= 1.0)
    # Each step moves the point by 0.2 * action unless a wall stops it: never further.
    moves = np.linalg.norm(np.diff(episode["observation"], axis=0), axis=1)
    assert np.all(moves <= 0.2 * np.sqrt(2) + 1e-4)
    assert expert.goals_reached >= 1  # a noisy expert still reaches random goals in 600 steps
    # It keeps moving through the maze: the path covers several cells.
    cells = {large_env.unwrapped.xy_to_ij(xy) for xy in episode["observation"]}
    assert len(cells) >= 8


def test_rollout_is_reproducible(large_env) -> None:
    a = rollout_expert(large_env, MazeExpert(), 200, np.random.default_rng(7))
    b = rollout_expert(large_env, MazeExpert(), 200, np.random.default_rng(7))
    c = rollout_expert(large_env, MazeExpert(), 200, np.random.default_rng(8))
    np.testing.assert_array_equal(a["observation"], b["observation"])
    np.testing.assert_array_equal(a["action"], b["action"])
    assert not np.array_equal(a["observation"], c["observation"])


def test_generate_demos_reproducible_with_attrs(tmp_path: Path) -> None:
    kwargs = dict(env="pointmaze-medium", episodes=3, episode_length=40, progress=False)
    a = generate_maze_demos(out=tmp_path / "a.zarr", seed=5, **kwargs)
    b = generate_maze_demos(out=tmp_path / "b.zarr", seed=5, **kwargs)
    c = generate_maze_demos(out=tmp_path / "c.zarr", seed=6, **kwargs)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    store = EpisodeStore.open(tmp_path / "a.zarr")
    np.testing.assert_array_equal(store.episode_ends, [40, 80, 120])
    assert store.verify()
    attrs = store.attrs
    assert attrs["env"] == "pointmaze-medium" and attrs["env_id"] == "pointmaze-medium-navigate-v0"
    assert attrs["goal_indices"] == [0, 1] and attrs["obs_dim"] == 2 and attrs["action_dim"] == 2
    assert attrs["episode_length"] == 40 and attrs["seed"] == 5 and attrs["generator"] == "maze_expert"
    assert attrs["expert"] == {"noise_std": 0.3, "gain": 1.0, "goal_tol": 1.0, "goal_jitter": 1.0}
    # Episodes start at different random cells.
    starts = store.load("observation")[store.episode_starts]
    assert len({tuple(np.round(s)) for s in starts}) == 3

    with pytest.raises(FileExistsError, match="a.zarr"):
        generate_maze_demos(out=tmp_path / "a.zarr", seed=5, **kwargs)
    with pytest.raises(ValueError, match="episodes must be > 0"):
        generate_maze_demos(out=tmp_path / "d.zarr", **{**kwargs, "episodes": 0})
