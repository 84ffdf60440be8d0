"""`tmrl fit ... resume=<run id>`: a fit stopped (or killed) at any moment continues into the same MLflow run
exactly as if it had never stopped: same per-step losses, continuous metric steps."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import defaultdict

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from app.cli import main
from tests.app.test_fit_e2e import ROOT, TINY, tiny_overrides

STEPS = 24  # the tiny data has 21 training batches an epoch; it validates every 3 steps
QUICK = [  # no zero-shot evaluation; a last.ckpt every other step
    "eval.enabled=false",
    "trainer.checkpoint_every_n_steps=2",
]


def fit(tmp_path, capsys, *args: str) -> str:
    """Run a tiny `tmrl fit` in-process; its run id."""
    assert main(["fit", "--config", TINY, *tiny_overrides(tmp_path), *QUICK, *args]) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith("run_id=")
    return last_line.split("=", 1)[1]


def history(uri: str, run_id: str, key: str = "train/loss") -> dict[int, list[float]]:
    """Every value logged under ``key``, by step (a step logged twice has two values)."""
    out = defaultdict(list)
    for m in MlflowClient(uri).get_metric_history(run_id, key):
        out[m.step].append(m.value)
    return dict(out)


def single(values: dict[int, list[float]]) -> dict[int, float]:
    """``values`` with one value a step; fails if a step was logged twice."""
    assert all(len(v) == 1 for v in values.values()), f"steps logged more than once: {values}"
    return {step: v[0] for step, v in values.items()}


def assert_same(got: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(got) == sorted(expected)  # every step once: no gap, no repeat
    np.testing.assert_allclose([got[s] for s in expected], list(expected.values()), rtol=0, atol=1e-5)


def test_same_seed_same_losses_whatever_the_workers_other_seed_other_losses(tmp_path, mlflow_uri, capsys):
    steps = f"trainer.max_steps={STEPS}"
    a = single(history(mlflow_uri, fit(tmp_path, capsys, steps)))
    b = single(history(mlflow_uri, fit(tmp_path, capsys, steps, "data.num_workers=2")))
    c = single(history(mlflow_uri, fit(tmp_path, capsys, steps, "seed=1")))
    assert len(a) == STEPS
    assert_same(b, a)  # the items are functions of (seed, epoch, position), not of the worker processes
    assert a.keys() == c.keys() and all(a[s] != c[s] for s in a)


# 5: checkpoint at a batch's end, mid-epoch; 6: then a validation; 21: the epoch's last batch
@pytest.mark.parametrize("stop", [5, 6, 21])
def test_a_stopped_fit_resumes_into_its_run_with_the_same_losses(tmp_path, mlflow_uri, capsys, stop):
    whole = fit(tmp_path, capsys, f"trainer.max_steps={STEPS}")
    run_id = fit(tmp_path, capsys, f"trainer.max_steps={stop}")
    assert fit(tmp_path, capsys, f"trainer.max_steps={STEPS}", f"resume={run_id}") == run_id

    client = MlflowClient(mlflow_uri)
    assert len(client.search_runs([client.get_run(whole).info.experiment_id])) == 2
    assert client.get_run(run_id).info.status == "FINISHED"
    expected = single(history(mlflow_uri, whole))
    assert sorted(expected) == list(range(STEPS))
    assert_same(single(history(mlflow_uri, run_id)), expected)
    # the EMA (what validates) and the validation schedule went on as in the uninterrupted fit
    val = single(history(mlflow_uri, run_id, "val/loss"))
    assert_same(val, single(history(mlflow_uri, whole, "val/loss")))


def test_resume_refuses_unknown_runs_fine_tuning_runs_and_other_dimensions(tmp_path, mlflow_uri, capsys):
    run_id = fit(tmp_path, capsys, "trainer.max_steps=2")
    client = MlflowClient(mlflow_uri)
    experiment = client.get_run(run_id).info.experiment_id
    other = client.create_run(experiment, tags={"tmrl.stage": "finetune"}).info.run_id
    last = f"{run_id}/checkpoints/last.ckpt"
    cases = [
        (["resume=0123456789abcdef"], ["0123456789abcdef", "neither a checkpoint file nor a run id"]),
        ([f"resume={other}"], [other, "not a CSP pre-training run", "'finetune'"]),
        ([f"resume={run_id}", "policy.width=16"], [last, "policy.width=32 there, 16 here"]),
    ]
    for args, expected in cases:
        assert main(["fit", "--config", TINY, *tiny_overrides(tmp_path), *QUICK, *args]) == 2
        err = capsys.readouterr().err
        assert all(text in err for text in expected), err
    assert len(client.search_runs([experiment])) == 2  # the refused fits created no run
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_killed_fit_resumes_into_its_run_with_the_same_losses(tmp_path, mlflow_uri, capsys):
    args = ["trainer.max_steps=400", "trainer.checkpoint_every_n_steps=25", "trainer.val_check_interval=50"]
    cmd = [
        sys.executable,
        "-m",
        "app.cli",
        "fit",
        "--config",
        TINY,
        *tiny_overrides(tmp_path),
        *QUICK,
        *args,
    ]
    proc = subprocess.Popen([*cmd, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (lasts := list((tmp_path / "runs").glob("*/checkpoints/last.ckpt"))):
            assert proc.poll() is None and time.monotonic() < deadline, "the fit ended before its first save"
            time.sleep(0.2)
        time.sleep(3.0)  # train on past the checkpoint: the resumed fit redoes what was not saved
        assert proc.poll() is None, "the fit ended before it was killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run_id = lasts[0].parent.parent.name
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "RUNNING"
    assert fit(tmp_path, capsys, *args, f"resume={run_id}") == run_id
    expected = single(history(mlflow_uri, fit(tmp_path, capsys, *args)))

    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "FINISHED"
    resumed = history(mlflow_uri, run_id)
    assert sorted(resumed) == sorted(expected)  # the steps logged after the checkpoint come twice
    for step, values in resumed.items():
        np.testing.assert_allclose(values, expected[step], rtol=0, atol=1e-5, err_msg=f"step {step}")


def test_a_checkpoint_is_written_only_once_its_steps_loss_is_in_the_store(
    tmp_path, mlflow_uri, capsys, monkeypatch
):
    """The race a SIGKILL could hit: Lightning logs a step's metrics after its batch-end hooks, where the
    checkpoint is saved, so a fit killed in between resumed without that step's loss."""
    from app.pretrain import LastCheckpoint

    save, seen = LastCheckpoint._save, []

    def checked_save(self, trainer):
        run_id = self.path.parent.parent.name
        logged = history(mlflow_uri, run_id)
        seen.append((trainer.global_step, max(logged, default=-1)))
        return save(self, trainer)

    monkeypatch.setattr(LastCheckpoint, "_save", checked_save)
    run_id = fit(tmp_path, capsys, "trainer.max_steps=7")
    assert [step for step, _ in seen] == [2, 4, 6, 7]
    assert all(last_logged == step - 1 for step, last_logged in seen), seen  # trained through step - 1
    assert sorted(single(history(mlflow_uri, run_id))) == list(range(7))  # and logged once, not twice


