"""A tracking server that cannot be reached: refused at once when a run starts; while a run goes on, its
metrics and artifacts wait (``tracking.RunLog``) and arrive when the server is back, or stay on disk."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import app.finetune
from app import tracking
from app.cli import main
from tests.app import test_finetune
from tests.tiny import tiny_config

TINY_FT, pretrained, store = test_finetune.TINY_FT, test_finetune.pretrained, test_finetune.store  # fixtures
TINY_FIT = tiny_config("csp_state")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_server_is_refused_at_once_and_nothing_is_written(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    args = [
        "finetune",
        "--from-run",
        "r1",
        "--config",
        TINY_FT,
        f"tracking.uri={uri}",
        f"output_dir={tmp_path}",
    ]
    assert main(args) == 2
    assert time.monotonic() - start < 10  # MLflow's own retries take about 4 minutes
    err = capsys.readouterr().err
    assert f"tracking server {uri} is not reachable (ConnectionRefusedError" in err and "tmrl ui" in err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="is not reachable"):  # where `tmrl fit` starts its run
        tracking.start_run(tracking.TrackingConfig(uri=uri), stage="pretrain")
    fit = ["fit", "--config", TINY_FIT, f"tracking.uri={uri}", f"data.path={tmp_path / 'demos.zarr'}"]
    assert main([*fit, f"output_dir={tmp_path / 'runs'}"]) == 2  # before its demos are generated
    assert "is not reachable" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def down(url: str = "http://127.0.0.1:1/api/2.0/mlflow/runs/log-batch") -> MlflowException:
    """What MLflow's REST client raises when the server is gone: a MlflowException over a ConnectionError."""
    try:
        raise requests.ConnectionError("Connection refused")
    except requests.ConnectionError as err:
        try:
            raise MlflowException(f"API request to {url} failed with exception {err}")
        except MlflowException as wrapped:
            return wrapped


class FlakyClient:
    """A tracking client that is down while ``up`` is False, recording what reaches it."""

    def __init__(self):
        self.up, self.calls, self.batches, self.files = True, 0, [], []

    def _request(self):
        self.calls += 1
        if not self.up:
            raise down()

    def log_batch(self, run_id, metrics=(), **_):
        self._request()
        self.batches.append([(m.key, m.value, m.step, m.timestamp) for m in metrics])

    def log_artifact(self, run_id, path, artifact_path=None):
        self._request()
        self.files.append((path, artifact_path))


def test_metrics_wait_for_the_server_and_arrive_in_order(tmp_path):
    client = FlakyClient()
    log = tracking.RunLog(client, "r1", tmp_path, retry_s=0.0)
    log.log_metrics({"a": 1}, step=10)
    client.up = False
    log.log_metrics({"a": 2}, step=20)
    log.log_artifact(tmp_path / "ckpt.pt", "checkpoints")
    log.log_metrics({"a": 3}, step=30)
    log.log_artifact(tmp_path / "ckpt.pt", "checkpoints")  # rewritten in place: uploaded once
    assert [b[0][2] for b in client.batches] == [10] and len(log.pending) == 3
    client.up = True
    log.log_metrics({"a": 4}, step=40)
    assert [b[0][:3] for b in client.batches] == [
        ("a", v, s) for v, s in ((1, 10), (2, 20), (3, 30), (4, 40))
    ]
    assert client.files == [(str(tmp_path / "ckpt.pt"), "checkpoints")]
    stamps = [b[0][3] for b in client.batches]
    assert stamps == sorted(stamps)  # each point keeps the time it was logged at, not the time it arrived
    assert log.close() and not (tmp_path / "undelivered_metrics.jsonl").exists()


def test_a_dead_server_is_tried_again_only_after_a_pause(tmp_path):
    client = FlakyClient()
    client.up = False
    log = tracking.RunLog(client, "r1", tmp_path, retry_s=60.0)
    for step in range(5):
        log.log_metrics({"a": step}, step=step)
    assert client.calls == 1 and len(log.pending) == 5  # one failed request, then none for 60 s


def test_a_request_the_store_refuses_is_raised_not_kept(tmp_path):
    client = FlakyClient()
    client.log_batch = lambda *a, **k: (_ for _ in ()).throw(
        MlflowException("bad value", "INVALID_PARAMETER_VALUE")
    )
    with pytest.raises(MlflowException, match="bad value"):
        tracking.RunLog(client, "r1", tmp_path).log_metrics({"a": 1}, step=0)


