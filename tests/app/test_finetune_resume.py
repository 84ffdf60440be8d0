"""A fine-tuning run survives its end: SIGKILL, Ctrl-C and errors leave a run that resumes (or says why
not), its checkpoints are swapped in whole, and its status in MLflow tells what happened."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from tensordict import TensorDict

from app.cli import main
from app.finetune import FinetuneConfig, make_buffer
from app.finetune_state import LoopState, load_replay, read_agent, restore, resume_seed, save_checkpoint
from tests.app import test_finetune as base

ROOT = Path(__file__).resolve().parents[2]
pretrained, store = base.pretrained, base.store  # one tiny pre-training run in a module-wide sqlite store
BATCH_STEPS = 4 * 2 * 4  # env steps of one collector batch at most: num_envs x chunks_per_batch x H_exec
RESUMED = re.compile(r"resumed from (\S+) at (\d+) env steps, replay buffer of (\d+) chunks")


def args_for(parent: str, tmp_path: Path, *overrides: str) -> list[str]:
    return ["finetune", "--from-run", parent, "--config", base.TINY_FT, f"output_dir={tmp_path}", *overrides]


def run_named(uri: str, name: str):
    (run,) = MlflowClient(uri).search_runs(
        [e.experiment_id for e in MlflowClient(uri).search_experiments()], f"attributes.run_name = '{name}'"
    )
    return run


def fail_on_update(monkeypatch, n: int, error: BaseException) -> None:
    """Make the ``n``-th gradient update of the loop raise ``error``."""
    import app.finetune

    calls, update = [], app.finetune.update

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            raise error
        return update(*a, **kw)

    monkeypatch.setattr(app.finetune, "update", failing)


def test_a_killed_run_resumes_where_its_checkpoint_left_it(store, tmp_path, capsys):
    """SIGKILL of the real CLI right after a checkpoint, then resume=<run_id>: the same run goes on from the
    checkpoint's counters and replay buffer to the budget and ends FINISHED."""
    uri, parent = store
    over = ["checkpoint_every_env_steps=64", "eval.every_env_steps=96"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "app.cli",
        *args_for(parent, tmp_path, *over, "env_steps=100000", "tracking.run_name=k"),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("*/checkpoints/agent_last.pt")):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    run_id = run_named(uri, "k").info.run_id
    assert MlflowClient(uri).get_run(run_id).info.status == "RUNNING"  # nothing ran to mark it
    saved = read_agent(tmp_path / run_id / "checkpoints" / "agent_last.pt")
    at = saved["counters"]["env_steps"]
    assert at >= 64 and saved["replay_size"] > 0

    resumed_at_ms = int(time.time() * 1000)
    budget = at + 192
    assert main(args_for(parent, tmp_path, *over, f"env_steps={budget}", f"resume={run_id}")) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == f"run_id={run_id}"
    path, steps, size = RESUMED.search(out).groups()
    assert path.endswith("agent_last.pt") and int(steps) == at and int(size) == saved["replay_size"]

    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    final = read_agent(tmp_path / run_id / "checkpoints" / "agent_final.pt")["counters"]
    assert budget <= final["env_steps"] < budget + BATCH_STEPS
    assert final["updates"] > saved["counters"]["updates"] and final["chunks"] > saved["counters"]["chunks"]
    # logged every batch, and at every evaluation (eval.every_env_steps=96)
    for key, gap in (("train/successes", BATCH_STEPS), ("eval/success_rate", 96 + BATCH_STEPS)):
        history = client.get_metric_history(run_id, key)
        assert any(m.step <= at for m in history)  # the killed process's points stay
        # what the killed process logged after its checkpoint stays too (MLflow deletes no points), so the
        # resumed points are told apart by time: they go on from the checkpoint, never from 0
        later = sorted((m for m in history if m.timestamp >= resumed_at_ms), key=lambda m: m.timestamp)
        steps = [m.step for m in later]
        assert steps and at < steps[0] <= at + gap and steps == sorted(set(steps))
        assert steps[-1] == final["env_steps"]
    successes = client.get_metric_history(run_id, "train/successes")
    first = min((m for m in successes if m.timestamp >= resumed_at_ms), key=lambda m: m.timestamp)
    assert first.value >= saved["counters"]["successes"]  # the count goes on


