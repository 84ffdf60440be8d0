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
from tensordict.nn import TensorDictModule

import app.finetune
from app.cli import main
from app.config import load_config
from app.envs.torchrl_envs import make_chunk_env
from app.finetune import FinetuneConfig, _worker_env, dead_workers, make_collector, state_keys
from app.tracking import ERROR_TAG
from modules.nets.keys import ACTION
from modules.tmrl.agent import ActorPolicy, head_specs, make_agent
from tests.app import test_finetune

TINY_FT, pretrained, store = test_finetune.TINY_FT, test_finetune.pretrained, test_finetune.store  # fixtures


def faulty_worker_env(index: int, seed: int, fault: str, after: int, only: int | None = None, **kw):
    """The worker's env, whose step after ``after`` steps raises (fault="raise") or SIGKILLs its process;
    ``only``: in that worker alone."""
    env = _worker_env(index, seed, **kw)
    if only is not None and index != only:
        return env
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


@pytest.mark.parametrize(
    ("fault", "code", "collect"),
    [
        ("raise", 1, ["collect.workers=1"]),
        ("kill", -signal.SIGKILL, ["collect.workers=1"]),
        ("kill", -signal.SIGKILL, ["collect.workers=2", "collect.sync=true"]),  # MultiSyncCollector
        # torch.distributed on loopback: the raising process may abort as it exits (gloo threads still run)
        ("raise", f"(?:1|{-signal.SIGABRT})", ["collect.workers=2", "collect.backend=distributed"]),
    ],
    ids=["async-raise", "async-kill", "sync-kill", "distributed-raise"],
)
def test_a_dead_worker_ends_the_run_failed_naming_it(
    store, tmp_path, capsys, monkeypatch, fault, code, collect
):
    uri, parent = store
    # the worker builds it: picklable; worker 0 alone, so that it is the one that dies first
    faulty = functools.partial(faulty_worker_env, fault=fault, after=40, only=0)
    monkeypatch.setattr(app.finetune, "_worker_env", faulty)
    args = ["finetune", "--from-run", parent, "--config", TINY_FT, f"output_dir={tmp_path}",
            *collect, "env_steps=100000"]  # fmt: skip
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


def test_a_distributed_worker_that_dies_between_weight_syncs_does_not_hang_the_learner():
    """TorchRL's async distributed loop waits for a dead worker's batch forever when no weights are sent
    (the warm-up); the watched one raises, naming it."""
    cfg = load_config(
        FinetuneConfig, TINY_FT, ["method=sac", "collect.workers=1", "collect.backend=distributed"]
    )
    env_kw = dict(task=cfg.task, num_envs=2, policy=None, method="sac", exec_horizon=4)
    env = make_chunk_env(seed=0, **env_kw)
    keys = state_keys(env)
    heads = head_specs(env.decoder.sizes, cfg.agent, sigma_max=env.decoder.sigma_max, uses_base=False)
    loss = make_agent(sum(env.observation_spec[k].shape[-1] for k in keys), heads, cfg.agent)
    actor = TensorDictModule(ActorPolicy(loss.actor), in_keys=keys, out_keys=[ACTION])
    faulty = functools.partial(faulty_worker_env, seed=0, fault="raise", after=12, **env_kw)
    collector = make_collector(env, actor, cfg.collect, env_fn=faulty)
    signal.signal(signal.SIGALRM, _hang)
    signal.alarm(60)
    try:
        with pytest.raises(RuntimeError, match="collector worker 0 died"):
            for _ in collector:  # no update_policy_weights_ between the batches
                pass
        assert dead_workers(collector) == [
            f"collector worker 0 (pid {collector.procs[0].pid}) died (exit code 1)"
        ]
    finally:
        signal.alarm(0)
        collector.shutdown()