def test_what_never_arrives_stays_on_disk_and_the_warning_says_where(tmp_path, capsys):
    client = FlakyClient()
    client.up = False
    log = tracking.RunLog(client, "r1", tmp_path / "r1")
    log.log_metrics({"a": 1.5, "b": 2}, step=7)
    log.log_artifact(tmp_path / "agent_final.pt", "checkpoints")
    assert not log.close()
    dump = tmp_path / "r1" / "undelivered_metrics.jsonl"
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [(d["step"], d["metrics"]) for d in lines] == [(7, {"a": 1.5, "b": 2.0})]
    err = capsys.readouterr().err
    assert (
        "1 undelivered metric batches" in err and str(dump) in err and str(tmp_path / "agent_final.pt") in err
    )


def test_a_dead_server_does_not_stall_the_end_of_a_run(capsys):
    client = MlflowClient(f"http://127.0.0.1:{free_port()}")
    start = time.monotonic()
    tracking.end_run(client, "r1", ok=False, error=RuntimeError("boom"))
    assert time.monotonic() - start < 10  # no retries: MLflow's default backoff takes minutes
    assert "could not mark run r1 FAILED" in capsys.readouterr().err


class MlflowServer:
    """A real `mlflow server` on a sqlite store, in its own process group (it starts several workers)."""

    def __init__(self, db, port: int):
        self.db, self.port, self.proc = db, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.db}",
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("mlflow server did not start within 60 s")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.mark.slow
def test_finetuning_goes_on_while_the_server_is_away_and_its_metrics_arrive(
    pretrained, tmp_path, monkeypatch
):
    tmp, parent = pretrained
    db = tmp_path / "mlflow.db"
    db.write_bytes((tmp / "mlflow.db").read_bytes())  # artifact locations are absolute: the copy finds them
    server = MlflowServer(db, free_port())
    server.start()
    logged: list[int] = []  # steps of the batches logged
    expected: list[int] = []  # those holding train/successes

    class OutageLog(tracking.RunLog):
        """Stops the server after the 2nd batch of metrics and starts it again after the 5th."""

        def log_metrics(self, metrics, step):
            logged.append(step)
            expected.extend([step] if "train/successes" in metrics else [])
            super().log_metrics(metrics, step)
            if len(logged) == 2:
                server.stop()
            elif len(logged) == 5:
                assert len(self.pending) == 3  # held while the server was away
                server.start()

    monkeypatch.setattr(app.finetune.tracking, "RunLog", lambda *a: OutageLog(*a, retry_s=0.0))
    try:
        args = ["finetune", "--from-run", parent, "--config", TINY_FT, f"tracking.uri={server.uri}",
                f"output_dir={tmp_path / 'runs'}"]  # fmt: skip
        assert main(args) == 0
        run = MlflowClient(server.uri).search_runs(["1"], f"tags.`mlflow.parentRunId` = '{parent}'")[0]
        history = MlflowClient(server.uri).get_metric_history(run.info.run_id, "train/successes")
    finally:
        server.stop()
    assert run.info.status == "FINISHED" and sorted(m.step for m in history) == expected


def test_lightnings_metrics_wait_for_a_lost_store_through_the_logger_client(tmp_path, mlflow_uri):
    """`tmrl fit` hands Lightning's MLFlowLogger a LoggerClient: its metrics wait while the store is away,
    and the run's status is left to end_run."""
    from lightning.pytorch.loggers import MLFlowLogger

    real = MlflowClient(mlflow_uri)
    run_id = real.create_run(real.create_experiment("e")).info.run_id

    class Flaky:  # the real store, whose log_batch fails while ``up`` is False
        up = True

        def log_batch(self, *args, **kw):
            if not self.up:
                raise down()
            return real.log_batch(*args, **kw)

        def __getattr__(self, name):
            return getattr(real, name)

    flaky = Flaky()
    log = tracking.RunLog(flaky, run_id, tmp_path, retry_s=0.0)
    logger = MLFlowLogger("e", tracking_uri=mlflow_uri, run_id=run_id)
    logger._mlflow_client = tracking.LoggerClient(flaky, log)
    logger.log_metrics({"train/loss": 1.0}, step=0)
    flaky.up = False
    logger.log_metrics({"train/loss": 0.5}, step=1)  # kept: training goes on
    logger.finalize("success")
    assert [m.step for m in real.get_metric_history(run_id, "train/loss")] == [0]
    assert real.get_run(run_id).info.status == "RUNNING"  # end_run, not the logger, ends the run
    flaky.up = True
    assert log.close()
    history = real.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 0.5)]
