"""Multi-process pre-training through a Lightning strategy (CPU DDP with gloo): one MLflow run, and the
processes split each epoch's windows between them, none twice, so that together they train on exactly the
batches one process would (``data.batch_size`` is the global batch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from app.pretrain import check_strategy
from app.schema import TrainerConfig
from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[2]
TRACE = Path(__file__).with_name("fit_trace.py")
BATCH = 16


def traced_fit(tmp_path: Path, name: str, *overrides: str) -> tuple[str, dict[int, list[list[int]]]]:
    """Run `tmrl fit` through fit_trace.py; (run id, {rank: epoch 0's batches of window indices})."""
    trace = tmp_path / name
    trace.mkdir()
    uri = f"sqlite:///{tmp_path / name / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TMRL_TRACE_DIR": str(trace), "OMP_NUM_THREADS": "1"}
    env.pop("TMRL_RUN_ID", None)
    cmd = [
        sys.executable, str(TRACE), "fit", "--config", tiny_config("csp_state"),
        f"data.path={tmp_path / 'demos.zarr'}", f"output_dir={trace / 'runs'}", f"data.batch_size={BATCH}",
        "trainer.max_steps=30", "trainer.limit_val_batches=0", "eval.enabled=false", *overrides,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = proc.stdout.strip().splitlines()[-1].split("=", 1)[1]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tmrl").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # another rank made no run of its own
    assert runs[0].info.status == "FINISHED" and "train/loss" in runs[0].data.metrics
    batches = {}
    for path in sorted(trace.glob("rank*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert any(r["epoch"] == 1 for r in rows)  # the trace covers a whole first epoch
        loaded = [r["index"] for r in rows if r["epoch"] == 0 and "index" in r]
        sizes = [r["step_size"] for r in rows if r["epoch"] == 0 and "step_size" in r]
        assert sum(sizes) == len(loaded)  # every loaded window was trained on, in batches of these sizes
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        batches[int(path.stem[4:])] = [loaded[a : a + n] for a, n in zip(starts, sizes, strict=True)]
    return run_id, batches


def test_two_ddp_processes_train_the_single_process_batches_in_one_run(tmp_path):
    _, single = traced_fit(tmp_path, "single")
    _, ddp = traced_fit(tmp_path, "ddp", "trainer.devices=2", "trainer.strategy=ddp")
    (one,) = single.values()
    assert sorted(ddp) == [0, 1]
    assert {len(b) for b in one} == {BATCH} and {len(b) for r in ddp.values() for b in r} == {BATCH // 2}
    flat = [i for batch in one for i in batch]
    assert len(flat) == len(set(flat)) > 10 * BATCH  # one process: each window of the epoch once
    seen = [i for rank in ddp.values() for batch in rank for i in batch]
    assert len(seen) == len(set(seen)) == len(flat)  # two: the same number of distinct windows, none twice
    assert len(ddp[0]) == len(ddp[1]) == len(one)  # the same number of steps, on every rank
    for step, batch in enumerate(one):  # and step k's two halves are the single process's step-k batch
        assert sorted(ddp[0][step] + ddp[1][step]) == sorted(batch)


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tmp_path):
    from datamodules.state import StateDataConfig, WindowDataModule

    dm = WindowDataModule(StateDataConfig(path="unused", batch_size=15), chunk_len=4)
    dm.trainer = type("T", (), {"global_rank": 0, "world_size": 2})()
    with pytest.raises(ValueError, match=r"data.batch_size=15 is the global batch .* multiple of 2"):
        _ = dm.rank_batch_size


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(accelerator="cpu", devices="2", strategy="fsdp"), "trainer.strategy='fsdp'.*requires a GPU"),
        (dict(accelerator="cpu", strategy="deepspeed"), "DeepSpeed installed"),
        (dict(strategy="ddp_typo"), "invalid strategy name"),
        (dict(precision="8-bit"), "trainer.precision='8-bit'.*invalid"),
    ],
)
def test_strategies_that_cannot_run_here_are_refused_naming_the_keys(settings, message):
    with pytest.raises(ValueError, match=message):
        check_strategy(TrainerConfig(**settings))


def test_a_cpu_ddp_strategy_is_accepted():
    check_strategy(TrainerConfig(accelerator="cpu", devices="2", strategy="ddp"))


def test_fsdp_on_a_cpu_is_refused_before_any_run(tmp_path, mlflow_uri, capsys):
    from app.cli import main

    args = ["fit", "--config", tiny_config("csp_state"), f"data.path={tmp_path / 'd.zarr'}",
            f"output_dir={tmp_path / 'runs'}", "trainer.devices=2", "trainer.strategy=fsdp"]  # fmt: skip
    assert main(args) == 2
    assert "requires a GPU" in capsys.readouterr().err
    assert not (tmp_path / "d.zarr").exists() and not (tmp_path / "mlflow.db").exists()
