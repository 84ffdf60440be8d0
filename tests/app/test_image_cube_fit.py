"""Camera frames of the cube through both stages at test size: `tmrl fit --config configs/csp_image_cube.yaml`
(the oracle's demonstrations through OGBench's visual-cube camera, a timm backbone, the image-embedding
context, the cube's Success@K at the end), `tmrl eval` of its run, `tmrl finetune --from-run` of it, and the
refusal of a store whose frames do not match."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from app.cli import main
from app.envs.torchrl_envs import make_chunk_env
from app.tasks.cube.visual_config import VisualCubeFitConfig
from app.tasks.registry import TaskConfig, fit_schema
from modules.nets.keys import CONTEXT_FEATURE, GOAL, IMAGE, OBS
from modules.nets.policy import CSPPolicy
from tests.tiny import tiny_config

TINY = tiny_config("csp_image_cube")
TINY_FT = tiny_config("tmrl_image_cube")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One tiny camera fit on the cube (2 oracle episodes of 30 steps, 32x32 frames) in its own store."""
    tmp = tmp_path_factory.mktemp("imgcubefit")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    args = [f"data.path={tmp / 'cube.zarr'}", f"output_dir={tmp / 'runs'}", f"tracking.uri={uri}",
            f"tracking.artifact_location={tmp / 'artifacts'}"]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TMRL_RUN_ID", raising=False)
        assert main(["fit", "--config", TINY, *args]) == 0
    run = MlflowClient(uri).search_runs(["1"])[0]
    return tmp, uri, run.info.run_id, args


def test_the_visual_cube_schema_is_chosen_and_the_sensor_must_agree(capsys):
    assert fit_schema(TINY) is VisualCubeFitConfig
    assert main(["fit", "--config", TINY, "demos.cube.width=48"]) == 2
    assert "the frame size must agree" in capsys.readouterr().err
    assert main(["fit", "--config", TINY, "policy.image_encoder.views=2"]) == 2
    assert "the number of views must agree" in capsys.readouterr().err
    assert main(["fit", "--config", TINY, "demos.cube.output=pointcloud"]) == 2
    assert "visual-cube-single demonstrations record 'image'" in capsys.readouterr().err


def test_image_cube_fit_runs_end_to_end_with_the_cube_evaluation(fitted):
    tmp, uri, run_id, _ = fitted
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["policy.context_mode"] == "image_embedding"
    assert run.data.params["policy.image_encoder.name"] == "test_resnet" and "train/loss" in run.data.metrics
    expected = {f"eval/heldout/success_at_k_sigma_{s}_k_{k}" for k in (1, 2) for s in (0, 1)}
    expected |= {"eval/heldout/success_sigma_0", "eval/heldout/success_sigma_1"}
    assert expected <= set(run.data.metrics) and all(0 <= run.data.metrics[m] <= 1 for m in expected)
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert plots == {"plots/input_frames.png", "plots/zero_shot_success_at_k.png"}
    policy = CSPPolicy.load(tmp / "runs" / run_id / "policy.pt")
    assert policy.sensor["output"] == IMAGE and policy.sensor["cameras"] == ["front_pixels"]
    assert policy.sensor["width"] == policy.sensor["height"] == 32
    assert (policy.obs_dim, policy.action_dim, policy.goal_dim) == (19, 5, 3)
    batch = {
        OBS: torch.zeros(2, 19),
        GOAL: torch.zeros(2, 3),
        IMAGE: torch.zeros(2, 1, 32, 32, 3, dtype=torch.uint8),
    }
    assert policy.sample(batch, sigma=0.5, steps=2).shape == (2, 4, 5)


def test_eval_of_an_image_cube_run(fitted, capsys):
    tmp, uri, run_id, _ = fitted
    capsys.readouterr()
    out = tmp / "ev"
    args = [
        "--uri",
        uri,
        "--out",
        str(out),
        "eval.sigmas=[0.5]",
        "eval.rollouts=1",
        "eval.max_episode_steps=4",
    ]
    assert main(["eval", "--from-run", run_id, *args]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "zero-shot cube" in ln]
    assert len(lines) == 1 and "heldout sigma=0.5" in lines[0] and "1 states x 1" in lines[0]
    assert (out / "zero_shot_success_at_k.png").stat().st_size > 0


def test_a_store_with_other_frames_is_refused_before_any_run(fitted, capsys):
    tmp, uri, _, args = fitted
    capsys.readouterr()
    other = ["data.image_size=[24,24]", "demos.cube.width=24", "demos.cube.height=24"]
    assert main(["fit", "--config", TINY, *args, *other]) == 2
    err = capsys.readouterr().err
    assert str(tmp / "cube.zarr") in err and "24" in err and "32x32" in err
    assert len(MlflowClient(uri).search_runs(["1"])) == 1  # refused before a run was opened


def test_finetune_from_an_image_cube_run(fitted, tmp_path, capsys, monkeypatch):
    tmp, uri, parent, _ = fitted
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    args = ["finetune", "--from-run", parent, "--config", TINY_FT, f"output_dir={tmp_path}"]
    assert main(args) == 0
    run_id = capsys.readouterr().out.strip().splitlines()[-1].split("=", 1)[1]
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params["task.env"] == "visual-cube-single" and "eval/success_rate" in run.data.metrics
    ckpt = torch.load(tmp_path / run_id / "checkpoints" / "agent_final.pt", weights_only=True)
    assert ckpt["counters"]["env_steps"] >= 48


def test_the_chunk_env_hands_the_agent_features_never_frames(fitted):
    tmp, _, run_id, _ = fitted
    policy = CSPPolicy.load(tmp / "runs" / run_id / "policy.pt")
    task = TaskConfig(env="visual-cube-single", variation="heldout", max_episode_steps=12)
    env = make_chunk_env(task, 2, policy, "tmrl", exec_horizon=4, seed=0, sensor=policy.sensor)
    try:
        td = env.rollout(2, break_when_any_done=False)
    finally:
        env.backend.close()
    assert td[CONTEXT_FEATURE].shape == (2, 2, policy.feature_dim) and IMAGE not in td.keys(True)
    assert td[OBS].shape == (2, 2, 19) and td[GOAL].shape == (2, 2, 3)
