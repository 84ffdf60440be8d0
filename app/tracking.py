"""MLflow: where runs go, how they are started, linked, described and fetched back.

The embedded default is a local sqlite store (``sqlite:///./mlflow.db``) with artifacts under
``./mlartifacts``; ``tracking.uri`` in the config or ``MLFLOW_TRACKING_URI`` points elsewhere (a
PostgreSQL-backed server, see deploy/). Every stage is one MLflow run; fine-tuning runs will be nested
under their pre-training run with ``mlflow.parentRunId``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
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
REQUEST_TIMEOUT_S = 5  # per request to a tracking server, during a run: a dead server costs seconds


class RunFailed(RuntimeError):
    """A run that failed for a reason outside the user's input (a collector worker died); exit status 1."""


@dataclass
class TrackingConfig:
    """Where runs are recorded."""

    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db
    experiment: str = "tmrl"
    # where a NEW experiment keeps its artifacts; None: ./mlartifacts for a local store, and for a tracking
    # server its own artifact store (`mlflow server --artifacts-destination`), which it proxies to clients
    artifact_location: str | None = None
    run_name: str | None = None


def resolve_uri(cfg: TrackingConfig) -> str:
    """The tracking URI in force: config, then environment, then the embedded sqlite default."""
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def _artifact_uri(location: str | None, tracking_uri: str) -> str | None:
    if location is None:
        if tracking_uri.startswith(("http://", "https://", "databricks")):
            return None  # the server's default: artifacts go through it to its artifact store
        location = "./mlartifacts"
    # a relative local path would be resolved against whatever directory the UI later runs in
    if "://" in location:
        return location
    return Path(location).expanduser().resolve().as_uri()


def check_reachable(uri: str) -> None:
    """Refuse, within ``REQUEST_TIMEOUT_S``, an http(s) tracking server that does not answer (MLflow's own
    client would retry for minutes); any HTTP answer counts as reachable. Other URIs are not checked."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=REQUEST_TIMEOUT_S)
    except requests.RequestException as err:
        cause = getattr(err.args[0], "reason", err) if err.args else err  # urllib3's, under requests'
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise ValueError(
            f"tracking server {uri} is not reachable ({type(cause).__name__}: {cause}); start it with "
            "`tmrl ui` or `mlflow server ...`, or set tracking.uri / MLFLOW_TRACKING_URI"
        ) from err


def client_for(cfg: TrackingConfig) -> MlflowClient:
    """A client of the tracking store in force, refused at once if it is a server that does not answer."""
    uri = resolve_uri(cfg)
    check_reachable(uri)
    return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def quick_requests(timeout_s: float = REQUEST_TIMEOUT_S) -> Iterator[None]:
    """MLflow's HTTP requests in this block: no retries, ``timeout_s`` each (its defaults, 7 retries with
    backoff and 120 s, would stall a run for minutes on a server that went away)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout_s))
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def unreachable(err: BaseException) -> bool:
    """Whether ``err`` says the tracking store did not answer (connection refused or lost, timeout, HTTP 5xx),
    which a later attempt may overcome, rather than that it refused the request."""
    import requests
    from mlflow.exceptions import MlflowException

    while err is not None:
        if isinstance(err, requests.ConnectionError | requests.Timeout | ConnectionError | TimeoutError):
            return True
        if (
            isinstance(err, MlflowException)
            and err.get_http_status_code() >= 500
            and "API request" in str(err)
        ):
            return True
        err = err.__cause__ or err.__context__
    return False


def ensure_experiment(client: MlflowClient, cfg: TrackingConfig) -> str:
    """The experiment's id, creating it (with an absolute artifact location) if it does not exist."""
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    location = _artifact_uri(cfg.artifact_location, resolve_uri(cfg))
    return client.create_experiment(cfg.experiment, artifact_location=location)


