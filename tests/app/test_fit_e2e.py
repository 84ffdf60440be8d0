"""`tmrl fit` end to end on a tiny budget: demos generated, trained, evaluated, tracked in MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from app.cli import main
from app.config import load_config
from app.schema import FitConfig
from modules.nets.keys import GOAL, OBS
from modules.nets.policy import CSPPolicy
from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[2]
TINY = tiny_config("csp_state")


def tiny_overrides(tmp_path) -> list[str]:
    return [
        f"data.path={tmp_path / 'demos.zarr'}",
        f"output_dir={tmp_path / 'runs'}",
        f"tracking.artifact_location={tmp_path / 'artifacts'}",
    ]


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def test_fit_tracks_everything_in_one_run(tmp_path, mlflow_uri, capsys):
    assert main(["fit", "--config", TINY, *tiny_overrides(tmp_path)]) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith("run_id=")
    run_id = last_line.split("=", 1)[1]

    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert {"train/loss", "val/loss", "eval/success_sigma_0", "eval/success_sigma_1"} <= set(run.data.metrics)
    assert run.data.params["policy.width"] == "32" and run.data.params["seed"] == "0"
    assert len(run.data.tags["tmrl.dataset_fingerprint"]) == 64
    assert run.data.params["data.fingerprint"] == run.data.tags["tmrl.dataset_fingerprint"]
    assert run.data.tags["tmrl.stage"] == "pretrain"
    files = artifact_paths(client, run_id)
    assert {
        "config.yaml",
        "checkpoints/last.ckpt",
        "checkpoints/best.ckpt",
        "checkpoints/policy.pt",
        "plots/zero_shot_success.png",
        "plots/zero_shot_paths.png",
    } <= files

    # the logged config is the resolved one and loads back to the same typed config
    config_file = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="config.yaml", dst_path=str(tmp_path / "dl"), tracking_uri=mlflow_uri
    )
    assert load_config(FitConfig, config_file) == load_config(FitConfig, TINY, tiny_overrides(tmp_path))

    # the checkpoint artifact loads into the bare policy class and samples
    ckpt = mlflow.artifacts.download_artifacts(
        run_id=run_id,
        artifact_path="checkpoints/last.ckpt",
        dst_path=str(tmp_path / "dl"),
        tracking_uri=mlflow_uri,
    )
    policy = CSPPolicy.load(ckpt)
    chunk = policy.sample({OBS: torch.zeros(2, 2), GOAL: torch.ones(2, 2)}, 0.0)
    assert chunk.shape == (2, 4, 2) and torch.isfinite(chunk).all()

    # `tmrl eval` re-evaluates the run's policy with other evaluation settings
    capsys.readouterr()
    assert main(["eval", "--from-run", run_id, "--out", str(tmp_path / "ev"), "eval.sigmas=[0.5]"]) == 0
    out = capsys.readouterr().out
    assert "sigma=0.5: success" in out and "5 episodes" in out
    assert (tmp_path / "ev" / "zero_shot_paths.png").stat().st_size > 0


def test_eval_refuses_unknown_and_non_pretraining_runs(tmp_path, mlflow_uri, capsys):
    assert main(["eval", "--from-run", "0123456789abcdef"]) == 2
    assert "does not exist" in capsys.readouterr().err
    client = MlflowClient(mlflow_uri)
    other = client.create_run(client.create_experiment("other")).info.run_id
    assert main(["eval", "--from-run", other]) == 2
    assert "not a CSP pre-training run" in capsys.readouterr().err


def test_fit_resumes_from_its_run(tmp_path, mlflow_uri, capsys):
    assert main(["fit", "--config", TINY, *tiny_overrides(tmp_path), "eval.enabled=false"]) == 0
    run_id = capsys.readouterr().out.strip().splitlines()[-1].split("=", 1)[1]
    overrides = [*tiny_overrides(tmp_path), "eval.enabled=false", "trainer.max_steps=9", f"resume={run_id}"]
    assert main(["fit", "--config", TINY, *overrides]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"run_id={run_id}"
    steps = [m.step for m in MlflowClient(mlflow_uri).get_metric_history(run_id, "train/loss")]
    assert max(steps) >= 8  # training went on past the first fit's 6 steps, in the same run


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["trainer.max_stesp=5"], ["trainer.max_stesp", "trainer.max_steps"]),
        (["seed=abc"], ["seed", "int", "abc"]),
        (["policy.context_mode=pixels"], ["context_mode", "pixels", "goal"]),
        (["trainer.max_steps"], ["key=value"]),
        (["demos.env=cube-single"], ["demos.env='cube-single'", "maze task", "pointmaze-large"]),
    ],
)
def test_bad_overrides_are_refused_before_any_work(tmp_path, mlflow_uri, capsys, args, expected):
    assert main(["fit", "--config", TINY, *tiny_overrides(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err
    assert not (tmp_path / "demos.zarr").exists() and not (tmp_path / "mlflow.db").exists()


def test_bad_yaml_is_refused_with_file_key_and_suggestion(tmp_path, mlflow_uri, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  path: x.zarr\n  batch_sise: 8\n")
    assert main(["fit", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "data.batch_sise" in err and "data.batch_size" in err


def test_missing_required_value_is_refused(tmp_path, mlflow_uri, capsys):
    cfg = tmp_path / "nodata.yaml"
    cfg.write_text("seed: 1\n")
    assert main(["fit", "--config", str(cfg)]) == 2
    assert "data.path" in capsys.readouterr().err


def test_print_config_shows_the_resolved_values(capsys):
    assert main(["fit", "--config", TINY, "seed=3", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "seed: 3" in out and "width: 32" in out


def test_console_script_refuses_unknown_key(tmp_path):
    tmrl = Path(sys.executable).parent / "tmrl"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    proc = subprocess.run(
        [str(tmrl), "fit", "--config", TINY, "trainer.max_stepz=1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "trainer.max_steps" in proc.stderr