def stop_at(monkeypatch, step: int, error: BaseException) -> None:
    """Make the training step raise ``error`` once the fit reaches global step ``step``."""
    from modules.csp import CSPModule

    train = CSPModule.training_step

    def training_step(self, batch, batch_idx):
        if self.global_step == step:
            raise error
        return train(self, batch, batch_idx)

    monkeypatch.setattr(CSPModule, "training_step", training_step)


def test_ctrl_c_saves_the_step_it_stopped_at_and_marks_its_run_killed(
    tmp_path, mlflow_uri, capsys, monkeypatch
):
    args = [f"trainer.max_steps={STEPS}", "trainer.checkpoint_every_n_steps=100"]  # no periodic save before
    with monkeypatch.context() as m:
        stop_at(m, 7, KeyboardInterrupt())
        assert main(["fit", "--config", TINY, *tiny_overrides(tmp_path), *QUICK, *args]) == 130
    err = capsys.readouterr().err
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tmrl").experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "KILLED" and f"resume={run_id}" in err and "interrupted" in err
    assert len(history(mlflow_uri, run_id)) == 7  # steps 0..6 trained, then the interrupt
    assert fit(tmp_path, capsys, *args, f"resume={run_id}") == run_id
    expected = single(history(mlflow_uri, fit(tmp_path, capsys, *args)))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert_same(single(history(mlflow_uri, run_id)), expected)  # it went on from step 7, nothing redone


def test_an_error_in_training_marks_the_run_failed_with_the_error(tmp_path, mlflow_uri, capsys, monkeypatch):
    stop_at(monkeypatch, 3, RuntimeError("the loss went to the moon"))
    with pytest.raises(RuntimeError, match="moon"):
        main(["fit", "--config", TINY, *tiny_overrides(tmp_path), *QUICK, "trainer.max_steps=8"])
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tmrl").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["tmrl.error"] == "RuntimeError: the loss went to the moon"
    assert "error.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_the_run_stays_running_until_its_evaluation_ends(tmp_path, mlflow_uri, capsys, monkeypatch):
    import app.pretrain

    finish, seen = app.pretrain._finish, []

    def recording_finish(cfg, task, client, run_id, *args):
        seen.append(client.get_run(run_id).info.status)  # training is over, the evaluation to come
        return finish(cfg, task, client, run_id, *args)

    monkeypatch.setattr(app.pretrain, "_finish", recording_finish)
    run_id = fit(tmp_path, capsys, "trainer.max_steps=2")
    assert seen == ["RUNNING"] and MlflowClient(mlflow_uri).get_run(run_id).info.status == "FINISHED"


def test_sigterm_saves_and_marks_the_run_killed_then_it_resumes(tmp_path, mlflow_uri, capsys):
    """Pre-emption (SLURM, Kubernetes) sends SIGTERM: the fit saves where it stopped and ends KILLED."""
    args = ["trainer.max_steps=300", "trainer.checkpoint_every_n_steps=1000"]
    args += ["trainer.val_check_interval=1000"]
    cmd = [sys.executable, "-m", "app.cli", "fit", "--config", TINY, *tiny_overrides(tmp_path), *QUICK, *args]
    client = MlflowClient(mlflow_uri)
    client.search_experiments()  # the store exists before the subprocess opens it
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (runs := [r for r in client.search_runs(["0", "1"]) if "train/loss" in r.data.metrics]):
        assert proc.poll() is None and time.monotonic() < deadline, "the fit ended before it trained"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    run_id = runs[0].info.run_id
    assert proc.returncode == 130 and f"resume={run_id}" in err, err
    assert client.get_run(run_id).info.status == "KILLED"
    assert (tmp_path / "runs" / run_id / "checkpoints" / "last.ckpt").is_file()  # saved at the signal
    assert fit(tmp_path, capsys, *args, f"resume={run_id}") == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(single(history(mlflow_uri, run_id))) == list(range(300))  # every step once