def existing_store(uri: str) -> str:
    """``uri`` for a command that only reads the store (ui, runs, compare): a sqlite path made absolute (a
    server started elsewhere reads the same file), refused if that file does not exist (MLflow would
    create an empty store there). Other URIs are returned as they are."""
    if not uri.startswith("sqlite:///"):
        return uri
    path = Path(uri[len("sqlite:///") :]).resolve()
    if not path.exists():
        raise FileNotFoundError(f"no tracking store at sqlite:///{path}: run `tmrl fit` first, or pass --uri")
    return f"sqlite:///{path}"


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment ``name``, refused naming the experiments the store holds."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(
            f"no experiment {name!r} in {uri} (it holds {names}); pass --experiment, or run `tmrl fit` "
            f"with tracking.experiment={name}"
        )
    return exp.experiment_id


def runs_page(base_url: str, exp_id: str) -> str:
    """The MLflow UI's runs table of experiment ``exp_id`` (the model-training view, not the GenAI one)."""
    return f"{base_url.rstrip('/')}/#/experiments/{exp_id}/runs?workflowType=machine_learning"


def artifact_page(base_url: str, exp_id: str, run_id: str, path: str) -> str:
    """The MLflow UI's view of artifact ``path`` of run ``run_id``."""
    return f"{base_url.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}/artifacts/{path}"


def log_dataset(client: MlflowClient, run_id: str, store, context: str = "training") -> None:
    """Log episode store ``store`` (an ``EpisodeStore``) as an MLflow dataset input of the run: name = the
    store's folder name, digest = its content fingerprint (cut to MLflow's 36 characters; the whole one is
    the ``tmrl.dataset_fingerprint`` tag), source = its absolute path, schema = one tensor per key
    (rows = steps), profile = episode and step counts and the env; shown in the UI's Dataset column."""
    import numpy as np
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types.schema import Schema, TensorSpec
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    specs = []
    for key in store.keys:
        array = store.array(key)
        specs.append(TensorSpec(np.dtype(array.dtype), (-1, *array.shape[1:]), key))
    profile = {"episodes": store.num_episodes, "steps": store.num_steps, "env": store.attrs.get("env")}
    dataset = Dataset(
        name=Path(store.path).name,
        digest=store.fingerprint[:36],
        source_type="local",
        source=json.dumps({"uri": str(Path(store.path).resolve())}),
        schema=json.dumps(TensorDatasetSchema(features=Schema(specs)).to_dict()),
        profile=json.dumps(profile),
    )
    client.log_inputs(run_id, [DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)])])


def copy_datasets(client: MlflowClient, src_run: str, dst_run: str, context: str) -> None:
    """Log the dataset inputs of run ``src_run`` on run ``dst_run`` too, under ``context``."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = client.get_run(src_run).inputs.dataset_inputs
    if inputs:
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)]
        client.log_inputs(dst_run, [DatasetInput(i.dataset, tags) for i in inputs])


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
    cfg: TrackingConfig,
    stage: str,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    name: str | None = None,
) -> tuple[MlflowClient, str]:
    """Create a run (status RUNNING) tagged with the stage and git commit, named ``tracking.run_name`` or
    else ``name`` (the stage's descriptive default); returns (client, run_id)."""
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
    run = client.create_run(exp_id, run_name=cfg.run_name or name, tags=all_tags)
    return client, run.info.run_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, object]) -> None:
    """Log flattened params in batches (MLflow caps a batch at 100 params and a value at 6000 chars)."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(
    client: MlflowClient, run_id: str, metrics: dict[str, float], step: int, timestamp: int | None = None
) -> None:
    """Log a dict of metrics at one step (at ``timestamp`` ms, default now) in a single request."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000) if timestamp is None else timestamp
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


