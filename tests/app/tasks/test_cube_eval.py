"""Zero-shot Success@K on the point-cloud cube task: the statistic, the rollout loop, scenes, config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.config import ConfigError, load_config
from app.evaluation import policy_table
from app.tasks.cube.config import CubeConfig, CubeEvalConfig, PointCloudFitConfig
from app.tasks.cube.evaluate import (
    evaluate_cube,
    plot_success_at_k,
    rollout_states,
    state_seeds,
    success_at_k,
    summary,
)
from modules.nets import CSPPolicy, PolicyConfig
from modules.nets.keys import GOAL, OBS, POINTCLOUD
from modules.nets.pointnet import pointcloud_stats

N = 16  # points per cloud
TINY_CUBE = CubeConfig(num_points=N, robot_geometry="none", width=48, height=48)


def tiny_policy(seed: int = 0) -> CSPPolicy:
    """An untrained point-cloud policy with the cube's dims (19-d state, 3-d goal, 5-d actions)."""
    torch.manual_seed(seed)
    cfg = PolicyConfig(
        context_mode="pointcloud", num_points=N, pointnet_widths=[16, 16], width=32, depth=1, heads=2,
        chunk_len=4, sample_steps=2,
    )  # fmt: skip
    policy = CSPPolicy(cfg, obs_dim=19, action_dim=5, goal_dim=3)
    clouds = np.random.default_rng(0).uniform([0.3, -0.3, 0.0], [0.55, 0.3, 0.3], (8, N, 3))
    stats = {
        "observation_mean": np.zeros(19), "observation_std": np.ones(19),
        "goal_mean": np.array([0.425, 0.0, 0.02]), "goal_std": np.array([0.1, 0.2, 0.01]),
        "action_min": -np.ones(5), "action_max": np.ones(5),
    }  # fmt: skip
    policy.set_normalization(stats | pointcloud_stats(clouds.astype(np.float32)))
    return policy.eval()


