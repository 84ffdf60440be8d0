"""`tmrl fit`: demonstrations -> the task's DataModule -> CSPModule -> Trainer -> zero-shot evaluation, in
MLflow.

One fit is one MLflow run. Rank zero creates it before training and publishes its id in ``TMRL_RUN_ID`` so
the processes a multi-device strategy launches log into the same run instead of opening their own.

Resume: ``checkpoints/last.ckpt`` is saved every ``trainer.checkpoint_every_n_steps`` steps (and at the
last one); ``resume=<run id>`` continues a fit killed at any moment into the same run, exactly as if it had
never stopped: weights, EMA, optimizer, loop counters and RNG states come back from the checkpoint
(modules/csp.py), and the data order and every item's random draws are functions of (seed, epoch) that
start again where training stopped (datamodules/state.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import lightning as L
import mlflow
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from mlflow.exceptions import MlflowException

from app import tracking
from app.config import check_writable, flatten, to_yaml
from app.schema import DemoConfig, FitConfig, TrainerConfig
from app.tasks.base import Task
from app.tasks.registry import task_of_fit
from datamodules.episodes import EpisodeStore
from datamodules.state import StateDataConfig, WindowDataModule
from modules.csp import CSPModule, DivergedError
from modules.nets.checkpoint import load_checkpoint_file, read_checkpoint
from modules.nets.keys import IMAGE
from modules.nets.policy import CSPPolicy

RUN_ID_ENV = "TMRL_RUN_ID"
LAST_CKPT = "last.ckpt"  # under <output_dir>/<run id>/checkpoints and the run's "checkpoints" artifacts


def global_rank() -> int:
    # Lightning reads RANK / LOCAL_RANK / SLURM_PROCID at import: what a launcher told this process
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def ensure_demos(
    task: Task, data: StateDataConfig, demos: DemoConfig, wait_s: float = 3600.0
) -> EpisodeStore:
    """Open the episode store at ``data.path`` (checked: ``EpisodeStore.check``), generating it with
    ``task``'s scripted expert on ``demos.env`` if it is missing (refused if ``demos.env`` is not one of the
    task's environments).

    Only global rank zero generates; other ranks (e.g. started by SLURM) wait for the store to appear.
    """
    path = Path(data.path)
    deadline = time.monotonic() + wait_s
    while global_rank() != 0 and not path.exists() and time.monotonic() < deadline:
        time.sleep(2.0)
    if path.exists():
        return EpisodeStore.open(path).check()  # a damaged or non-finite store is refused before any work
    if not demos.generate:
        raise FileNotFoundError(
            f"data.path={str(path)!r} does not exist and demos.generate=false; generate it with "
            f"`tmrl demos --env {demos.env} --episodes N --out {path}` or set demos.generate=true"
        )
    if task.canonical(demos.env) is None:
        raise ValueError(
            f"demos.env={demos.env!r} is not an environment of the {task.name} task, which the policy's "
            f"context mode feeds; expected one of {list(task.env_names)}"
        )
    print(f"[tmrl] {path} not found: generating {demos.episodes} expert episodes on {demos.env}")
    return task.generate_demos(demos, path)


def _resume_checkpoint(cfg: FitConfig) -> tuple[str | None, str | None]:
    """(checkpoint path, run id to continue) from ``cfg.resume``.

    A fit run's id continues THAT run from its last checkpoint: the local
    ``<output_dir>/<id>/checkpoints/last.ckpt`` when there is one (a killed fit's latest), else the run's
    artifact. A .ckpt file path starts a NEW run from the checkpoint (weights, optimizer, counters, RNG).

    Raises:
        ValueError: naming the id, when it is no run of the tracking store, not a `tmrl fit` run, or a run
            with no last checkpoint. Raised before anything is written.
    """
    if cfg.resume is None:
        return None, None
    if Path(cfg.resume).is_file():
        return cfg.resume, None
    uri = tracking.resolve_uri(cfg.tracking)
    try:
        run = tracking.client_for(cfg.tracking).get_run(cfg.resume)
    except MlflowException as err:  # the id is not a run in this store
        raise ValueError(
            f"resume={cfg.resume!r} is neither a checkpoint file nor a run id in {uri}; expected the id of a "
            f"`tmrl fit` run (printed as run_id=...) or a .ckpt path"
        ) from err
    stage = run.data.tags.get(tracking.STAGE_TAG)
    if stage != "pretrain":
        raise ValueError(
            f"resume={cfg.resume!r} is not a CSP pre-training run (its {tracking.STAGE_TAG} tag is "
            f"{stage!r}); `tmrl fit` resumes the runs `tmrl fit` started"
        )
    local = Path(cfg.output_dir) / cfg.resume / "checkpoints" / LAST_CKPT
    if local.is_file():
        return str(local), cfg.resume
    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=cfg.resume, artifact_path=f"checkpoints/{LAST_CKPT}", tracking_uri=uri
        )
    except (MlflowException, OSError) as err:
        raise ValueError(
            f"resume={cfg.resume!r}: the run has no checkpoint to resume from, neither {local} nor the "
            f"artifact checkpoints/{LAST_CKPT} (killed before its first save?); start a new fit"
        ) from err
    return path, cfg.resume


def check_resumable(path: str, policy: CSPPolicy) -> None:
    """Refuse a checkpoint whose policy has other parameters or shapes than ``policy`` (built from this
    fit's config), naming the config values and dimensions that differ.

    Raises:
        ValueError: naming ``path`` and the differences.
    """
    config, dims, _, saved = read_checkpoint(load_checkpoint_file(path, "cpu"))
    mine = policy.state_dict()
    if saved.keys() == mine.keys() and all(saved[k].shape == mine[k].shape for k in mine):
        return
    here = {
        **{f"policy.{k}": v for k, v in asdict(policy.cfg).items()},
        **{k: getattr(policy, k) for k in dims},
    }
    there = {**{f"policy.{k}": v for k, v in config.items()}, **dims}
    diffs = [f"{k}={there[k]!r} there, {here[k]!r} here" for k in there if k in here and there[k] != here[k]]
    raise ValueError(
        f"resume: {path} holds a policy of other dimensions than this config builds "
        f"({'; '.join(diffs) or 'parameter shapes differ'}); resume with the config it was trained with "
        f"(the run's config.yaml artifact)"
    )


class LastCheckpoint(Checkpoint):
    """Saves ``path`` every ``every`` training steps and at the last one, at the end of the training batch
    (a resumed fit goes on with the next one). Written beside ``path`` and renamed onto it, so a fit killed
    at any moment leaves a whole checkpoint. (A ``Checkpoint``: Lightning runs it after other callbacks.)"""

    def __init__(self, path: Path, every: int) -> None:
        self.path, self.every = Path(path), every
        self.interrupted = False  # a Ctrl-C ended training (Lightning then exits with SystemExit(1))

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        # rank zero's path on every rank: a rank started by an external launcher (torchrun, SLURM) does not
        # know the run id, and a sharded save (DeepSpeed, FSDP) writes from every rank into one folder
        self.path = Path(trainer.strategy.broadcast(str(self.path)))

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args) -> None:
        if trainer.global_step % self.every and trainer.global_step < trainer.max_steps:
            return
        if not all(torch.isfinite(p).all() for p in module.parameters()):  # keep the last good one
            raise DivergedError(
                f"the weights are NaN or Inf after training step {trainer.global_step - 1}: stopped before "
                f"saving it; {self.path} holds the last step saved before it (lower optim.lr)"
            )
        # this step's metrics reach the store before the checkpoint that says it was trained: Lightning logs
        # them only after this hook, and a fit killed in between would resume without them (the run's
        # LoggerClient drops the identical batch Lightning then logs)
        trainer._logger_connector.update_train_step_metrics()
        self._save(trainer)

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        """Ctrl-C or SIGTERM (pre-emption; Lightning raises SIGTERMException at the end of the batch it came
        in): save where training stopped, so ``resume=<run id>`` continues from there."""
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)) and trainer.global_step > 0:
            self.interrupted = True
            progress = trainer.fit_loop.epoch_loop.batch_progress
            for count in (progress.total, progress.current):  # the batch it stopped in is redone on resume:
                count.ready = count.started = min(count.started, count.processed)  # as if saved before it
            self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        trainer.save_checkpoint(partial)  # collective: every rank has written its part when it returns
        if not trainer.is_global_zero:
            return
        if partial.is_dir():  # a sharded checkpoint is a folder, which cannot be renamed onto another
            old = self.path.with_name(self.path.name + ".old")
            if self.path.exists():
                os.replace(self.path, old)
            os.replace(partial, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, self.path)


def check_strategy(t: TrainerConfig) -> None:
    """Refuse, before any run is created, trainer settings Lightning cannot run here (FSDP on a CPU, a
    DeepSpeed strategy without DeepSpeed installed, an unknown strategy or precision, missing devices):
    building a Trainer resolves them, and nothing is launched until ``fit``."""
    quiet = logging.getLogger("lightning.pytorch")  # its "GPU available" lines come with the real Trainer
    level, quiet.level = quiet.level, logging.WARNING
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            L.Trainer(
                accelerator=t.accelerator, devices=t.devices_arg(), num_nodes=t.num_nodes,
                strategy=t.strategy, precision=t.precision, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False,
            )  # fmt: skip
    except (ValueError, TypeError, RuntimeError, MisconfigurationException) as err:
        raise ValueError(
            f"trainer.strategy={t.strategy!r} trainer.accelerator={t.accelerator!r} "
            f"trainer.devices={t.devices!r} trainer.num_nodes={t.num_nodes} "
            f"trainer.precision={t.precision!r}: {err}"
        ) from None
    finally:
        quiet.setLevel(level)


def _build_trainer(cfg: FitConfig, logger: MLFlowLogger, run_dir: Path, has_val: bool) -> tuple:
    t = cfg.trainer
    best = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor="val/loss" if has_val else "train/loss",
        mode="min",
        save_top_k=1,
        every_n_train_steps=None if has_val else t.val_check_interval,
    )
    last = LastCheckpoint(run_dir / "checkpoints" / LAST_CKPT, t.checkpoint_every_n_steps)
    trainer = L.Trainer(
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=t.devices_arg(),
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        gradient_clip_val=cfg.optim.grad_clip or None,
        val_check_interval=min(t.val_check_interval, t.max_steps),
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches if has_val else 0,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.progress_bar,
        logger=logger,
        callbacks=[best, last, *([LearningRateMonitor()] if logger else [])],  # (it needs a logger)
        default_root_dir=run_dir,
        enable_model_summary=True,
        use_distributed_sampler=False,  # the data module's WindowSampler splits the data between ranks
    )
    return trainer, best, last


def make_datamodule(cfg: FitConfig) -> WindowDataModule:
    """The data module of ``cfg.data``, as the task of ``cfg.policy.context_mode`` reads demonstrations."""
    return fit_task(cfg).datamodule(cfg)


def fit_task(cfg: FitConfig) -> Task:
    """The task a fit config pre-trains on: ``demos.env``'s when it feeds ``policy.context_mode``."""
    return task_of_fit(cfg.policy.context_mode, cfg.demos.env)


def run_name(cfg: FitConfig) -> str:
    """A fit's name in the MLflow UI when ``tracking.run_name`` is unset: ``fit pointmaze-large seed 0``."""
    return f"fit {cfg.demos.env} seed {cfg.seed}"


def fit(cfg: FitConfig) -> str:
    """Pre-train a CSP policy as configured; returns the MLflow run id."""
    L.seed_everything(cfg.seed, workers=True)
    check_writable(cfg.output_dir, "output_dir")
    check_strategy(cfg.trainer)
    tracking.check_reachable(tracking.resolve_uri(cfg.tracking))  # a dead server is refused before any work
    ckpt_path, resumed_run = _resume_checkpoint(cfg)  # a bad resume= is refused before any work
    task = fit_task(cfg)
    store = ensure_demos(task, cfg.data, cfg.demos)
    dm = task.datamodule(cfg)
    dm.setup("fit")  # a store that does not match the config is refused here, before any MLflow run
    dims = dict(obs_dim=dm.obs_dim, action_dim=dm.action_dim, goal_dim=dm.goal_dim)
    policy = CSPPolicy(cfg.policy, **dims, sensor=task.sensor(cfg))  # the sensor travels with the policy
    policy.set_normalization(dm.stats)
    if ckpt_path is not None:
        check_resumable(ckpt_path, policy)
    module = CSPModule(policy, cfg.optim, seed=cfg.seed)

    run_id = os.environ.get(RUN_ID_ENV) or resumed_run
    client = None
    placeholder = global_rank() != 0
    if placeholder:
        # another process of a multi-process fit: rank zero alone opens the store (two processes creating a
        # new sqlite store at once collide), creates, logs into and ends the run. A rank started by an
        # external launcher (torchrun, SLURM) learns the run id when training starts (LastCheckpoint.setup)
        run_id = run_id or f"rank{global_rank()}"
    else:
        client = tracking.client_for(cfg.tracking)  # (a sqlite store is created here, after the checks)
        if run_id is None:  # a new fit
            tags = {tracking.DATASET_TAG: store.fingerprint}
            _, run_id = tracking.start_run(cfg.tracking, stage="pretrain", tags=tags, name=run_name(cfg))
            tracking.log_dataset(client, run_id, store, context="training")  # the UI's Dataset column
            tracking.log_params(client, run_id, {**flatten(cfg), "data.fingerprint": store.fingerprint})
            client.log_text(run_id, to_yaml(cfg), "config.yaml")
            if IMAGE in policy.input_keys:
                log_input_frames(client, run_id, dm)
        elif resumed_run:
            client.update_run(run_id, status="RUNNING")
    published = not placeholder and RUN_ID_ENV not in os.environ
    if published:
        os.environ[RUN_ID_ENV] = run_id  # processes launched by a DDP strategy inherit it
    error: BaseException | None = None
    last = run_log = None
    try:
        uri = tracking.resolve_uri(cfg.tracking)
        run_dir = Path(cfg.output_dir) / run_id
        logger = False
        if not placeholder:
            logger = MLFlowLogger(cfg.tracking.experiment, tracking_uri=uri, run_id=run_id)
            run_log = tracking.RunLog(client, run_id, run_dir)
            logger._mlflow_client = tracking.LoggerClient(client, run_log)  # metrics wait for a lost store
        has_val = dm.val_set is not None and len(dm.val_set) > 0
        trainer, best, last = _build_trainer(cfg, logger, run_dir, has_val)
        with warnings.catch_warnings():  # it is: the data module resumes mid-epoch (its WindowSampler)
            warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch")
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        if trainer.is_global_zero:
            _finish(cfg, task, client, run_id, module, [last.path, best.best_model_path], store, run_dir)
    except BaseException as err:
        error = err
        if isinstance(err, SystemExit) and last is not None and last.interrupted:  # Ctrl-C or SIGTERM
            error = KeyboardInterrupt()
            print(f"[tmrl] interrupted: {last.path} holds the last step; continue with "
                  f"`tmrl fit --config <the same config> resume={run_id}`", file=sys.stderr)  # fmt: skip
            raise error from None
        raise
    finally:
        delivered = run_log is None or run_log.close()  # never raises; says where undelivered metrics are
        if published:
            os.environ.pop(RUN_ID_ENV, None)
            if delivered or error is not None:  # a fit whose metrics did not all arrive is not FINISHED
                tracking.end_run(client, run_id, ok=error is None, error=error)
    if placeholder and last is not None:  # rank zero's run, which LastCheckpoint.setup broadcast
        run_id = last.path.parents[1].name
    return run_id


def log_input_frames(client, run_id: str, dm: WindowDataModule, count: int = 16) -> None:
    """Log ``plots/input_frames.png``: the frames of ``count`` training windows, spread over the training set
    and augmented as training sees them (what the policy is given, to check before the curves come)."""
    from app.plots import frame_grid

    picks = np.linspace(0, len(dm.train_set) - 1, num=min(count, len(dm.train_set))).astype(int)
    frames = np.stack([dm.train_set[int(i)][IMAGE].numpy() for i in picks])  # (N, V, H, W, 3)
    with tempfile.TemporaryDirectory() as tmp:
        title = f"training inputs: {len(picks)} windows of {dm.cfg.path} (augmented)"
        client.log_artifact(run_id, str(frame_grid(frames, Path(tmp) / "input_frames.png", title)), "plots")


def _finish(cfg, task: Task, client, run_id, module: CSPModule, ckpts: list, store, run_dir: Path) -> None:
    """Rank zero after training: checkpoints and the bare policy as artifacts, then zero-shot evaluation."""
    for path in {str(p) for p in ckpts if p and Path(p).is_file()}:
        client.log_artifact(run_id, path, "checkpoints")
    policy = module.ema.cpu().eval()
    policy_path = run_dir / "policy.pt"
    policy.save(policy_path)
    client.log_artifact(run_id, str(policy_path), "checkpoints")
    if not cfg.eval.enabled:
        return
    with tempfile.TemporaryDirectory() as tmp:
        report = task.zero_shot(policy, cfg, store.attrs.get("env"), Path(tmp), cfg.trainer.progress_bar)
        for name, value in report.metrics.items():
            client.log_metric(run_id, name, value, step=module.global_step)
        for line in report.lines:
            print(line)
        for plot in report.plots:
            client.log_artifact(run_id, str(plot), "plots")
