"""Tests for app/envs/batched_maze.py and app/envs/torchrl_envs.py (maze envs, ChunkEnv, decoders)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensordict.nn import TensorDictModule
from torchrl.envs.utils import check_env_specs

from app.envs.decoders import BasePolicyDecoder, RawDecoder
from app.envs.torchrl_envs import ChunkEnv, StepEnv, make_chunk_env
from app.methods import METHODS
from app.tasks.maze.backend import BatchedMaze
from app.tasks.registry import TaskConfig
from modules.nets.keys import GOAL, OBS
from modules.nets.policy import CSPPolicy, PolicyConfig


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny batches gain nothing from intra-op threads, and on a busy 2-core machine they wait for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def policy() -> CSPPolicy:
    """A tiny untrained CSP policy (chunk 4, 2 Euler steps) with simple normalization statistics."""
    torch.manual_seed(0)
    pol = CSPPolicy(
        PolicyConfig(chunk_len=4, width=32, depth=1, heads=2, sample_steps=2),
        obs_dim=2,
        action_dim=2,
        goal_dim=2,
    )
    ones, zeros = torch.ones(2), torch.zeros(2)
    pol.set_normalization(
        dict(
            observation_mean=zeros + 10,
            observation_std=ones * 10,
            goal_mean=zeros + 10,
            goal_std=ones * 10,
            action_min=-ones,
            action_max=ones,
        )
    )
    return pol


def constant_actor(action: torch.Tensor) -> TensorDictModule:
    """A TorchRL policy that always outputs ``action`` (D,) for every sub-env."""
    return TensorDictModule(
        lambda obs: action.expand(obs.shape[0], -1).clone(), in_keys=[OBS], out_keys=["action"]
    )


# ---------------------------------------------------------------------------------------------- TaskConfig


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(task_id=0), "task_id=0"),
        (dict(task_id=6), "task_id=6"),
        (dict(task_id=None, init_ij=[1, 1]), "needs both init_ij and goal_ij"),
        (dict(goal_ij=[1]), r"goal_ij=\[1\]"),
        (dict(max_episode_steps=0), "max_episode_steps=0"),
        (dict(env="pointmaze-lrge"), "unknown environment"),
    ],
)
def test_task_config_validates(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TaskConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(init_ij=[0, 0]), r"init_ij=\[0, 0\] is a wall"),
        (dict(goal_ij=[4, 4]), r"goal_ij=\[4, 4\] is a wall"),
        (dict(goal_ij=[20, 1]), r"goal_ij=\[20, 1\] is outside the map"),
    ],
)
def test_cells_must_be_free(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BatchedMaze(TaskConfig(**kwargs), num_envs=1)


def test_task_cells_and_overrides() -> None:
    maze = BatchedMaze(TaskConfig(task_id=1, goal_ij=[1, 2]), num_envs=2)
    assert maze.init_ij == (1, 1) and maze.goal_ij == (1, 2)  # task 1 starts at (1, 1); goal overridden
    maze.reset()
    obs, goal = maze.observation.copy(), maze.goal.copy()
    # cell (i, j) has centre xy = (4 j - 4, 4 i - 4); OGBench jitters by at most 1 per axis
    np.testing.assert_allclose(obs, [[0.0, 0.0]] * 2, atol=1.0 + 1e-5)
    np.testing.assert_allclose(goal, [[4.0, 0.0]] * 2, atol=1.0 + 1e-5)
    assert not np.allclose(obs[0], obs[1])  # each sub-env draws its own jitter


# ---------------------------------------------------------------------------------------------- BatchedMaze


def test_batched_maze_is_seeded_and_masks_steps() -> None:
    task = TaskConfig(max_episode_steps=3)
    a, b, c = BatchedMaze(task, 2, seed=5), BatchedMaze(task, 2, seed=5), BatchedMaze(task, 2, seed=6)
    a.reset()
    obs_a, goal_a = a.observation.copy(), a.goal.copy()
    b.reset()
    obs_b, goal_b = b.observation.copy(), b.goal.copy()
    c.reset()
    obs_c, _ = c.observation.copy(), c.goal.copy()
    np.testing.assert_array_equal(obs_a, obs_b)
    np.testing.assert_array_equal(goal_a, goal_b)
    assert not np.allclose(obs_a, obs_c)

    with pytest.raises(ValueError, match=r"mask has dtype int64 and shape \(2,\)"):
        a.step(np.zeros((2, 2)), np.array([1, 0]))
    out = a.step(np.full((2, 2), 0.5), np.array([True, False]))
    assert not np.allclose(out["observation"][0], obs_a[0])  # stepped
    np.testing.assert_array_equal(out["observation"][1], obs_a[1])  # not stepped: keeps its last value
    np.testing.assert_array_equal(a.step_count, [1, 0])
    a.step(np.zeros((2, 2)), np.array([True, False]))
    out = a.step(np.zeros((2, 2)), np.array([True, False]))
    assert out["truncated"].tolist() == [True, False] and not out["terminated"].any()
    with pytest.raises(RuntimeError, match=r"sub-envs \[0\] were never reset or are done"):
        a.step(np.zeros((2, 2)), np.array([True, True]))
    a.reset(np.array([True, False]))
    np.testing.assert_array_equal(a.step_count, [0, 0])


# ---------------------------------------------------------------------------------------------- specs


def test_maze_env_specs() -> None:
    env = StepEnv(TaskConfig(max_episode_steps=2), num_envs=3, seed=0)
    assert env.action_spec.shape == (3, 2)
    check_env_specs(env, break_when_any_done="both")  # max_steps 2: the rollout of 3 crosses a reset


@pytest.mark.parametrize("method", sorted(METHODS))
def test_chunk_env_specs(method: str, policy: CSPPolicy) -> None:
    env = make_chunk_env(TaskConfig(max_episode_steps=6), 3, policy, method, exec_horizon=4, seed=0)
    want = {"tmrl": 2 + 1 + 2, "fixed_sigma": 2 + 2, "dsrl": 2, "sac": 4 * 2, "rlpd": 4 * 2}[method]
    assert env.action_spec.shape == (3, want)
    check_env_specs(env, break_when_any_done="both")


# ---------------------------------------------------------------------------------------------- ChunkEnv


def test_truncation_keeps_the_true_final_observation() -> None:
    task, step_action = TaskConfig(max_episode_steps=10), np.array([0.3, -0.2], np.float32)
    env = make_chunk_env(task, 2, None, "sac", exec_horizon=4, seed=3)
    actor = constant_actor(torch.as_tensor(np.tile(step_action, 4), dtype=torch.float32))
    td = env.rollout(4, actor, break_when_any_done=False)  # (N, 4): chunks of 4, 4, 2, then a new episode

    # the same low-level actions on a twin maze, one step at a time
    ref = BatchedMaze(task, 2, seed=3)
    ref.reset()
    lows = [ref.step(np.tile(step_action, (2, 1)), np.ones(2, bool))["observation"] for _ in range(10)]
    ref.reset()
    reset_obs, _ = ref.observation.copy(), ref.goal.copy()

    assert td["next", "env_steps"][..., 0].tolist() == [[4, 4, 2, 4]] * 2
    assert td["next", "truncated"][..., 0].tolist() == [[False, False, True, False]] * 2
    assert not td["next", "terminated"].any()
    np.testing.assert_array_equal(td["next", OBS][:, 1].numpy(), lows[7])
    np.testing.assert_array_equal(td["next", OBS][:, 2].numpy(), lows[9])  # obs at step 10, not a reset one
    np.testing.assert_array_equal(td[OBS][:, 3].numpy(), reset_obs)  # the reset comes after, in _reset
    assert not np.allclose(lows[9], reset_obs)


class GoalSeeker:
    """Test decoder: a constant chunk heading from the observation straight for the goal."""

    action_dim, chunk_len, env_action_dim = 2, 16, 2
    sizes, uses_base, sigma_max, feature_dim = {"action": 2}, False, 1.0, 0

    def split(self, action: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"action": action}

    def features(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.zeros(obs[OBS].shape[0], 0)

    def __call__(self, action: torch.Tensor, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        step = (obs[GOAL] - obs[OBS]) / 0.8
        return step.clamp(-1, 1)[:, None, :].expand(-1, self.chunk_len, -1)


def test_termination_stops_a_chunk_early() -> None:
    # start and goal in the same cell: every sub-env reaches the goal within a few steps of one chunk
    task = TaskConfig(task_id=None, init_ij=[1, 1], goal_ij=[1, 1], max_episode_steps=100)
    env = ChunkEnv(task, 4, GoalSeeker(), exec_horizon=16, seed=1)
    td = env.rollout(1, break_when_any_done=False)

    ref = BatchedMaze(task, 4, seed=1)
    ref.reset()
    obs, goal = ref.observation.copy(), ref.goal.copy()
    chunk = GoalSeeker()(None, {OBS: torch.from_numpy(obs), GOAL: torch.from_numpy(goal)}).numpy()
    first_success, final_obs = np.zeros(4, np.int64), np.zeros((4, 2), np.float32)
    for t in range(16):
        out = ref.step(chunk[:, t], ~ref.terminated)
        hit = out["success"] & (first_success == 0)
        first_success[hit], final_obs[hit] = t + 1, out["observation"][hit]
    assert (first_success > 0).all() and (first_success < 16).all()  # the test needs real early stops

    np.testing.assert_array_equal(td["next", "env_steps"][:, 0, 0].numpy(), first_success)
    assert (
        td["next", "terminated"].all() and td["next", "success"].all() and not td["next", "truncated"].any()
    )
    np.testing.assert_array_equal(td["next", "reward"][:, 0, 0].numpy(), np.ones(4))
    np.testing.assert_array_equal(td["next", OBS][:, 0].numpy(), final_obs)
    np.testing.assert_array_equal(env.backend.step_count, first_success)  # nothing ran past the success


def test_env_steps_count_every_real_step(policy: CSPPolicy) -> None:
    env = make_chunk_env(TaskConfig(max_episode_steps=10), 3, policy, "tmrl", exec_horizon=4, seed=0)
    calls = [0]
    for maze in env.backend._mazes:
        inner = maze.step

        def counted(action, inner=inner):
            calls[0] += 1
            return inner(action)

        maze.step = counted  # instance attribute: shadows the class's step for this sub-env only
    td = env.rollout(12, break_when_any_done=False)  # random actions, auto-reset of finished sub-envs
    steps = td["next", "env_steps"][..., 0]
    assert int(steps.sum()) == calls[0] == 3 * 4 * 10  # 4 episodes of 10 steps per sub-env, no success
    assert steps[0].tolist() == [4, 4, 2] * 4


def test_chunk_env_refuses_a_horizon_longer_than_the_chunk(policy: CSPPolicy) -> None:
    with pytest.raises(ValueError, match="exec_horizon=5 exceeds the decoder's chunk length 4"):
        make_chunk_env(TaskConfig(), 1, policy, "tmrl", exec_horizon=5)


def test_policy_is_bit_identical_after_rollouts(policy: CSPPolicy) -> None:
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    for method in ("tmrl", "fixed_sigma", "dsrl"):
        make_chunk_env(TaskConfig(max_episode_steps=8), 2, policy, method, exec_horizon=4).rollout(5)
    after = policy.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in policy.parameters())


# ---------------------------------------------------------------------------------------------- decoders


def test_decoder_maps_each_head(policy: CSPPolicy) -> None:
    dec = BasePolicyDecoder(policy, ["z", "sigma", "eps_c"], sigma_max=0.8, eps_bound=2.5, z_map="linear")
    assert dec.sizes == {"z": 2, "sigma": 1, "eps_c": 2} and dec.action_dim == 5
    u_sigma = torch.tensor([-1.0, 0.0, 1.0])
    action = torch.stack(
        [torch.tensor([0.5, -1.0, u, 1.0, -1.0]) for u in u_sigma]
    )  # layout: z (2) | sigma (1) | eps_c (2)
    parts = dec.split(action)
    torch.testing.assert_close(parts["sigma"], torch.tensor([0.0, 0.4, 0.8]))
    torch.testing.assert_close(parts["eps_c"], torch.tensor([[2.5, -2.5]] * 3))
    assert parts["z"].shape == (3, 4, 2)
    torch.testing.assert_close(parts["z"], torch.tensor([1.5, -3.0]).expand(3, 4, 2))  # repeated over L


def test_erfinv_turns_uniform_into_standard_normal(policy: CSPPolicy) -> None:
    dec = BasePolicyDecoder(policy, ["z"], z_mode="full", z_map="erfinv")
    assert dec.action_dim == 4 * 2
    gen = torch.Generator().manual_seed(0)
    u = torch.rand((20_000, dec.action_dim), generator=gen) * 2 - 1
    z = dec.split(u)["z"]  # (N, L, d_a)
    torch.testing.assert_close(z.reshape(20_000, -1), np.sqrt(2) * torch.erfinv(u))  # layout is row-major
    assert abs(z.mean().item()) < 0.02 and abs(z.var().item() - 1.0) < 0.03
    assert abs((z.abs() < 1).float().mean().item() - 0.6827) < 0.01  # the normal's one-sigma mass
    ends = dec.split(torch.tensor([[1.0] * 8, [-1.0] * 8]))["z"]
    assert torch.isfinite(ends).all() and 4.5 < ends.max() < 5.0  # u = +-1 is clipped, not infinite


def test_absent_heads_take_their_defaults(policy: CSPPolicy) -> None:
    dec = BasePolicyDecoder(policy, ["z", "eps_c"], fixed_sigma=0.3)
    parts = dec.split(torch.zeros(2, 4))
    torch.testing.assert_close(parts["sigma"], torch.full((2,), 0.3))
    dsrl = BasePolicyDecoder(policy, ["z"])
    parts = dsrl.split(torch.zeros(2, 2))
    torch.testing.assert_close(parts["eps_c"], torch.zeros(2, policy.context_dim))
    torch.testing.assert_close(parts["sigma"], torch.zeros(2))


def test_decoder_samples_the_policy_with_the_decoded_noise(policy: CSPPolicy) -> None:
    dec = BasePolicyDecoder(policy, ["z", "sigma", "eps_c"], steps=3)
    action = torch.rand(5, dec.action_dim) * 2 - 1
    obs, goal = torch.randn(5, 2) * 5, torch.randn(5, 2) * 5
    parts = dec.split(action)
    want = policy.sample(
        {OBS: obs, GOAL: goal}, parts["sigma"], action_noise=parts["z"], context_noise=parts["eps_c"], steps=3
    )
    torch.testing.assert_close(dec(action, {OBS: obs, GOAL: goal}), want)
    with pytest.raises(ValueError, match=r"action is \(5, 4\); expected a tensor of shape \(N, 5\)"):
        dec(action[:, :4], {OBS: obs, GOAL: goal})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(heads=["sigma"]), "including 'z'"),
        (dict(heads=["z", "z"]), "distinct"),
        (dict(heads=["z", "temp"]), "distinct"),
        (dict(heads=["z"], sigma_max=1.5), "sigma_max=1.5"),
        (dict(heads=["z"], z_mode="half"), "z_mode='half'"),
        (dict(heads=["z"], z_map="tanh"), "z_map='tanh'"),
    ],
)
def test_decoder_validates(policy: CSPPolicy, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BasePolicyDecoder(policy, **kwargs)


def test_raw_decoder_is_the_chunk() -> None:
    dec = RawDecoder(exec_horizon=3, action_dim=2)
    action = torch.arange(12.0).reshape(2, 6) / 12
    chunk = dec(action, {})
    assert dec.action_dim == 6 and chunk.shape == (2, 3, 2)
    torch.testing.assert_close(chunk[1, 2], action[1, 4:6])  # action-major layout


def test_make_chunk_env_methods(policy: CSPPolicy) -> None:
    with pytest.raises(ValueError, match=r"unknown method 'ppo'; expected one of \['tmrl', 'fixed_sigma'"):
        make_chunk_env(TaskConfig(), 1, policy, "ppo", exec_horizon=4)
    with pytest.raises(ValueError, match="method 'tmrl' needs the pre-trained policy"):
        make_chunk_env(TaskConfig(), 1, None, "tmrl", exec_horizon=4)
    env = make_chunk_env(TaskConfig(), 1, policy, "dsrl", exec_horizon=4, fixed_sigma=0.5, eps_bound=2.0)
    assert env.decoder.heads == ["z"] and env.decoder.fixed_sigma == 0.0  # dsrl always runs at sigma 0
    env = make_chunk_env(TaskConfig(), 1, policy, "fixed_sigma", exec_horizon=4, fixed_sigma=0.5)
    assert env.decoder.heads == ["z", "eps_c"] and env.decoder.fixed_sigma == 0.5
    assert isinstance(make_chunk_env(TaskConfig(), 1, policy, "sac", exec_horizon=4).decoder, RawDecoder)