# ---------------------------------------------------------------- the statistic
def test_success_at_k_on_a_hand_example():
    success = np.array([[0, 1, 0], [0, 0, 0], [1, 1, 1]], bool)
    np.testing.assert_allclose(success_at_k(success), [1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(success_at_k(np.array([[1], [0]])), [0.5])


def test_success_at_k_is_non_decreasing_and_ends_at_any_success():
    rng = np.random.default_rng(0)
    for _ in range(20):
        success = rng.random((7, 5)) < rng.uniform(0.05, 0.5)
        curve = success_at_k(success)
        assert curve.shape == (5,) and np.all(np.diff(curve) >= 0)
        assert curve[0] == success[:, 0].mean() and curve[-1] == success.any(axis=1).mean()


def test_success_at_k_refuses_a_flat_array():
    with pytest.raises(ValueError, match="states, rollouts"):
        success_at_k(np.zeros(4, bool))


# ---------------------------------------------------------------- the rollout loop, without MuJoCo
class ScriptedCube:
    """BatchedCube's interface; row r succeeds after ``succeed_at[r]`` steps (never if 0)."""

    action_dim, config = 5, TINY_CUBE

    def __init__(self, succeed_at: list[int], max_steps: int) -> None:
        self.num_envs, self.max_steps = len(succeed_at), max_steps
        self.succeed_at = np.asarray(succeed_at)
        self.observation = np.zeros((self.num_envs, 19), np.float32)
        self.goal = np.full((self.num_envs, 3), [0.5, 0.2, 0.02], np.float32)
        self.rendered, self.seeds = [], None

    def reset(self, mask=None, seeds=None) -> None:
        self.seeds = list(seeds)
        self.step_count = np.zeros(self.num_envs, int)
        self.success = np.zeros(self.num_envs, bool)
        self.terminated = self.success  # success ends an episode
        self.truncated = np.zeros(self.num_envs, bool)

    def step(self, actions, mask):
        assert not (self.success | self.truncated)[mask].any(), "stepped a finished row"
        self.step_count[mask] += 1
        self.success[mask] = self.step_count[mask] == self.succeed_at[mask]
        self.truncated[mask] = (self.step_count[mask] >= self.max_steps) & ~self.success[mask]
        reward = self.success.astype(np.float32)
        return {"reward": reward, "terminated": self.success.copy(), "truncated": self.truncated.copy()}

    def scene(self, k: int) -> np.ndarray:  # a stand-in qpos: the row's step count and index
        return np.array([self.step_count[k], k], np.float64)

    def observe(self, rows):
        self.rendered.append(rows.copy())
        rng = np.random.default_rng(len(self.rendered))
        cloud = rng.uniform(0.3, 0.5, (self.num_envs, N, 3)).astype("f4")
        return {OBS: self.observation.copy(), GOAL: self.goal.copy(), POINTCLOUD: cloud}


def test_rollouts_stop_at_success_or_time_limit_and_render_only_live_rows():
    cfg = CubeEvalConfig(states=3, rollouts=2, exec_horizon=3, sample_steps=1, max_episode_steps=10)
    env = ScriptedCube([0, 2, 5, 0, 10, 11], max_steps=10)  # 11 lies past the time limit
    success = rollout_states(tiny_policy(), env, 0.5, cfg, "train")
    np.testing.assert_array_equal(success, [[False, True], [True, False], [True, False]])
    np.testing.assert_array_equal(env.step_count, [10, 2, 5, 10, 10, 10])
    assert env.seeds == list(np.repeat(state_seeds(cfg, "train"), 2))  # K rows per state, one seed each
    assert env.rendered[0].all() and env.rendered[1].tolist() == [True, False, True, True, True, True]
    assert env.rendered[2].tolist() == [True, False, False, True, True, True]  # row 2 solved at step 5
    assert len(env.rendered) == 4  # chunks at steps 0, 3, 6, 9


def test_recorded_rollouts_give_replays_of_each_step_for_the_first_successes_and_failures():
    cfg = CubeEvalConfig(states=4, rollouts=2, exec_horizon=3, sample_steps=1, max_episode_steps=10)
    env = ScriptedCube([0, 2, 5, 0, 10, 0, 3, 4], max_steps=10)  # succeed: rows 1, 2, 4 (at the limit), 6, 7
    replays = []
    success = rollout_states(tiny_policy(), env, 0.5, cfg, "heldout", replays=replays)
    assert success.sum() == 5 and len(replays) == 3 + 3  # REPLAYS_PER_OUTCOME of each outcome
    wins, losses = replays[:3], replays[3:]
    assert [r.success for r in wins] == [True] * 3 and not any(r.success for r in losses)
    assert [r.label for r in wins] == [
        "heldout_sigma_0.5_state_0_rollout_1_success",
        "heldout_sigma_0.5_state_1_rollout_0_success",
        "heldout_sigma_0.5_state_2_rollout_0_success",
    ]
    assert losses[0].label == "heldout_sigma_0.5_state_0_rollout_0_failure"
    assert {r.group for r in replays} == {"heldout_sigma_0.5"}
    # the reset scene and one per step: row 1 succeeded at step 2, row 0 ran to the limit
    np.testing.assert_array_equal(wins[0].path, [[0, 1], [1, 1], [2, 1]])
    assert losses[0].path.shape == (11, 2) and losses[0].path[-1, 0] == 10
    np.testing.assert_allclose(wins[0].goal, [0.5, 0.2, 0.02])
    assert (
        rollout_states(tiny_policy(), env, 0.5, cfg, "heldout").tolist() == success.tolist()
    )  # no list: no replays


def test_state_seeds_are_fixed_and_differ_across_states_and_variations():
    cfg = CubeEvalConfig(states=5)
    seeds = state_seeds(cfg, "train")
    assert seeds == state_seeds(CubeEvalConfig(states=5), "train") and len(set(seeds)) == 5
    assert not set(seeds) & set(state_seeds(cfg, "heldout"))
    assert not set(seeds) & set(state_seeds(CubeEvalConfig(states=5, seed=1), "train"))


# ---------------------------------------------------------------- end to end on tiny MuJoCo envs
@pytest.fixture(scope="module")
def evaluated():
    """One tiny evaluation (held-out, 2 states x 2 rollouts, 2 sigmas, 4 steps) recording the batches."""
    policy = tiny_policy()
    calls = []
    sample = policy.sample

    def recording_sample(batch, sigma, **kw):
        calls.append({"batch": {k: v.clone() for k, v in batch.items()}, "sigma": sigma, **kw})
        return sample(batch, sigma, **kw)

    policy.sample = recording_sample  # an instance attribute shadows the method
    cfg = CubeEvalConfig(
        sigmas=[0.0, 1.0], variations=["heldout"], states=2, rollouts=2, exec_horizon=2, sample_steps=1,
        max_episode_steps=4,
    )  # fmt: skip
    return cfg, evaluate_cube(policy, TINY_CUBE, cfg, progress=False), calls


def test_evaluation_returns_one_success_array_per_variation_and_sigma(evaluated, tmp_path):
    cfg, results, _ = evaluated
    assert list(results) == [("heldout", 0.0), ("heldout", 1.0)]
    for success in results.values():
        assert success.shape == (2, 2) and success.dtype == bool
        assert np.all((success_at_k(success) >= 0) & (success_at_k(success) <= 1))
    names = policy_table(results).metrics()  # (a value and its interval's two ends) x 3 per sigma
    assert len(names) == 2 * 3 * 3 and not any("@" in n or "=" in n for n in names)
    assert {"eval/heldout/success_at_k_sigma_1_k_2", "eval/heldout/success_sigma_0_ci_low"} <= set(names)
    assert all(0.0 <= v <= 1.0 for v in names.values())
    assert len(summary(results)) == 2 and "Success@1" in summary(results)[0]
    assert plot_success_at_k(results, tmp_path / "k.png").stat().st_size > 0


def test_the_rollouts_of_a_state_share_its_scene_and_states_differ(evaluated):
    cfg, _, calls = evaluated
    assert len(calls) == 2 * 2  # 2 sigmas x 2 chunks of 2 actions in 4 steps
    firsts = calls[::2]  # each (variation, sigma)'s first chunk: every row at its reset scene
    for call in firsts:
        b = call["batch"]
        assert len(b[OBS]) == 4
        for key in (OBS, GOAL, POINTCLOUD):
            torch.testing.assert_close(b[key][0], b[key][1], rtol=0, atol=0)  # state 0's two rollouts
            torch.testing.assert_close(b[key][2], b[key][3], rtol=0, atol=0)
        assert not torch.equal(b[GOAL][0], b[GOAL][2]) and not torch.equal(b[POINTCLOUD][0], b[POINTCLOUD][2])
        assert not torch.equal(call["action_noise"][0], call["action_noise"][1])  # fresh z per rollout
        assert not torch.equal(call["context_noise"][0], call["context_noise"][1])
    first, second = (c["batch"] for c in firsts)
    assert [c["sigma"] for c in firsts] == [0.0, 1.0]
    for key in (OBS, GOAL, POINTCLOUD):  # every sigma faces the same scenes
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)
    # the variation is the evaluated one, not demos.cube's ("train" targets lie outside this region)
    goals = first[GOAL].numpy()[:, :2]
    assert np.all((goals >= TINY_CUBE.heldout_low) & (goals <= TINY_CUBE.heldout_high))


# ---------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.states=0", "eval.states must be >= 1, got 0"),
        ("eval.rollouts=0", "eval.rollouts must be >= 1, got 0"),
        ("eval.max_episode_steps=0", "eval.max_episode_steps must be >= 1, got 0"),
        ("eval.sigmas=[0,1.5]", "eval.sigmas must be a non-empty list of values in [0, 1]"),
        ("eval.sigmas=[]", "eval.sigmas must be a non-empty list"),
        ("eval.variations=[test]", "eval.variations must be a non-empty list of distinct values"),
        ("eval.exec_horizon=17", "eval.exec_horizon=17 exceeds policy.chunk_len=16"),
    ],
)
def test_bad_eval_settings_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(PointCloudFitConfig, None, ["data.path=x.zarr", "policy.context_mode=pointcloud",
                                                "policy.num_points=512", override])  # fmt: skip
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("cube", "cfg", "message"),
    [
        (TINY_CUBE, CubeEvalConfig(exec_horizon=5), "eval.exec_horizon=5 exceeds policy chunk_len=4"),
        (CubeConfig(num_points=2 * N), CubeEvalConfig(), "point-cloud policy of 32 points"),
    ],
)
def test_a_policy_that_cannot_act_is_refused_before_building_envs(cube, cfg, message, monkeypatch):
    never = lambda *a, **k: pytest.fail("built envs")  # noqa: E731
    monkeypatch.setattr("app.tasks.cube.evaluate.BatchedCube.__init__", never)
    with pytest.raises(ValueError, match=message):
        evaluate_cube(tiny_policy(), cube, cfg, progress=False)


def test_the_cube_eval_config_is_the_point_cloud_fit_default():
    overrides = ["data.path=x.zarr", "policy.context_mode=pointcloud", "policy.num_points=512"]
    cfg = load_config(PointCloudFitConfig, None, overrides)
    assert isinstance(cfg.eval, CubeEvalConfig) and cfg.eval.enabled
    assert cfg.eval.sigmas == [0.0, 0.25, 0.5, 0.75, 1.0] and cfg.eval.variations == ["train", "heldout"]
