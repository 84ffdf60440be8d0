"""Multi-process pre-training through a Lightning strategy (CPU DDP with gloo): one MLflow run only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cpu_ddp_fit_logs_into_one_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("TMRL_RUN_ID", None)
    tiny = tiny_config("csp_state")
    cmd = [
        str(Path(sys.executable).parent / "tmrl"), "fit", "--config", tiny,
        f"data.path={tmp_path / 'demos.zarr'}", f"output_dir={tmp_path / 'runs'}",
        f"tracking.artifact_location={tmp_path / 'artifacts'}",
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "eval.enabled=false",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = proc.stdout.strip().splitlines()[-1].split("=", 1)[1]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tmrl").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # the second rank made no run of its own
    assert runs[0].info.status == "FINISHED" and "train/loss" in runs[0].data.metrics
