"""How a run ends in MLflow: its status, the error it ended with, and a tracking store that fails then."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from app import tracking


def test_a_failed_run_records_its_error_and_a_killed_one_does_not(mlflow_uri, tmp_path):
    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "a"))
    failed, killed, done = (client.create_run(exp).info.run_id for _ in range(3))
    try:
        raise ValueError("bad " + "y" * 600)
    except ValueError as err:
        tracking.end_run(client, failed, ok=False, error=err)
    tracking.end_run(client, killed, ok=False, error=KeyboardInterrupt())
    tracking.end_run(client, done, ok=True)
    run = client.get_run(failed)
    assert (
        run.info.status == "FAILED"
        and run.data.tags[tracking.ERROR_TAG] == ("ValueError: bad " + "y" * 600)[:500]
    )
    text = (tmp_path / "a" / failed / "artifacts" / "error.txt").read_text()
    assert text.startswith("Traceback") and "test_tracking.py" in text
    assert (
        client.get_run(killed).info.status == "KILLED"
        and tracking.ERROR_TAG not in client.get_run(killed).data.tags
    )
    assert client.get_run(done).info.status == "FINISHED"


def test_a_failing_store_does_not_mask_the_error(capsys):
    class DownStore:
        def __getattr__(self, name):
            def fail(*args, **kwargs):
                raise ConnectionError("tracking server unreachable")

            return fail

    tracking.end_run(DownStore(), "r1", ok=False, error=RuntimeError("the run's own error"))
    err = capsys.readouterr().err
    assert "could not mark run r1 FAILED" in err and "ConnectionError: tracking server unreachable" in err
