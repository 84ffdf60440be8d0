"""`tmrl fit` with a point-cloud context, end to end at test size (the cube's Success@K evaluation
included), `tmrl eval` of its run, and its refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from app.cli import main
from app.config import ConfigError, load_config
from app.schema import FitConfig
from app.tasks.cube.config import PointCloudFitConfig
from app.tasks.registry import fit_schema
from modules.nets.policy import CSPPolicy
from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[2]
TINY = tiny_config("csp_pointcloud")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One tiny point-cloud fit (2 rendered oracle episodes of 30 steps) in its own store."""
    tmp = tmp_path_factory.mktemp("pcfit")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    args = [f"data.path={tmp / 'cube.zarr'}", f"output_dir={tmp / 'runs'}", f"tracking.uri={uri}",
            f"tracking.artifact_location={tmp / 'artifacts'}"]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TMRL_RUN_ID", raising=False)
        assert main(["fit", "--config", TINY, *args]) == 0
    run = MlflowClient(uri).search_runs(["1"])[0]
    return tmp, uri, run.info.run_id, args


def test_the_schema_follows_the_context_mode():
    assert fit_schema(TINY) is PointCloudFitConfig
    assert fit_schema(str(ROOT / "configs" / "csp_state.yaml")) is FitConfig
    assert fit_schema(None, ["policy.context_mode=pointcloud"]) is PointCloudFitConfig
    cfg = load_config(PointCloudFitConfig, TINY)
    assert cfg.policy.num_points == cfg.data.num_points == cfg.demos.cube.num_points == 32


def test_point_counts_that_disagree_are_refused(capsys):
    assert main(["fit", "--config", TINY, "policy.num_points=16"]) == 2
    err = capsys.readouterr().err
    assert "the point count must agree" in err and "'policy.num_points': 16" in err


def test_pointcloud_fit_runs_end_to_end(fitted):
    tmp, uri, run_id, _ = fitted
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["policy.context_mode"] == "pointcloud"
    assert run.data.tags["tmrl.dataset_fingerprint"] and "train/loss" in run.data.metrics
    policy = CSPPolicy.load(tmp / "runs" / run_id / "policy.pt")
    assert policy.cfg.context_mode == "pointcloud" and policy.context_dim == 3 * 32
    assert policy.context.cloud_norm.is_set  # the data's cloud centre and scale travel with the policy
    batch = {"observation": torch.zeros(2, policy.obs_dim), "goal": torch.zeros(2, 3),
             "pointcloud": torch.zeros(2, 32, 3)}  # fmt: skip
    assert policy.sample(batch, sigma=0.0, steps=2).shape == (2, 4, 5)


def test_the_fit_ends_with_the_cube_evaluation(fitted):
    tmp, uri, run_id, _ = fitted
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    expected = {f"eval/heldout/success_at_k_sigma_{s}_k_{k}" for k in (1, 2) for s in (0, 1)}
    expected |= {"eval/heldout/success_sigma_0", "eval/heldout/success_sigma_1"}
    assert expected <= set(run.data.metrics) and all(0 <= run.data.metrics[m] <= 1 for m in expected)
    assert not any(m.startswith("eval/train/") for m in run.data.metrics)  # variations: [heldout]
    history = client.get_metric_history(run_id, "eval/heldout/success_at_k_sigma_1_k_2")
    assert [m.step for m in history] == [4]  # the final global step (trainer.max_steps)
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/zero_shot_success_at_k.png"]


def test_eval_of_a_pointcloud_run(fitted, capsys):
    tmp, uri, run_id, _ = fitted
    capsys.readouterr()
    out = tmp / "ev"
    args = ["--uri", uri, "--out", str(out), "eval.sigmas=[0.5]", "eval.rollouts=1"]
    args += ["eval.max_episode_steps=4"]
    assert main(["eval", "--from-run", run_id, *args]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "zero-shot cube" in ln]
    assert len(lines) == 1 and "heldout sigma=0.5" in lines[0] and "1 states x 1" in lines[0]
    assert (out / "zero_shot_success_at_k.png").stat().st_size > 0
    # the zero-shot rollouts are filmed too: the one rollout, a success or a failure, replayed from its qpos
    (video,) = (out / "videos").glob("*.mp4")
    assert video.name.startswith("heldout_sigma_0.5_state_0_rollout_0_") and video.stat().st_size > 0
    logged = [a.path for a in MlflowClient(uri).list_artifacts(run_id, "eval/videos")]
    assert logged == [f"eval/videos/{video.name}"]


def test_a_pre_cube_eval_config_loses_the_maze_eval_keys(tmp_path):
    """Runs fitted before the cube evaluation stored the maze's eval keys (and eval.max_steps before its
    rename); `tmrl eval` upgrades the stored config through the cube task."""
    import yaml

    from app.tasks.registry import TASKS

    path = tmp_path / "config.yaml"
    maze_eval = (
        "eval:\n  enabled: false\n  env: null\n  episodes_per_task: 2\n  sigmas: [0.0]\n  exec_horizon: 4\n"
        "  max_steps: 7\n"
    )
    path.write_text(Path(TINY).read_text().split("\neval:")[0] + "\n" + maze_eval)
    with pytest.raises(ConfigError, match="episodes_per_task"):
        load_config(PointCloudFitConfig, path, ["data.path=x.zarr"])
    data = TASKS["cube"].upgrade_run_config(yaml.safe_load(path.read_text()))
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    cfg = load_config(PointCloudFitConfig, path, ["data.path=x.zarr", "eval.states=3"])
    assert cfg.eval.states == 3 and cfg.eval.sigmas == [0.0] and cfg.eval.exec_horizon == 4
    assert cfg.eval.max_episode_steps == 7
    assert cfg.policy.chunk_len == 4 and cfg.demos.cube.num_points == 32  # the rest is kept


def test_a_store_with_another_point_count_is_refused(fitted, capsys):
    tmp, uri, _, args = fitted
    n = ["data.num_points=16"]  # the policy and the generator follow data.num_points
    assert main(["fit", "--config", TINY, *args, *n]) == 2
    err = capsys.readouterr().err
    assert str(tmp / "cube.zarr") in err and "num_points" in err and "32" in err and "16" in err
    assert len(MlflowClient(uri).search_runs(["1"])) == 1  # refused before a run was opened


def test_bench_pretrain_reads_point_cloud_configs(fitted, capsys):
    """Smoke test: the pre-training benchmark runs on the point-cloud data module (no timing asserted)."""
    tmp, _, _, _ = fitted
    args = ["bench", "pretrain", "--config", TINY, "--steps", "2", f"data.path={tmp / 'cube.zarr'}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "data loader" in out and "Lightning/bare" in out
