"""A collector worker that dies (its env raises, or it is SIGKILLed) ends the run within seconds, FAILED,
with a message naming the worker and the checkpoint to continue from, never a hang."""

from __future__ import annotations

import functools
import os
import re
import signal
import time

import pytest
from mlflow.tracking import MlflowClient

import app.finetune
from app.cli import main
from app.finetune import _worker_env
from app.tracking import ERROR_TAG
from tests.app import test_finetune

TINY_FT, pretrained, store = test_finetune.TINY_FT, test_finetune.pretrained, test_finetune.store  # fixtures


def faulty_worker_env(index: int, seed: int, fault: str, after: int, **kw):
    """The worker's env, whose step after ``after`` steps raises (fault="raise") or SIGKILLs its process."""
    env = _worker_env(index, seed, **kw)
    step, count = env._step, [0]

    def _step(td):
        count[0] += 1
        if count[0] > after:
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("injected env fault")
        return step(td)

    env._step = _step
    return env


def _hang(*_):
    raise TimeoutError("the run did not end within 120 s of its worker's death")


@pytest.mark.parametrize(("fault", "code"), [("raise", 1), ("kill", -signal.SIGKILL)])
def test_a_dead_worker_ends_the_run_failed_naming_it(store, tmp_path, capsys, monkeypatch, fault, code):
    uri, parent = store
    faulty = functools.partial(faulty_worker_env, fault=fault, after=40)  # the worker builds it: picklable
    monkeypatch.setattr(app.finetune, "_worker_env", faulty)
    args = ["finetune", "--from-run", parent, "--config", TINY_FT, f"output_dir={tmp_path}",
            "collect.workers=1", "env_steps=100000"]  # fmt: skip
    signal.signal(signal.SIGALRM, _hang)
    signal.alarm(120)  # a hang fails the test instead of the suite (no pytest-timeout here)
    start = time.monotonic()
    try:
        assert main(args) == 1
    finally:
        signal.alarm(0)
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err.strip().splitlines()[-1]
    match = re.search(rf"collector worker 0 \(pid \d+\) died \(exit code {code}\)", err)
    assert match, err
    run = MlflowClient(uri).search_runs(["1"], f"tags.`mlflow.parentRunId` = '{parent}'")[0]
    assert run.info.status == "FAILED" and match.group(0) in run.data.tags[ERROR_TAG]
    run_id = run.info.run_id
    assert f"last checkpoint is {tmp_path / run_id / 'checkpoints' / 'agent_last.pt'}" in err
    assert f"--from-run {parent} resume={run_id}" in err
    assert (tmp_path / run_id / "checkpoints" / "agent_last.pt").is_file()
    assert elapsed < 60, f"took {elapsed:.0f} s"  # a hang, not a speed figure (about 5 s here)
