"""The shared evaluation statistics: Success@k, the bootstrap interval over initial states, the table (its
metrics, CSV and printout, its plots), an episode trace's sigma per step, and the maze's K rollouts."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from app.agent_eval import EpisodeTrace
from app.config import ConfigError, load_config
from app.evaluation import (
    EvalTable,
    agent_row,
    interval,
    plot_agent_success,
    plot_success_at_k,
    policy_table,
    success_at_k,
)
from app.schema import FitConfig
from modules.nets.policy import CSPPolicy, PolicyConfig
from tests.tiny import tiny_config

# 5 initial states x 3 rollouts, by hand: state 0 solved at its 2nd try, 1 never, 2 always, 3 at its 3rd,
# 4 at its 1st only
OUTCOMES = np.array([[0, 1, 0], [0, 0, 0], [1, 1, 1], [0, 0, 1], [1, 0, 0]], bool)


def test_success_at_k_on_a_hand_made_table():
    # solved by the first 1 / 2 / 3 rollouts: states {2, 4} / {0, 2, 4} / {0, 2, 3, 4}
    np.testing.assert_allclose(success_at_k(OUTCOMES), [2 / 5, 3 / 5, 4 / 5])
    table = policy_table({("", 0.25): OUTCOMES})
    m = table.metrics()
    assert m["eval/success_sigma_0.25"] == pytest.approx(6 / 15)  # all 15 rollouts
    assert [m[f"eval/success_at_k_sigma_0.25_k_{k}"] for k in (1, 2, 3)] == pytest.approx([0.4, 0.6, 0.8])
    assert all((r.states, r.rollouts) == (5, 3) for r in table.rows)
    assert [r.k for r in table.rows] == [None, 1, 2, 3]


def test_a_split_names_its_metrics_and_agents_have_their_own():
    table = policy_table({("heldout", 1.0): OUTCOMES[:, :1]})
    assert set(table.metrics()) == {
        f"eval/heldout/{name}{end}"
        for name in ("success_sigma_1", "success_at_k_sigma_1_k_1")
        for end in ("", "_ci_low", "_ci_high")
    }
    row = agent_row(np.array([1, 0, 0, 1]), "deterministic")
    assert (row.metric, row.value, row.states, row.rollouts) == ("eval/success_deterministic", 0.5, 4, 1)


def test_the_interval_contains_the_mean_and_narrows_with_more_states():
    rng = np.random.default_rng(1)
    few = (rng.random((12, 4)) < 0.4).astype(float)
    many = np.tile(few, (40, 1))  # the same per-state outcomes, 40 times as many states: the same mean
    widths = []
    for values in (few, many):
        (low, high), mean = interval(values), values.mean(axis=0)
        assert np.all(low <= mean) and np.all(mean <= high)
        widths.append(high - low)
    assert np.all(widths[1] < 0.5 * widths[0])  # ~ 1 / sqrt(40) as wide
    np.testing.assert_array_equal(
        interval(few), interval(few)
    )  # seeded: the same outcomes, the same interval
    np.testing.assert_array_equal(interval(np.ones((6, 1))), [[1.0], [1.0]])  # no spread, no width


def test_the_success_at_k_interval_resamples_states_not_rollouts():
    # every state solved by exactly one of its 2 rollouts: Success@2 is 1 for every resample of the states
    table = policy_table({("", 0.0): np.array([[1, 0], [0, 1]] * 5, bool)})
    at2 = next(r for r in table.rows if r.k == 2)
    assert (at2.value, at2.ci_low, at2.ci_high) == (1.0, 1.0, 1.0)


def test_the_table_round_trips_through_csv_and_prints_every_row(tmp_path):
    table = EvalTable(
        policy_table({("", 0.5): OUTCOMES}).rows + [agent_row(np.array([1, 0, 1]), "stochastic")]
    )
    with table.write_csv(tmp_path / "t" / "table.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(table.rows) == 5
    metrics = table.metrics()
    for row in rows:
        assert float(row["value"]) == pytest.approx(metrics[row["metric"]])
        assert float(row["ci_low"]) == pytest.approx(metrics[row["metric"] + "_ci_low"])
    assert rows[-1]["k"] == "" and rows[-1]["sigma"] == "" and rows[1]["k"] == "1"
    lines = table.lines()
    assert len(lines) == 1 + 5 and "Success@3" in lines[4] and "stochastic" in lines[5]


def test_the_plots_are_written(tmp_path):
    pre = policy_table({("train", 0.0): OUTCOMES, ("train", 1.0): ~OUTCOMES, ("heldout", 0.0): OUTCOMES})
    assert plot_success_at_k(pre, tmp_path / "k.png", "Success@k").stat().st_size > 0
    agent = EvalTable(
        [agent_row(np.array([1, 0]), "deterministic"), agent_row(np.array([1, 1]), "stochastic")]
    )
    assert plot_agent_success(agent, tmp_path / "a.png", "agent").stat().st_size > 0


def test_an_episode_trace_spreads_each_chunks_sigma_over_its_steps():
    # 10 env steps in chunks of 4: the last chunk was cut short by the episode's end after 2 actions
    trace = EpisodeTrace(
        episode=0, mode="stochastic", observations=np.arange(22, dtype=np.float32).reshape(11, 2),
        goal=np.zeros(2), success=True, chunk_starts=np.array([0, 4, 8]),
        sigma_per_chunk=np.array([0.1, 0.9, 0.5], np.float32),
    )  # fmt: skip
    assert trace.steps == 10 and trace.xy.shape == (11, 2)
    np.testing.assert_allclose(trace.sigma_per_step, [0.1] * 4 + [0.9] * 4 + [0.5] * 2)
    no_choice = EpisodeTrace(
        0, "deterministic", trace.observations, trace.goal, False, trace.chunk_starts, None
    )
    assert no_choice.sigma_per_step is None


def test_maze_eval_rollouts_is_validated():
    with pytest.raises(ConfigError, match="eval.rollouts must be >= 1, got 0"):
        load_config(FitConfig, tiny_config("csp_state"), ["eval.rollouts=0"])
    assert load_config(FitConfig, tiny_config("csp_state")).eval.rollouts == 1  # the fit's cost stays


def test_each_maze_start_is_rolled_out_k_times_with_fresh_noise(monkeypatch):
    from app.tasks.maze import evaluate
    from app.tasks.maze.config import EvalConfig

    monkeypatch.setattr(evaluate, "EVAL_EPISODE_STEPS", 12)  # 3 chunks per rollout
    torch.manual_seed(0)
    policy = CSPPolicy(
        PolicyConfig(chunk_len=4, width=32, depth=1, heads=2), obs_dim=2, action_dim=2, goal_dim=2
    )
    z, one = np.zeros(2), np.ones(2)
    stats = dict(
        observation_mean=z, observation_std=one, goal_mean=z, goal_std=one, action_min=-one, action_max=one
    )
    policy.set_normalization(stats)
    cfg = EvalConfig(episodes_per_task=1, rollouts=3, exec_horizon=4, sample_steps=2)
    r = evaluate.rollout_tasks(policy.eval(), "pointmaze-medium", 0.5, cfg)
    assert r.success.shape == (5, 1, 3) and r.states().shape == (5, 3) and len(r.paths) == 15
    for s in range(5):  # rows s * K + k: the K rollouts of a start share it and its goal, then part
        starts = [r.paths[3 * s + k][0] for k in range(3)]
        assert all(np.array_equal(starts[0], x) for x in starts)
        assert np.all(r.goals[3 * s] == r.goals[3 * s + 1 : 3 * s + 3])
        assert not np.allclose(r.paths[3 * s][-1], r.paths[3 * s + 1][-1])
    assert not np.array_equal(r.paths[0][0], r.paths[3][0])  # the five tasks start apart
    again = evaluate.rollout_tasks(policy, "pointmaze-medium", 0.5, cfg)  # seeded: the same rollouts
    assert all(np.array_equal(a, b) for a, b in zip(r.paths, again.paths, strict=True))