def test_an_error_in_the_loop_fails_the_run_and_records_it(store, tmp_path, monkeypatch):
    uri, parent = store
    fail_on_update(monkeypatch, 3, RuntimeError("update exploded " + "x" * 1000))
    with pytest.raises(RuntimeError, match="update exploded"):
        main(args_for(parent, tmp_path, "tracking.run_name=err"))
    run = run_named(uri, "err")
    assert run.info.status == "FAILED"
    tag = run.data.tags["tmrl.error"]
    assert tag.startswith("RuntimeError: update exploded xxx") and len(tag) == 500
    text = Path(MlflowClient(uri).download_artifacts(run.info.run_id, "error.txt", str(tmp_path))).read_text()
    assert "Traceback" in text and "in failing" in text and text.rstrip().endswith("x" * 20)


def test_ctrl_c_saves_a_checkpoint_kills_the_run_and_it_resumes(store, tmp_path, capsys):
    uri, parent = store
    with pytest.MonkeyPatch.context() as mp:
        fail_on_update(mp, 40, KeyboardInterrupt())
        assert main(args_for(parent, tmp_path, "tracking.run_name=ctrl-c")) == 130
    out = capsys.readouterr().out
    run_id = run_named(uri, "ctrl-c").info.run_id
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"
    assert f"tmrl finetune --from-run {parent} resume={run_id}" in out
    saved = read_agent(tmp_path / run_id / "checkpoints" / "agent_last.pt")
    assert saved["counters"]["updates"] == 39  # the state at the interrupt, not the last periodic save
    assert "tmrl.error" not in MlflowClient(uri).get_run(run_id).data.tags

    assert main(args_for(parent, tmp_path, f"resume={run_id}")) == 0
    path, steps, size = RESUMED.search(capsys.readouterr().out).groups()
    assert int(steps) == saved["counters"]["env_steps"] and int(size) == saved["replay_size"]
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"


