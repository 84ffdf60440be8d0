"""TMRL fine-tuning on the point-cloud cube: the chunked env (one render per chunk, compact agent state),
the eps_c code head, the refusals, and `tmrl finetune --from-run <point-cloud run>` end to end."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from torchrl.envs.utils import check_env_specs

from app.base_run import check_compatible
from app.cli import main
from app.envs.decoders import BasePolicyDecoder
from app.envs.torchrl_envs import make_chunk_env
from app.finetune import state_keys
from app.tasks.cube.config import CubeConfig
from app.tasks.cube.env import CubePointCloudEnv
from app.tasks.registry import TaskConfig
from modules.nets.keys import CONTEXT_FEATURE, GOAL, OBS, POINTCLOUD
from modules.nets.pointnet import pointcloud_stats
from modules.nets.policy import CSPPolicy, PolicyConfig
from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[2]
TINY_FIT = tiny_config("csp_pointcloud")
TINY_FT = tiny_config("tmrl_cube")
P = 32  # points per cloud
CUBE = CubeConfig(num_points=P, robot_geometry="none", width=48, height=48)
SENSOR = dataclasses.asdict(CUBE)  # what a cube policy carries
TASK = TaskConfig(env="cube-single", variation="heldout", max_episode_steps=12)


def cube_policy(code_dim: int = 4) -> CSPPolicy:
    torch.manual_seed(0)
    cfg = PolicyConfig(context_mode="pointcloud", num_points=P, pointnet_widths=[16, 16], width=32, depth=1,
                       heads=2, chunk_len=8, sample_steps=2, context_code_dim=code_dim)  # fmt: skip
    policy = CSPPolicy(cfg, obs_dim=19, action_dim=5, goal_dim=3)
    clouds = np.random.default_rng(0).uniform([0.3, -0.3, 0.0], [0.6, 0.3, 0.3], (8, P, 3))
    stats = {"observation_mean": np.zeros(19), "observation_std": np.ones(19), "goal_mean": np.zeros(3),
             "goal_std": np.ones(3), "action_min": -np.ones(5), "action_max": np.ones(5)}  # fmt: skip
    policy.set_normalization(stats | pointcloud_stats(clouds.astype(np.float32)))
    return policy.eval()


@pytest.fixture(scope="module")
def cube_env():
    env = make_chunk_env(TASK, 2, cube_policy(), "tmrl", exec_horizon=4, seed=0, sensor=SENSOR)
    yield env
    env.backend.close()


def test_cube_chunk_env_specs_and_compact_state(cube_env):
    check_env_specs(cube_env, seed=0)
    td = cube_env.rollout(2, break_when_any_done=False)
    assert td[CONTEXT_FEATURE].shape == (2, 2, 32)  # (N, steps, policy width): the agent's view of the cloud
    assert POINTCLOUD not in td.keys(True)  # clouds never reach the replay buffer
    assert td[OBS].shape == (2, 2, 19) and td[GOAL].shape == (2, 2, 3)
    assert state_keys(cube_env) == [OBS, GOAL, CONTEXT_FEATURE]
    # the eps_c head is the policy's 4-d context code, not the 96-d cloud noise
    assert cube_env.decoder.sizes == {"z": 5, "sigma": 1, "eps_c": 4}


def test_features_follow_the_scene_and_the_chunk_renders_once_per_sub_env(cube_env, monkeypatch):
    td = cube_env.reset()
    renders = []
    original = CubePointCloudEnv.pointcloud
    monkeypatch.setattr(CubePointCloudEnv, "pointcloud", lambda self: renders.append(1) or original(self))
    td = cube_env.step(td.set("action", torch.zeros(2, cube_env.decoder.action_dim)))
    assert len(renders) == 2  # 4 physics steps per sub-env, one cloud each (for the next chunk)
    # two sub-envs with different scenes are told apart; the feature is the policy's PointNet of the cloud
    feats = td["next", CONTEXT_FEATURE]
    assert not torch.allclose(feats[0], feats[1])
    obs = {OBS: td["next", OBS], GOAL: td["next", GOAL],
           POINTCLOUD: torch.from_numpy(cube_env.backend.pointcloud.copy())}  # fmt: skip
    torch.testing.assert_close(cube_env.decoder.features(obs), feats)


def test_the_eps_c_code_is_mapped_to_the_cloud_noise():
    policy = cube_policy()
    dec = BasePolicyDecoder(policy, ["z", "sigma", "eps_c"], eps_bound=2.0)
    action = torch.rand(3, dec.action_dim) * 2 - 1
    code = dec.split(action)["eps_c"]
    torch.testing.assert_close(code, 2.0 * action[:, -4:])
    seen = {}
    sample = policy.sample
    policy.sample = lambda *a, **kw: seen.update(kw) or sample(*a, **kw)  # instance attribute: this test only
    obs = {OBS: torch.zeros(3, 19), GOAL: torch.zeros(3, 3), POINTCLOUD: torch.rand(3, P, 3)}
    dec(action, obs)
    torch.testing.assert_close(seen["context_noise"], policy.context_noise_from_code(code))


@pytest.mark.parametrize("heads", [["z"], ["z", "sigma"]])
def test_without_an_eps_c_head_the_cloud_is_not_noised_by_the_code_map(heads):
    policy = cube_policy()  # it has a code map, but the layout has no eps_c head (dsrl, sigma only)
    dec = BasePolicyDecoder(policy, heads, fixed_sigma=0.0)
    action = torch.rand(2, dec.action_dim) * 2 - 1
    seen = {}
    sample = policy.sample
    policy.sample = lambda *a, **kw: seen.update(kw) or sample(*a, **kw)  # instance attribute: this test only
    obs = {OBS: torch.zeros(2, 19), GOAL: torch.zeros(2, 3), POINTCLOUD: torch.rand(2, P, 3)}
    assert dec(action, obs).shape == (2, 8, 5)
    torch.testing.assert_close(seen["context_noise"], torch.zeros(2, policy.context_dim))


def test_a_cloud_policy_without_a_code_map_is_refused_an_eps_c_head_but_not_dsrl():
    policy = cube_policy(code_dim=0)
    with pytest.raises(ValueError, match="context_code_dim"):
        BasePolicyDecoder(policy, ["z", "sigma", "eps_c"])
    assert BasePolicyDecoder(policy, ["z"]).sizes == {"z": 5}


def test_policies_only_fine_tune_on_the_task_kind_they_were_trained_for():
    with pytest.raises(ValueError, match=r"context_mode='pointcloud'.*fine-tune it on \['cube-single'\]"):
        check_compatible(cube_policy(), TaskConfig(env="pointmaze-medium"), "run1")
    maze_policy = CSPPolicy(PolicyConfig(width=32, depth=1, heads=2), obs_dim=2, action_dim=2, goal_dim=2)
    with pytest.raises(ValueError, match="does not fit"):
        check_compatible(maze_policy, TASK, "run2")


def test_cube_task_config_is_checked():
    with pytest.raises(ValueError, match="variation"):
        TaskConfig(env="cube-single", variation="corner")
    with pytest.raises(ValueError, match="maze cells"):
        TaskConfig(env="cube-single", goal_ij=[1, 1])


@pytest.fixture(scope="module")
def cube_run(tmp_path_factory):
    """One tiny point-cloud pre-training run in its own store (no zero-shot evaluation)."""
    tmp = tmp_path_factory.mktemp("cubeft")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    args = [f"data.path={tmp / 'cube.zarr'}", f"output_dir={tmp / 'runs'}", f"tracking.uri={uri}",
            f"tracking.artifact_location={tmp / 'artifacts'}", "eval.enabled=false"]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TMRL_RUN_ID", raising=False)
        assert main(["fit", "--config", TINY_FIT, *args]) == 0
    return tmp, uri, MlflowClient(uri).search_runs(["1"])[0].info.run_id


def test_finetune_from_a_point_cloud_run(cube_run, tmp_path, capsys, monkeypatch):
    tmp, uri, parent = cube_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    args = ["finetune", "--from-run", parent, "--config", TINY_FT, f"output_dir={tmp_path}"]
    assert main(args) == 0
    run_id = capsys.readouterr().out.strip().splitlines()[-1].split("=", 1)[1]
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params["task.env"] == "cube-single" and "eval/success_rate" in run.data.metrics
    assert run.data.metrics["train/sigma_mean"] >= 0.0
    ckpt = torch.load(tmp_path / run_id / "checkpoints" / "agent_final.pt", weights_only=True)
    assert ckpt["counters"]["env_steps"] >= 48
    # rlpd mixes maze demonstrations and is refused on the cube before any run starts
    assert main([*args, "method=rlpd"]) == 2
    assert "method=rlpd" in capsys.readouterr().err


def test_bench_finetune_on_the_cube_reports_the_point_cloud_figures(tmp_path, capsys, monkeypatch):
    """Smoke test at test size: the cube benchmark runs and prints its point-cloud figures."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    args = ["bench", "finetune", "--config", TINY_FT, "--policy-config", TINY_FIT, "--env-steps", "16",
            "collect.num_envs=1", "eval.episodes=1"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    for label in ("sensor alone", "observations/s", "share of a fine-tuning env step", "of the floor"):
        assert label in out
