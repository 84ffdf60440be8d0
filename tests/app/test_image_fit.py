"""Camera frames through both stages at test size: `tmrl fit --config configs/csp_image.yaml` (the visual
maze, a timm backbone, the image-embedding context), `tmrl eval` of its run, `tmrl finetune --from-run` of
it, and the refusals of a store whose frames do not match."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from app.base_run import check_views
from app.cli import main
from app.envs.torchrl_envs import make_chunk_env
from app.tasks.maze.visual_config import VisualMazeFitConfig
from app.tasks.registry import TaskConfig, fit_schema
from modules.nets.keys import CONTEXT_FEATURE, IMAGE, OBS
from modules.nets.policy import CSPPolicy
from tests.tiny import tiny_config

TINY = tiny_config("csp_image")
TINY_FT = tiny_config("tmrl_image")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One tiny camera fit (3 rendered expert episodes of 40 steps, 32x32 frames) in its own store."""
    tmp = tmp_path_factory.mktemp("imgfit")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    args = [f"data.path={tmp / 'maze.zarr'}", f"output_dir={tmp / 'runs'}", f"tracking.uri={uri}",
            f"tracking.artifact_location={tmp / 'artifacts'}"]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TMRL_RUN_ID", raising=False)
        assert main(["fit", "--config", TINY, *args]) == 0
    run = MlflowClient(uri).search_runs(["1"])[0]
    return tmp, uri, run.info.run_id, args


def test_the_image_schema_is_chosen_and_sizes_must_agree(capsys):
    assert fit_schema(TINY) is VisualMazeFitConfig
    assert main(["fit", "--config", TINY, "demos.camera.width=48"]) == 2
    assert "the frame size must agree" in capsys.readouterr().err
    assert main(["fit", "--config", TINY, "policy.image_encoder.views=2"]) == 2
    assert "the number of views must agree" in capsys.readouterr().err
    stacked = ["data.frame_stack=2", "policy.image_encoder.views=2"]
    assert main(["fit", "--config", TINY, *stacked]) == 2  # evaluation renders one frame per camera
    assert "data.frame_stack=2 with eval.enabled" in capsys.readouterr().err


def test_image_fit_runs_end_to_end(fitted):
    tmp, uri, run_id, _ = fitted
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["policy.context_mode"] == "image_embedding"
    assert run.data.params["policy.image_encoder.name"] == "test_resnet"
    assert {"eval/success_sigma_0", "eval/success_sigma_1"} <= set(run.data.metrics)
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"plots/input_frames.png", "plots/zero_shot_success.png", "plots/zero_shot_paths.png"} <= plots
    policy = CSPPolicy.load(tmp / "runs" / run_id / "policy.pt")
    assert policy.sensor["cameras"] == ["top"] and policy.sensor["width"] == 32 and policy.goal_dim == 0
    batch = {OBS: torch.zeros(2, 2), IMAGE: torch.zeros(2, 1, 32, 32, 3, dtype=torch.uint8)}
    assert policy.sample(batch, sigma=0.5, steps=2).shape == (2, 4, 2)


def test_eval_of_an_image_run(fitted, capsys):
    tmp, uri, run_id, _ = fitted
    capsys.readouterr()
    out = tmp / "ev"
    assert main(["eval", "--from-run", run_id, "--uri", uri, "--out", str(out), "eval.sigmas=[0.5]"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "zero-shot" in ln]
    assert len(lines) == 1 and "visual-pointmaze-medium sigma=0.5" in lines[0]
    assert (out / "zero_shot_paths.png").stat().st_size > 0


@pytest.mark.parametrize(
    "override, named",
    [
        (["data.image_size=[24,24]", "demos.camera.width=24", "demos.camera.height=24"], "24"),
        (["demos.camera.cameras=[top,follow]", "data.cameras=2", "policy.image_encoder.views=2"], "2"),
    ],
)
def test_a_store_with_other_frames_is_refused_before_any_run(fitted, capsys, override, named):
    tmp, uri, _, args = fitted
    capsys.readouterr()
    assert main(["fit", "--config", TINY, *args, *override]) == 2
    err = capsys.readouterr().err
    assert str(tmp / "maze.zarr") in err and named in err
    assert len(MlflowClient(uri).search_runs(["1"])) == 1  # refused before a run was opened


def test_finetune_from_an_image_run(fitted, tmp_path, capsys, monkeypatch):
    tmp, uri, parent, _ = fitted
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    args = ["finetune", "--from-run", parent, "--config", TINY_FT, f"output_dir={tmp_path}"]
    assert main(args) == 0
    run_id = capsys.readouterr().out.strip().splitlines()[-1].split("=", 1)[1]
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
    assert (
        run.data.params["task.env"] == "visual-pointmaze-medium" and "eval/success_rate" in run.data.metrics
    )


def test_finetuning_refuses_a_policy_of_stacked_frames(fitted):
    tmp, _, run_id, _ = fitted
    policy = CSPPolicy.load(tmp / "runs" / run_id / "policy.pt")
    check_views(policy, policy.sensor, run_id)  # its own sensor: one camera, one view
    with pytest.raises(ValueError, match=r"reads 1 views .* renders 2 camera\(s\) \['top', 'follow'\]"):
        check_views(policy, {**policy.sensor, "cameras": ["top", "follow"]}, run_id)


def test_the_chunk_env_hands_the_agent_features_never_frames(fitted):
    tmp, _, run_id, _ = fitted
    policy = CSPPolicy.load(tmp / "runs" / run_id / "policy.pt")
    task = TaskConfig(env="visual-pointmaze-medium", task_id=1, max_episode_steps=12)
    env = make_chunk_env(task, 2, policy, "tmrl", exec_horizon=4, seed=0, sensor=policy.sensor)
    try:
        td = env.rollout(2, break_when_any_done=False)
    finally:
        env.backend.close()
    assert td[CONTEXT_FEATURE].shape == (2, 2, policy.feature_dim) and IMAGE not in td.keys(True)