class RunLog:
    """A run's metrics and artifacts on their way to the tracking store, kept while it cannot be reached.

    Every call first delivers what is pending, in order. A store that does not answer (``unreachable``)
    keeps the items for a later call, no sooner than ``retry_s`` later, at the cost of one short request
    (``quick_requests``); any other error is raised. ``close`` makes a last attempt and writes the metrics
    still undelivered to ``<local_dir>/undelivered_metrics.jsonl``.
    """

    def __init__(self, client: MlflowClient, run_id: str, local_dir: Path, retry_s: float = 10.0):
        self.client, self.run_id, self.local_dir, self.retry_s = client, run_id, Path(local_dir), retry_s
        self.pending: list[tuple] = []  # ("metrics", {name: value}, step, ms) or ("artifact", path, dir)
        self.error: BaseException | None = None  # why the last attempt failed
        self._retry_at = 0.0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        self.pending.append(("metrics", values, step, int(time.time() * 1000)))
        self.flush()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload the file ``path``, as it is when delivered (a checkpoint rewritten meanwhile goes once)."""
        item = ("artifact", str(path), artifact_path)
        if item not in self.pending:
            self.pending.append(item)
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """Deliver what is pending (``force``: even soon after a failure); True if nothing is left."""
        if not force and time.monotonic() < self._retry_at:
            return not self.pending
        with quick_requests():
            while self.pending:
                kind, *args = self.pending[0]
                try:
                    if kind == "metrics":
                        log_metrics(self.client, self.run_id, *args)
                    else:
                        self.client.log_artifact(self.run_id, *args)
                except Exception as err:
                    if not unreachable(err):
                        raise
                    self.error, self._retry_at = err, time.monotonic() + self.retry_s
                    return False
                self.pending.pop(0)
        return True

    def close(self) -> bool:
        """A last delivery; if items remain, dump the metrics to JSON lines and say where everything is.
        Returns whether everything was delivered."""
        try:
            if self.flush(force=True):
                return True
        except Exception as err:  # never raises: it also runs while another error ends the run
            self.error = err
        metrics = [i for i in self.pending if i[0] == "metrics"]
        files = [i[1] for i in self.pending if i[0] == "artifact"]
        dump = self.local_dir / "undelivered_metrics.jsonl"
        dump.parent.mkdir(parents=True, exist_ok=True)
        with dump.open("w") as f:
            for _, values, step, ms in metrics:
                f.write(json.dumps({"step": step, "timestamp": ms, "metrics": values}) + "\n")
        print(
            f"[tmrl] warning: the tracking store did not answer ({type(self.error).__name__}: {self.error}); "
            f"run {self.run_id} keeps {len(metrics)} undelivered metric batches in {dump} and "
            f"{len(files)} undelivered artifacts on this disk: {', '.join(files) or '-'}",
            file=sys.stderr,
        )
        return False


class LoggerClient:
    """The client Lightning's MLFlowLogger talks to in `tmrl fit`: its metrics go through ``log`` (a RunLog,
    so they wait while the store is away), its ``set_terminated`` is left to ``end_run`` (which knows how
    the fit ended: FINISHED only once the zero-shot evaluation is done); every other call passes through."""

    def __init__(self, client: MlflowClient, log: RunLog):
        self._client, self._log = client, log
        self._last: dict | None = None  # the last batch of metrics, by step

    def log_batch(self, run_id: str, metrics=(), params=(), tags=(), **kw) -> None:
        by_step: dict[int, dict[str, float]] = {}
        for m in metrics:
            by_step.setdefault(m.step, {})[m.key] = m.value
        if by_step and by_step == self._last:  # LastCheckpoint logged it before saving
            by_step = {}
        elif by_step:
            self._last = by_step
        for step, values in by_step.items():
            self._log.log_metrics(values, step)
        if params or tags:
            self._client.log_batch(run_id, params=params, tags=tags, **kw)

    def set_terminated(self, *args, **kw) -> None:
        pass

    def __getattr__(self, name: str):
        return getattr(self._client, name)


def end_run(client: MlflowClient, run_id: str, ok: bool, error: BaseException | None = None) -> None:
    """Mark the run FINISHED (``ok``), KILLED (``error`` is a KeyboardInterrupt) or FAILED; a FAILED run
    with an ``error`` gets its type and message as the ``tmrl.error`` tag and its traceback as the
    artifact ``error.txt``. Never raises: a tracking store that fails here is reported as a warning, so
    that it cannot mask the exception that ended the run."""
    status = RunStatus.FINISHED if ok else RunStatus.FAILED
    if isinstance(error, KeyboardInterrupt):
        status, error = RunStatus.KILLED, None
    try:
        with quick_requests():  # a server that went away costs seconds here, not minutes of retries
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

    check_reachable(uri)
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
