"""MLflow: where runs go, how they are started, linked, described and fetched back.

The embedded default is a local sqlite store (``sqlite:///./mlflow.db``) with artifacts under
``./mlartifacts``; ``tracking.uri`` in the config or ``MLFLOW_TRACKING_URI`` points elsewhere (a
PostgreSQL-backed server, see deploy/). Every stage is one MLflow run; fine-tuning runs will be nested
under their pre-training run with ``mlflow.parentRunId``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

DEFAULT_URI = "sqlite:///./mlflow.db"
GIT_COMMIT_TAG = "tmrl.git_commit"
DATASET_TAG = "tmrl.dataset_fingerprint"
STAGE_TAG = "tmrl.stage"
PRETRAIN_TAG = "tmrl.pretrain_run_id"
ERROR_TAG = "tmrl.error"  # "<exception type>: <message>" of a FAILED run, cut to ERROR_CHARS
ERROR_CHARS = 500


@dataclass
class TrackingConfig:
    """Where runs are recorded."""

    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db
    experiment: str = "tmrl"
    artifact_location: str = "./mlartifacts"  # used only when the experiment is created
    run_name: str | None = None


def resolve_uri(cfg: TrackingConfig) -> str:
    """The tracking URI in force: config, then environment, then the embedded sqlite default."""
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def _artifact_uri(location: str) -> str:
    # a relative local path would be resolved against whatever directory the UI later runs in
    if "://" in location:
        return location
    return Path(location).expanduser().resolve().as_uri()


def client_for(cfg: TrackingConfig) -> MlflowClient:
    return MlflowClient(tracking_uri=resolve_uri(cfg))


def ensure_experiment(client: MlflowClient, cfg: TrackingConfig) -> str:
    """The experiment's id, creating it (with an absolute artifact location) if it does not exist."""
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(cfg.experiment, artifact_location=_artifact_uri(cfg.artifact_location))


def git_commit() -> str | None:
    """The commit of the code that runs (with '-dirty' if the tree has changes), or None outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("-dirty" if dirty else "")


def start_run(
    cfg: TrackingConfig, stage: str, tags: dict[str, str] | None = None, parent_run_id: str | None = None
) -> tuple[MlflowClient, str]:
    """Create a run (status RUNNING) tagged with the stage and git commit; returns (client, run_id)."""
    client = client_for(cfg)
    # a child run lives in its parent's experiment, or the UI cannot nest it
    exp_id = (
        client.get_run(parent_run_id).info.experiment_id if parent_run_id else ensure_experiment(client, cfg)
    )
    all_tags = {STAGE_TAG: stage, **(tags or {})}
    commit = git_commit()
    if commit:
        all_tags[GIT_COMMIT_TAG] = commit
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=cfg.run_name, tags=all_tags)
    return client, run.info.run_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, object]) -> None:
    """Log flattened params in batches (MLflow caps a batch at 100 params and a value at 6000 chars)."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log a dict of metrics at one step in a single request."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


def end_run(client: MlflowClient, run_id: str, ok: bool, error: BaseException | None = None) -> None:
    """Mark the run FINISHED (``ok``), KILLED (``error`` is a KeyboardInterrupt) or FAILED; a FAILED run
    with an ``error`` gets its type and message as the ``tmrl.error`` tag and its traceback as the
    artifact ``error.txt``. Never raises: a tracking store that fails here is reported as a warning, so
    that it cannot mask the exception that ended the run."""
    status = RunStatus.FINISHED if ok else RunStatus.FAILED
    if isinstance(error, KeyboardInterrupt):
        status, error = RunStatus.KILLED, None
    try:
        if error is not None and not ok:
            client.set_tag(run_id, ERROR_TAG, f"{type(error).__name__}: {error}"[:ERROR_CHARS])
            client.log_text(run_id, "".join(traceback.format_exception(error)), "error.txt")
        client.set_terminated(run_id, RunStatus.to_string(status))
    except Exception as err:  # the store's own failure must not replace the exception that ended the run
        print(
            f"[tmrl] warning: could not mark run {run_id} {RunStatus.to_string(status)} in the tracking "
            f"store: {type(err).__name__}: {err}",
            file=sys.stderr,
        )


def fetch_pretrain_run(uri: str, run_id: str, dst: str | Path) -> dict[str, Path]:
    """Download a pre-training run's resolved config and exported policy into ``dst``.

    Refuses, naming the store, a run id that does not exist or a run that is not a CSP pre-training run.
    Returns ``{"config": path, "policy": path}``.
    """
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ValueError(f"run {run_id!r} does not exist in the tracking store {uri}") from err
    stage = run.data.tags.get(STAGE_TAG)
    if stage != "pretrain":
        raise ValueError(f"run {run_id!r} is not a CSP pre-training run (its {STAGE_TAG} tag is {stage!r})")
    out = {}
    for name, artifact in (("config", "config.yaml"), ("policy", "checkpoints/policy.pt")):
        try:
            out[name] = Path(
                download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(dst), tracking_uri=uri)
            )
        except (MlflowException, OSError) as err:
            raise ValueError(f"run {run_id!r} has no {artifact} artifact (did the fit finish?)") from err
    return out
