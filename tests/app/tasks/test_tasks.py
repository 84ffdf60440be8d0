"""The task seam: one registry, the Backend contract both batches honour, and the one chunk rollout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.tasks.registry import (
    TASKS,
    TaskConfig,
    env_names,
    fit_schema,
    task_of_context,
    task_of_env,
    task_of_fit,
)
from app.tasks.rollout import rollout, run_chunk
from modules.nets.keys import GOAL, OBS

ROOT = Path(__file__).resolve().parents[3]


def test_every_env_name_has_exactly_one_task_and_a_fit_finds_it() -> None:
    names = env_names()
    assert len(names) == len(set(names)) and "pointmaze-large" in names and "cube-single" in names
    for task in TASKS.values():
        for env in task.env_names:
            assert task_of_env(env) is task
            for mode in task.context_modes:
                assert task_of_fit(mode, env) is task  # a mode several tasks feed: demos.env decides
        for mode in task.context_modes:
            assert mode in task_of_context(mode).context_modes
    # demos.env of a task that does not feed the mode: the mode's task (which then refuses the env)
    assert task_of_fit("pointcloud", "pointmaze-large") is TASKS["cube"]
    assert task_of_env("pointmaze-large-navigate-v0") is TASKS["maze"]  # OGBench ids too
    assert task_of_env("cube-single-v0") is TASKS["cube"]


def test_unknown_env_and_mode_are_refused_listing_the_registry() -> None:
    with pytest.raises(ValueError, match=r"unknown environment 'pointmaze-huge'.*large.*cube-single.*mean"):
        task_of_env("pointmaze-huge")
    with pytest.raises(ValueError, match=r"context_mode='pixels'.*'goal'.*'pointcloud'"):
        task_of_context("pixels")
    with pytest.raises(ValueError, match="unknown environment 'maze-x'"):
        TaskConfig(env="maze-x")


def test_fit_schema_follows_the_context_mode(tmp_path: Path) -> None:
    assert fit_schema(ROOT / "configs" / "csp_pointcloud.yaml") is TASKS["cube"].fit_schema()
    assert fit_schema(ROOT / "configs" / "csp_state.yaml") is TASKS["maze"].fit_schema()
    override = ["policy.context_mode=pointcloud"]
    assert fit_schema(ROOT / "configs" / "csp_state.yaml", override) is TASKS["cube"].fit_schema()
    assert fit_schema(None) is TASKS["maze"].fit_schema()


def test_targets_are_checked_by_their_task() -> None:
    with pytest.raises(ValueError, match="init_ij/goal_ij are maze cells"):
        TaskConfig(env="cube-single", init_ij=[1, 1])
    with pytest.raises(ValueError, match="variation='nowhere'"):
        TaskConfig(env="cube-single", variation="nowhere")
    with pytest.raises(ValueError, match="task_id=9"):
        TaskConfig(env="pointmaze-large", task_id=9)
    with pytest.raises(ValueError, match="max_episode_steps=0"):
        TaskConfig(max_episode_steps=0)


LIGHT = """
import json, sys
from pathlib import Path
from app.config import load_config
from app.finetune_config import FinetuneConfig
from app.tasks.registry import fit_schema
from tests.tiny import BASES, tiny_config
for path in [*sorted(Path("configs").glob("*.yaml")), *(Path(tiny_config(name)) for name in BASES)]:
    finetune = path.name.startswith("tmrl")
    schema = FinetuneConfig if finetune else fit_schema(path)
    load_config(schema, path, [] if finetune else ["data.path=x.zarr"])