def test_leftovers_of_a_torn_save_do_not_break_a_resume(store, tmp_path, capsys):
    uri, parent = store
    assert main(args_for(parent, tmp_path, "env_steps=200")) == 0
    run_id = capsys.readouterr().out.strip().splitlines()[-1].split("=", 1)[1]
    ckpts, replay = tmp_path / run_id / "checkpoints", tmp_path / run_id / "replay"
    (ckpts / "agent_last.pt.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / run_id / "replay.tmp-123").mkdir()
    (tmp_path / run_id / "replay.tmp-123" / "storage").write_bytes(b"half a dump")
    size = read_agent(ckpts / "agent_final.pt")["replay_size"]
    assert main(args_for(parent, tmp_path, "env_steps=450", f"resume={run_id}")) == 0  # saves at 400
    assert int(RESUMED.search(capsys.readouterr().out).group(3)) == size
    assert sorted(p.name for p in replay.parent.glob("replay*")) == ["replay"]  # the leftovers are gone
    assert not (ckpts / "agent_last.pt.tmp").exists()

    # killed between the two swaps: the dump is gone, the agent file is there
    shutil.rmtree(replay)
    assert main(args_for(parent, tmp_path, "env_steps=500", f"resume={run_id}")) == 0
    out = capsys.readouterr().out
    assert f"no replay buffer at {replay}: continuing with an empty one" in out
    assert int(RESUMED.search(out).group(3)) == 0
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"


def test_a_replay_dump_of_another_size_is_not_loaded(tmp_path, capsys):
    buffer = make_buffer(FinetuneConfig().collect, 4, tmp_path)
    buffer.extend(TensorDict({"x": torch.arange(10.0)}, [10]))
    buffer.dumps(tmp_path / "replay")
    load_replay(buffer, tmp_path / "replay", 10)
    assert len(buffer) == 10
    load_replay(buffer, tmp_path / "replay", 7)
    assert len(buffer) == 0
    assert f"the replay buffer at {tmp_path / 'replay'} holds 10 chunks" in capsys.readouterr().out


def test_an_agent_checkpoint_of_other_dimensions_is_refused(store, tmp_path, capsys):
    uri, parent = store
    assert main(args_for(parent, tmp_path, "env_steps=100")) == 0
    run_id = capsys.readouterr().out.strip().splitlines()[-1].split("=", 1)[1]
    path = tmp_path / run_id / "checkpoints" / "agent_final.pt"
    assert main(args_for(parent, tmp_path, "agent.hidden=48", f"resume={run_id}")) == 2
    err = capsys.readouterr().err
    assert f"{path} holds an agent of other dimensions" in err and "(48, " in err and "(32, " in err
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"  # a refused resume changes nothing

    old = {k: v for k, v in torch.load(path, weights_only=True).items() if k in ("loss", "counters")}
    torch.save(old, path)  # the format before versions
    assert main(args_for(parent, tmp_path, f"resume={run_id}")) == 2
    assert f"{path} is agent checkpoint version 1" in capsys.readouterr().err


def test_a_checkpoint_round_trips_what_the_loop_goes_on_with(tmp_path):
    """Weights, optimizer moments, counters, UTD debt, sigma history and both global RNGs come back; each
    file is swapped in whole (no temporary is left)."""
    net, buffer = torch.nn.Linear(3, 2), make_buffer(FinetuneConfig().collect, 4, tmp_path)
    opt = {"actor": torch.optim.Adam(net.parameters())}
    net(torch.ones(3)).sum().backward()
    opt["actor"].step()
    buffer.extend(TensorDict({"x": torch.arange(5.0)}, [5]))
    state = LoopState({"env_steps": 96, "chunks": 24, "updates": 7, "successes": 1}, 0.5, [(64, [0.1, 0.2])])
    path, replay = tmp_path / "checkpoints" / "agent_last.pt", tmp_path / "replay"
    save_checkpoint(path, replay, net, opt, buffer, state)
    expected = torch.rand(3), np.random.rand(3)
    assert sorted(p.name for p in tmp_path.rglob("*tmp*")) == []

    net2, buffer2 = torch.nn.Linear(3, 2), make_buffer(FinetuneConfig().collect, 4, tmp_path)
    opt2 = {"actor": torch.optim.Adam(net2.parameters())}
    ckpt = read_agent(path)
    assert ckpt["replay_size"] == 5
    back = restore(path, ckpt, net2, opt2, buffer2, replay)
    assert back == state and torch.equal(net2.weight, net.weight)
    assert torch.equal(
        opt2["actor"].state_dict()["state"][0]["exp_avg"], opt["actor"].state[net.weight]["exp_avg"]
    )
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert len(buffer2) == 5
    assert resume_seed(0, 96) != resume_seed(0, 192) and resume_seed(0, 96) == resume_seed(0, 96)


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    net, buffer = torch.nn.Linear(3, 2), make_buffer(FinetuneConfig().collect, 4, tmp_path)
    opt = {"actor": torch.optim.Adam(net.parameters())}
    path, replay = tmp_path / "checkpoints" / "agent_last.pt", tmp_path / "replay"
    buffer.extend(TensorDict({"x": torch.arange(5.0)}, [5]))
    save_checkpoint(path, replay, net, opt, buffer, LoopState())
    buffer.extend(TensorDict({"x": torch.arange(3.0)}, [3]))

    def dies_midway(self, where):
        Path(where).mkdir()
        (Path(where) / "storage").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(type(buffer), "dumps", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, replay, net, opt, buffer, LoopState({**LoopState().counters, "env_steps": 64}))
    monkeypatch.undo()
    ckpt = read_agent(path)
    assert ckpt["counters"]["env_steps"] == 0 and ckpt["replay_size"] == 5
    fresh = make_buffer(FinetuneConfig().collect, 4, tmp_path)
    load_replay(fresh, replay, ckpt["replay_size"])
    assert len(fresh) == 5


def test_the_replay_buffer_holds_what_the_run_can_collect_not_a_million_chunks(tmp_path):
    """Allocated whole at the first write, a 1M-chunk storage of point-cloud chunks was OOM-killed; a run
    never collects more chunks than env steps (each chunk takes one at least), plus the last batch."""
    from app.finetune import buffer_capacity

    cfg = FinetuneConfig().collect  # num_envs x chunks_per_batch chunks per worker batch
    batch = cfg.num_envs * cfg.chunks_per_batch * max(1, cfg.workers)
    assert buffer_capacity(cfg, 20_000) == 20_000 + batch
    assert buffer_capacity(cfg, 10**9) == cfg.buffer_size  # the configured size stays the ceiling
    buffer = make_buffer(cfg, 4, tmp_path, env_steps=100)
    assert buffer._storage.max_size == 100 + batch
    assert make_buffer(cfg, 4, tmp_path)._storage.max_size == cfg.buffer_size


def test_sigterm_saves_a_checkpoint_and_kills_the_run(store, tmp_path):
    """Pre-emption sends SIGTERM: the CLI ends as on Ctrl-C, a resumable checkpoint saved, the run KILLED."""
    uri, parent = store
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    over = ["checkpoint_every_env_steps=64", "env_steps=100000", "tracking.run_name=term"]
    cmd = [sys.executable, "-m", "app.cli", *args_for(parent, tmp_path, *over)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("*/checkpoints/agent_last.pt")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    run = run_named(uri, "term")
    assert proc.returncode == 130 and f"resume={run.info.run_id}" in out, out[-2000:]
    assert run.info.status == "KILLED"
    assert (
        read_agent(tmp_path / run.info.run_id / "checkpoints" / "agent_last.pt")["counters"]["env_steps"] > 0
    )


def _session_pids(sid: int) -> list[int]:
    """The live processes of session ``sid`` (from /proc), zombies excluded."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state, ppid, pgrp, session, ...
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("backend", ["local", "distributed"])
def test_ctrl_c_with_a_collector_worker_saves_kills_the_run_and_leaves_no_process(store, tmp_path, backend):
    """Ctrl-C in a terminal sends SIGINT to the whole foreground group, the collector worker included: the
    learner still saves a resumable checkpoint and marks the run KILLED, and no worker outlives it."""
    uri, parent = store
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    over = [
        "checkpoint_every_env_steps=64",
        "env_steps=100000",
        "collect.workers=1",
        f"collect.backend={backend}",
        f"tracking.run_name=ctrlc-{backend}",
    ]
    cmd = [sys.executable, "-m", "app.cli", *args_for(parent, tmp_path, *over)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not list(tmp_path.glob("*/checkpoints/agent_last.pt")):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.05)
        assert len(_session_pids(proc.pid)) >= 2  # the learner and its collector worker
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out[-3000:]
    run = run_named(uri, f"ctrlc-{backend}")
    assert f"resume={run.info.run_id}" in out, out[-2000:]
    assert run.info.status == "KILLED"
    saved = read_agent(tmp_path / run.info.run_id / "checkpoints" / "agent_last.pt")
    assert saved["counters"]["env_steps"] > 0 and saved["replay_size"] > 0
    deadline = time.monotonic() + 10
    while _session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _session_pids(proc.pid) == [], "a collector worker outlived the learner"


def test_a_nan_update_stops_the_run_and_keeps_the_last_checkpoint(store, tmp_path, monkeypatch, capsys):
    import app.finetune

    uri, parent = store
    update, calls = app.finetune.update, []

    def diverging(*a, **kw):
        calls.append(1)
        out = update(*a, **kw)
        if len(calls) >= 30:
            out["loss_qvalue"] = torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(app.finetune, "update", diverging)
    assert main(args_for(parent, tmp_path, "checkpoint_every_env_steps=32", "tracking.run_name=nan")) == 2
    assert "fine-tuning diverged at update" in capsys.readouterr().err
    run = run_named(uri, "nan")
    assert run.info.status == "FAILED" and run.data.tags["tmrl.error"].startswith("ValueError: fine-tuning")
    saved = read_agent(tmp_path / run.info.run_id / "checkpoints" / "agent_last.pt")
    assert 0 < saved["counters"]["updates"] < 30  # the last save came before the NaN


def test_an_unwritable_output_dir_is_refused_before_any_run(store, tmp_path, capsys):
    uri, parent = store
    (tmp_path / "afile").write_text("not a directory")
    before = len(
        MlflowClient(uri).search_runs([e.experiment_id for e in MlflowClient(uri).search_experiments()])
    )
    args = [
        "finetune",
        "--from-run",
        parent,
        "--config",
        base.TINY_FT,
        f"output_dir={tmp_path / 'afile' / 'runs'}",
    ]
    assert main(args) == 2
    assert "output_dir=" in capsys.readouterr().err
    after = len(
        MlflowClient(uri).search_runs([e.experiment_id for e in MlflowClient(uri).search_experiments()])
    )
    assert after == before and (tmp_path / "afile").read_text() == "not a directory"


def test_the_same_seed_gives_the_same_losses_and_another_seed_others(store, tmp_path, capsys):
    uri, parent = store

    def losses(name: str, *over: str) -> dict[int, float]:
        assert main(args_for(parent, tmp_path / name, f"tracking.run_name={name}", *over)) == 0
        history = MlflowClient(uri).get_metric_history(run_named(uri, name).info.run_id, "train/loss_qvalue")
        return {m.step: m.value for m in history}

    a, b, c = losses("det_a"), losses("det_b"), losses("det_c", "seed=1")
    assert len(a) >= 5 and a == b  # bit for bit, step for step
    assert a.keys() != c.keys() or any(a[s] != c[s] for s in a)
