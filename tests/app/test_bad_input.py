"""Bad input to `tmrl fit` and `tmrl finetune`: each is refused with exit code 2 and a message naming what is
wrong, before any MLflow run is created, and nothing on disk is changed (the demonstrations, the
checkpoints); a fit that diverges stops at the step, its last checkpoint kept good and resumable."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from app.cli import main
from app.config import check_writable
from datamodules.episodes import write_episodes
from modules.nets.policy import CSPPolicy
from tests.app.test_finetune import pretrained, store  # noqa: F401 (fixtures)
from tests.app.test_fit_e2e import TINY
from tests.conftest import make_episodes
from tests.tiny import tiny_config

TINY_FT = tiny_config("tmrl")
QUICK = [
    "eval.enabled=false",
    "data.goal_sampling=future",
    "trainer.checkpoint_every_n_steps=2",
    "trainer.max_steps=8",
]


@pytest.fixture
def demos(tmp_path):
    """A tiny state store (no environment needed with eval.enabled=false); its path."""
    episodes = make_episodes([40, 25, 60, 12, 33, 50], obs_dim=3)
    return write_episodes(tmp_path / "demos.zarr", episodes, {"goal_indices": [0, 1]}).path


def fit(tmp_path, *args: str, data: Path | None = None) -> int:
    """`tmrl fit` on the tiny config in-process, the data at ``data``; its exit code."""
    where = [f"output_dir={tmp_path / 'runs'}", f"tracking.artifact_location={tmp_path / 'artifacts'}"]
    return main(["fit", "--config", TINY, f"data.path={data}", *where, *QUICK, *args])


def runs(tmp_path) -> list:
    """The runs of the tracking store in ``tmp_path`` (none if it was never created)."""
    db = tmp_path / "mlflow.db"
    if not db.exists():
        return []
    client = MlflowClient(f"sqlite:///{db}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself) and its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): p.read_bytes() for p in files}


@pytest.mark.parametrize(
    "command, override, message",
    [
        ("fit", "optim.lr=-1", "optim.lr must be > 0, got -1"),
        ("fit", "optim.weight_decay=-0.1", "optim.weight_decay must be >= 0, got -0.1"),
        ("fit", "data.batch_size=0", "data.batch_size must be >= 1, got 0"),
        ("fit", "data.val_fraction=1.0", "data.val_fraction must be in [0, 1), got 1.0"),
        ("fit", "trainer.checkpoint_every_n_steps=0", "trainer.checkpoint_every_n_steps must be >= 1, got 0"),
        ("fit", "trainer.log_every_n_steps=0", "trainer.log_every_n_steps must be >= 1, got 0"),
        ("finetune", "chunk.sigma_max=1.5", "chunk.sigma_max must be in (0, 1], got 1.5"),
        ("finetune", "chunk.fixed_sigma=-0.1", "chunk.fixed_sigma must be in [0, 1], got -0.1"),
        ("finetune", "chunk.exec_horizon=0", "chunk.exec_horizon must be >= 1, got 0"),
        ("finetune", "chunk.sample_steps=0", "chunk.sample_steps must be >= 1, got 0"),
        ("finetune", "chunk.z_map=tanh", "chunk.z_map='tanh'; expected one of"),
        ("finetune", "checkpoint_every_env_steps=0", "checkpoint_every_env_steps must be >= 1, got 0"),
        ("finetune", "eval.every_env_steps=-1", "eval.every_env_steps must be >= 0, got -1"),
        ("finetune", "agent.lr=-0.001", "agent.lr must be > 0, got -0.001"),
        ("finetune", "agent.gamma=1.5", "agent.gamma must be in [0, 1], got 1.5"),
        ("finetune", "agent.batch_size=0", "agent.batch_size must be >= 1, got 0"),
        ("finetune", "collect.buffer_size=0", "collect.buffer_size must be >= 1, got 0"),
    ],
)
def test_values_out_of_range_are_refused_before_any_run(
    tmp_path, mlflow_uri, capsys, command, override, message
):
    if command == "fit":
        assert fit(tmp_path, override, data=tmp_path / "demos.zarr") == 2
    else:
        assert main(["finetune", "--from-run", "feedfacefeedface", "--config", TINY_FT, override]) == 2
    err = capsys.readouterr().err
    assert f"tmrl {command}: error:" in err and message in err and f"'{override}'" in err
    assert runs(tmp_path) == [] and not (tmp_path / "demos.zarr").exists()  # nothing generated either


def test_a_directory_that_is_not_a_store_is_refused(tmp_path, mlflow_uri, capsys):
    data = tmp_path / "notes"
    data.mkdir()
    (data / "todo.txt").write_text("not demonstrations")
    assert fit(tmp_path, data=data) == 2
    assert f"{data} is not a tmrl episode store" in capsys.readouterr().err
    assert snapshot(data) == {str(data / "todo.txt"): b"not demonstrations"} and runs(tmp_path) == []


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "cannot read its array 'action' (RuntimeError"),
        ("garbage", "cannot read its array 'action' (RuntimeError"),
        ("delete", "no longer matches the fingerprint"),  # zarr would read the lost chunk as zeros
    ],
)
def test_a_damaged_store_is_refused_naming_it(tmp_path, mlflow_uri, capsys, demos, damage, message):
    copy = tmp_path / "damaged.zarr"
    shutil.copytree(demos, copy)
    chunk = copy / "data" / "action" / "c" / "0" / "0"
    if damage == "truncate":
        chunk.write_bytes(chunk.read_bytes()[:50])
    elif damage == "garbage":
        chunk.write_bytes(b"\x00garbage" * 20)
    else:
        chunk.unlink()
    original, damaged = snapshot(demos), snapshot(copy)
    assert fit(tmp_path, data=copy) == 2
    err = capsys.readouterr().err
    assert f"episode store {copy}: " in err and message in err and "regenerate the store" in err
    assert snapshot(demos) == original and snapshot(copy) == damaged and runs(tmp_path) == []


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_demonstrations_with_nan_or_inf_are_refused_naming_the_episode(tmp_path, mlflow_uri, capsys, value):
    episodes = make_episodes([40, 25, 60, 12], obs_dim=3)
    episodes[2]["observation"][7, 1] = value
    path = write_episodes(tmp_path / "nan.zarr", episodes, {"goal_indices": [0, 1]}).path
    before = snapshot(path)
    assert fit(tmp_path, data=path) == 2
    err = capsys.readouterr().err
    assert f"episode store {path}: its array 'observation' holds NaN or Inf, first in episode 2" in err
    assert snapshot(path) == before and runs(tmp_path) == []


@pytest.mark.parametrize("output_dir", ["afile/runs", "afile", "/proc/tmrl-runs"])
def test_an_output_dir_that_cannot_be_written_is_refused(tmp_path, mlflow_uri, capsys, demos, output_dir):
    (tmp_path / "afile").write_text("keep me")
    path = output_dir if output_dir.startswith("/") else str(tmp_path / output_dir)
    assert fit(tmp_path, f"output_dir={path}", data=demos) == 2
    assert f"output_dir={path!r} is not a writable directory" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "keep me" and runs(tmp_path) == []


def loss_goes_nan(monkeypatch, step: int) -> None:
    """The policy's training loss (not validation's) is NaN from the ``step``-th (0-based) on."""
    loss, calls = CSPPolicy.loss, []

    def patched(self, batch, **kw):
        if torch.is_grad_enabled():
            calls.append(None)
        out = loss(self, batch, **kw)
        return out * float("nan") if len(calls) > step else out

    monkeypatch.setattr(CSPPolicy, "loss", patched)


def weights_go_nan(monkeypatch, step: int) -> None:
    """The optimizer step of training step ``step`` (0-based) leaves a NaN weight."""
    from modules.csp import CSPModule

    optimizer_step = CSPModule.optimizer_step

    def patched(self, *args, **kw):
        optimizer_step(self, *args, **kw)
        if self.global_step == step:  # still the step's index: Lightning counts it after this hook
            with torch.no_grad():
                next(self.policy.parameters()).view(-1)[0] = float("nan")

    monkeypatch.setattr(CSPModule, "optimizer_step", patched)


@pytest.mark.parametrize(
    "diverge, step, message, saved",  # last.ckpt is saved every 2 steps
    [
        (loss_goes_nan, 5, "train/loss is nan at training step 5: stopped", 4),
        (weights_go_nan, 3, "the weights are NaN or Inf after training step 3: stopped before saving it", 2),
    ],
)
def test_a_diverging_fit_stops_and_keeps_its_last_good_checkpoint(
    tmp_path, mlflow_uri, capsys, monkeypatch, demos, diverge, step, message, saved
):
    with monkeypatch.context() as m:
        diverge(m, step)
        assert fit(tmp_path, data=demos) == 2
    assert message in capsys.readouterr().err
    (run,) = runs(tmp_path)
    run_id = run.info.run_id
    assert run.info.status == "FAILED" and run.data.tags["tmrl.error"].startswith("DivergedError: ")
    last = tmp_path / "runs" / run_id / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == saved
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert fit(tmp_path, f"resume={run_id}", data=demos) == 0  # it resumes from there and finishes
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "FINISHED"


def test_a_writable_output_dir_passes_and_nothing_is_left_behind(tmp_path):
    (tmp_path / "runs").mkdir()
    for path in (tmp_path / "runs", tmp_path / "new" / "runs"):
        check_writable(path, "output_dir")
    assert [p.name for p in tmp_path.iterdir()] == ["runs"] and not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_rlpd_refuses_missing_or_damaged_demonstrations_before_any_run(request, tmp_path, capsys, damage):
    (uri, parent), demos = request.getfixturevalue("store"), tmp_path / "demos.zarr"
    if damage == "garbage":
        shutil.copytree(request.getfixturevalue("pretrained")[0] / "demos.zarr", demos)
        (demos / "data" / "action" / "c" / "0" / "0").write_bytes(b"\x00garbage")
    before, client = snapshot(demos) if demos.exists() else {}, MlflowClient(uri)
    count = len(client.search_runs(["1"]))
    args = ["--config", TINY_FT, "method=rlpd", f"offline.path={demos}", f"output_dir={tmp_path / 'runs'}"]
    assert main(["finetune", "--from-run", parent, *args]) == 2
    err = capsys.readouterr().err
    assert (
        str(demos) in err
        and ("is not on this machine" if damage == "missing" else "cannot read its array") in err
    )
    assert len(client.search_runs(["1"])) == count and (snapshot(demos) if demos.exists() else {}) == before