print(json.dumps(sorted(m for m in ("mujoco", "torchrl", "ogbench") if m in sys.modules)))
"""


def test_loading_every_shipped_config_imports_neither_mujoco_nor_torchrl() -> None:
    """Config loading and validation stay light: a fresh interpreter loads them all without the simulator."""
    out = subprocess.run(
        [sys.executable, "-c", LIGHT], cwd=ROOT, capture_output=True, text=True, check=True, timeout=300
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


class Counter:
    """A Backend stand-in: row r succeeds after ``succeed_at[r]`` steps (never if 0), time limit ``limit``."""

    action_dim, obs_dim, goal_dim = 1, 1, 1

    def __init__(self, succeed_at: list[int], limit: int) -> None:
        self.num_envs, self.limit = len(succeed_at), limit
        self.succeed_at = np.asarray(succeed_at)
        self.reset()

    def reset(self, mask=None, seeds=None) -> None:
        n = self.num_envs
        self.step_count = np.zeros(n, np.int64)
        self.observation = np.zeros((n, 1), np.float32)
        self.goal = np.zeros((n, 1), np.float32)
        self.terminated, self.truncated = np.zeros(n, bool), np.zeros(n, bool)
        self.success = self.terminated
        self.actions: list[np.ndarray] = []

    def step(self, actions, mask):
        assert not (self.terminated | self.truncated)[mask].any(), "stepped a finished row"
        self.actions.append(np.where(mask, actions[:, 0], np.nan))
        self.step_count[mask] += 1
        self.observation[mask, 0] = self.step_count[mask]
        self.terminated[mask] = self.step_count[mask] == self.succeed_at[mask]
        self.truncated[mask] = (self.step_count[mask] >= self.limit) & ~self.terminated[mask]
        reward = self.terminated.astype(np.float32)
        return {"reward": reward, "terminated": self.terminated.copy(), "truncated": self.truncated.copy()}

    def observe(self, rows=None):
        return {OBS: self.observation.copy(), GOAL: self.goal.copy()}


def test_run_chunk_stops_each_row_at_its_end_and_counts_real_steps() -> None:
    env = Counter([2, 0, 3], limit=5)
    chunk = np.arange(12, dtype=np.float32).reshape(3, 4, 1)  # row r, action t = 4 r + t
    live = np.ones(3, bool)
    reward, steps = run_chunk(env, chunk, live)
    assert steps.tolist() == [2, 4, 3] and reward.tolist() == [1.0, 0.0, 1.0]
    assert live.tolist() == [False, True, False]  # only the row that neither succeeded nor timed out
    executed = np.stack(env.actions)  # (steps, rows): NaN where a row was not stepped
    np.testing.assert_array_equal(executed[:, 0], [0, 1, np.nan, np.nan])  # the tail is dropped
    np.testing.assert_array_equal(executed[:, 2], [8, 9, 10, np.nan])


def test_rollout_samples_only_live_rows_and_ends_at_success_or_time_limit() -> None:
    env = Counter([3, 0, 7, 1], limit=6)
    asked: list[list[int]] = []

    def sample(obs, idx):
        asked.append(idx.tolist())
        assert obs[OBS].shape == (len(idx), 1)
        return np.zeros((len(idx), 4, 1), np.float32)  # longer than the horizon: the tail is dropped

    success = rollout(env, sample, exec_horizon=2)
    assert success.tolist() == [True, False, False, True]  # row 2 would succeed at 7, past the limit
    assert asked == [[0, 1, 2, 3], [0, 1, 2], [1, 2]]
    assert env.step_count.tolist() == [3, 6, 6, 1]


def test_rollout_refuses_a_sampler_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"expected \(2, >= 3, 1\)"):
        rollout(Counter([1, 1], limit=4), lambda obs, idx: np.zeros((2, 2, 1)), exec_horizon=3)


def test_batched_maze_implements_the_backend_contract() -> None:
    from app.tasks.maze.backend import BatchedMaze

    env = BatchedMaze(TaskConfig(env="pointmaze-medium", max_episode_steps=3), num_envs=2, seed=0)
    try:
        env.reset(seeds=[7, 7], task_ids=[1, 2])
        first = env.observe()
        assert set(first) == {OBS, GOAL} and first[OBS].shape == (2, 2) and first[GOAL].dtype == np.float32
        env.reset(seeds=[7, 8], task_ids=[1, 2])
        np.testing.assert_array_equal(env.observe()[OBS][0], first[OBS][0])  # seeded: the same start
        assert not np.array_equal(env.goal[0], env.goal[1])  # task 2 has another goal cell
        live = np.ones(2, bool)
        _, steps = run_chunk(env, np.zeros((2, 5, 2), np.float32), live)
        assert steps.tolist() == [3, 3] and env.truncated.all() and not live.any()
        with pytest.raises(ValueError, match="1 seeds for 2 sub-envs"):
            env.reset(seeds=[1])
    finally:
        env.close()


def test_the_fit_schema_is_chosen_from_a_shipped_config_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert fit_schema("configs/csp_pointcloud.yaml") is TASKS["cube"].fit_schema()
    assert fit_schema("configs/missing.yaml") is TASKS["maze"].fit_schema()  # the loader names it


def test_the_cube_sensor_travels_with_the_policy_and_old_policies_get_it_from_their_run_config() -> None:
    import dataclasses

    from app.tasks.cube.config import CubeConfig
    from app.tasks.cube.task import sensor_config
    from modules.nets.policy import CSPPolicy, PolicyConfig

    cube = TASKS["cube"]
    from app.config import load_config

    cfg = load_config(cube.fit_schema(), ROOT / "configs" / "csp_pointcloud.yaml", ["data.path=x.zarr"])
    sensor = cube.sensor(cfg)
    assert sensor_config(sensor, "p") == cfg.demos.cube  # the checkpoint's dict rebuilds the sensor
    policy_cfg = PolicyConfig(context_mode="pointcloud", num_points=512, width=32, depth=1, heads=2)
    assert CSPPolicy(policy_cfg, 19, 5, 3, sensor=sensor).sensor == sensor
    old = CSPPolicy(policy_cfg, obs_dim=19, action_dim=5, goal_dim=3)  # a policy saved without a sensor
    run_config = {"demos": {"cube": {"num_points": 512, "cameras": ["left"]}}}
    legacy = cube.legacy_sensor(run_config, old, "run 'r'")
    assert legacy == json.loads(json.dumps(dataclasses.asdict(CubeConfig(num_points=512, cameras=["left"]))))
    with pytest.raises(ValueError, match=r"run 'r': demos.cube.num_points=64 but its policy takes 512"):
        cube.legacy_sensor({"demos": {"cube": {"num_points": 64}}}, old, "run 'r'")
    with pytest.raises(ValueError, match="carries no sensor settings"):
        sensor_config({}, "the policy")
    with pytest.raises(ValueError, match=r"unknown cube sensor settings \['lens'\]"):
        sensor_config({"lens": 1}, "the policy")
