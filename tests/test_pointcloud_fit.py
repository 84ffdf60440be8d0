"""`tmrl fit` with a point-cloud context, end to end at test size, and its refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from app.cli import main
from app.config import load_config
from app.schema import FitConfig, PointCloudFitConfig, fit_schema
from modules.nets.policy import CSPPolicy

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "csp_pointcloud.yaml")


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
    assert policy.cloud_norm.is_set  # the data's cloud centre and scale travel with the policy
    batch = {"observation": torch.zeros(2, policy.obs_dim), "goal": torch.zeros(2, 3),
             "pointcloud": torch.zeros(2, 32, 3)}  # fmt: skip
    assert policy.sample(batch, sigma=0.0, steps=2).shape == (2, 4, 5)


def test_a_store_with_another_point_count_is_refused(fitted, capsys):
    tmp, uri, _, args = fitted
    n = ["data.num_points=16"]  # the policy and the generator follow data.num_points
    assert main(["fit", "--config", TINY, *args, *n]) == 2
    err = capsys.readouterr().err
    assert str(tmp / "cube.zarr") in err and "num_points" in err and "32" in err and "16" in err
    assert len(MlflowClient(uri).search_runs(["1"])) == 1  # refused before a run was opened
