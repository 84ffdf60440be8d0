"""The team set-up end to end: `deploy/tracking-server.sh` starts a real PostgreSQL + MLflow server on
loopback; a 2-process CPU DDP pre-training and a fine-tuning run with 2 collector workers log into it; the
runs, their nesting and their checkpoints come back through ``MlflowClient``; the servers stop.

Skipped where PostgreSQL's server or the psycopg2 driver is missing, unless ``TMRL_REQUIRE_SERVER=1``
(``.ci/run`` installs both and sets it, so CI never skips it).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "tracking-server.sh"
BIN = Path(sys.executable).parent


def _missing() -> str | None:
    if not (shutil.which("initdb") or glob.glob("/usr/lib/postgresql/*/bin/initdb")):
        return "PostgreSQL's server is not installed (apt-get install postgresql)"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "the psycopg2 driver is not installed (pip install -e '.[server]')"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """(tracking URI, env, state dir) of a private PostgreSQL + MLflow server, stopped after the module."""
    if (why := _missing()) is not None:
        if os.environ.get("TMRL_REQUIRE_SERVER") == "1":
            pytest.fail(f"TMRL_REQUIRE_SERVER=1 but {why}")
        pytest.skip(why)
    # not under pytest's private tmp folder: as root, the script runs PostgreSQL as the postgres user
    state = Path(tempfile.mkdtemp(prefix="tmrl-server-"))
    state.chmod(0o755)
    port = _free_port()
    env = {**os.environ, "STATE": str(state), "PORT": str(port), "PGPORT": str(_free_port())}
    env |= {"PATH": f"{BIN}:{os.environ['PATH']}", "WORKERS": "1"}
    env.pop("TMRL_RUN_ID", None)
    env.pop("MLFLOW_TRACKING_URI", None)

    def script(cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(SCRIPT), cmd], env=env, capture_output=True, text=True, timeout=180)

    started = script("start")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        uri = f"http://127.0.0.1:{port}"
        assert f"MLFLOW_TRACKING_URI={uri}" in started.stdout
        yield uri, {**env, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}, state
    finally:
        pid = (state / "mlflow.pid").read_text().strip() if (state / "mlflow.pid").exists() else None
        stopped = script("stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        if pid is not None:  # the server and every worker of its process group are gone
            assert not Path(f"/proc/{pid}").exists()
        assert script("status").returncode != 0
        shutil.rmtree(state, ignore_errors=True)


def _tmrl(env: dict, cwd: Path, *args: str) -> str:
    proc = subprocess.run(
        [str(BIN / "tmrl"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1].split("=", 1)[1]  # the last line is run_id=<id>


def test_ddp_fit_and_worker_finetune_log_into_the_postgres_server(server, tmp_path):
    uri, env, state = server
    fit_id = _tmrl(
        env, tmp_path, "fit", "--config", tiny_config("csp_state"), f"data.path={tmp_path / 'demos.zarr'}",
        f"output_dir={tmp_path / 'fit'}", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.strategy=ddp", "eval.enabled=false",
    )  # fmt: skip
    ft_id = _tmrl(
        env, tmp_path, "finetune", "--from-run", fit_id, "--config", tiny_config("tmrl"),
        f"output_dir={tmp_path / 'ft'}", "collect.workers=2", "env_steps=256",
    )  # fmt: skip

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tmrl")
    runs = client.search_runs([exp.experiment_id])
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.data.tags.get("tmrl.stage"), []).append(run.info.run_id)
    assert by_stage == {"pretrain": [fit_id], "finetune": [ft_id]}  # the DDP rank 1 made no run of its own
    fit, ft = client.get_run(fit_id), client.get_run(ft_id)
    assert fit.info.status == ft.info.status == "FINISHED"
    assert ft.data.tags["mlflow.parentRunId"] == fit_id and ft.data.tags["tmrl.pretrain_run_id"] == fit_id
    assert ft.data.params["collect.workers"] == "2"
    assert "train/loss" in fit.data.metrics and "eval/success_rate" in ft.data.metrics
    # the experiment's artifacts live in the server's store, proxied to clients
    assert exp.artifact_location.startswith("mlflow-artifacts:")
    stored = {p.name for p in (state / "artifacts").rglob("*.pt")}
    assert {"policy.pt", "agent_final.pt"} <= stored

    # the checkpoints come back through the server, whole
    got = tmp_path / "download"
    policy = client.download_artifacts(fit_id, "checkpoints/policy.pt", str(got))
    agent = client.download_artifacts(ft_id, "checkpoints/agent_final.pt", str(got))
    assert torch.load(policy, map_location="cpu", weights_only=False)
    assert torch.load(agent, map_location="cpu", weights_only=False)["counters"]["env_steps"] >= 256

    # and the runs are rows of the PostgreSQL database, not of some other store
    psql = [
        "psql", "-h", str(state / "sockets"), "-p", env["PGPORT"], "-U", "mlflow", "-d", "mlflow", "-qtA",
        "-c", "SELECT run_uuid FROM runs ORDER BY start_time",
    ]  # fmt: skip
    rows = subprocess.run(psql, capture_output=True, text=True, check=True, timeout=30).stdout.split()
    assert rows == [fit_id, ft_id]
