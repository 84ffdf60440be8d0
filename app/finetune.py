"""`tmrl finetune --from-run ID`: TMRL fine-tuning of a frozen CSP policy, read top to bottom.

make_env -> make_agent -> make_collector (app.collect) -> make_buffer; then the loop:
collect -> extend -> update (UTD times) -> sync weights -> log -> evaluate -> checkpoint.

The high-level SAC agent acts once per action chunk; only its action space differs between methods
(tmrl: z, sigma, eps_c; fixed_sigma: z, eps_c; dsrl: z; sac: the raw chunk). Every count of progress is
in REAL environment steps (``("next", "env_steps")`` of each chunk), never in chunks.
"""

from __future__ import annotations

import functools
import math
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torchrl.data import LazyMemmapStorage, LazyTensorStorage, ReplayBuffer
from tqdm import tqdm

from app import tracking
from app.base_run import load_base_policy, open_demos
from app.collect import AnyCollector, dead_workers, make_collector
from app.config import check_writable, flatten, to_yaml
from app.envs.torchrl_envs import ChunkEnv, make_chunk_env, make_zero_shot_env
from app.finetune_config import CollectConfig, FinetuneConfig
from app.finetune_eval import (
    SIGMA_QUANTILES,
    batch_stats,
    dummy_action,
    evaluate,
    plot_sigma_over_finetuning,
    plot_sigma_traces,
)
from app.finetune_state import LoopState, check_stop, read_agent, restore, resume_seed, save_checkpoint
from app.offline_data import read_demo_arrays
from datamodules.episodes import EpisodeStore
from modules.nets.keys import ACTION, DONE, ENV_STEPS, NEXT, SUCCESS
from modules.nets.policy import CSPPolicy
from modules.tmrl.agent import ActorPolicy, head_specs, make_agent, regularizer
from modules.tmrl.loss import STATE_KEYS, TMRLLoss, make_optimizers, update
from modules.tmrl.offline import demo_chunks, mixed_sample

PROGRESS_KEYS = ("eval/success_rate", "eval/base_success_rate", "train/episode_success", "train/sigma_mean")


def state_keys(env: ChunkEnv) -> list[str]:
    """What the agent sees: the keys of ``STATE_KEYS`` the env gives, in the loss's ``state_of`` order."""
    return [k for k in STATE_KEYS if k in env.observation_spec.keys()]


def buffer_capacity(cfg: CollectConfig, env_steps: int) -> int:
    """``collect.buffer_size``, capped at what a run of ``env_steps`` can collect: every chunk takes at least
    one env step, so a run never holds more than ``env_steps`` chunks (plus the last batch, which may run
    past the budget) and the cap changes nothing it stores. The storage is allocated whole at its first
    write: 1M point-cloud chunks took 8-13 GB and were OOM-killed on a 24 GiB machine in a 20k-step run."""
    return max(1, min(cfg.buffer_size, env_steps + cfg.num_envs * cfg.chunks_per_batch * max(1, cfg.workers)))


def make_buffer(
    cfg: CollectConfig,
    batch_size: int,
    scratch_dir: Path,
    env_steps: int | None = None,
    capacity: int | None = None,
) -> ReplayBuffer:
    """The replay buffer: ``capacity`` chunks if given, else ``buffer_capacity`` for a run of ``env_steps``
    if given, else ``collect.buffer_size``."""
    if capacity is None:
        capacity = cfg.buffer_size if env_steps is None else buffer_capacity(cfg, env_steps)
    storage = (
        LazyMemmapStorage(capacity, scratch_dir=scratch_dir) if cfg.memmap else LazyTensorStorage(capacity)
    )
    return ReplayBuffer(storage=storage, batch_size=batch_size)


def _worker_env(index: int, seed: int, **kw) -> ChunkEnv:
    """The env of collector worker ``index``, on its own seed stream."""
    return make_chunk_env(seed=seed + 1000 * (index + 1), **kw)


@dataclass
class Pipeline:
    """The built pieces of a fine-tuning run."""

    env: ChunkEnv
    eval_env: ChunkEnv
    loss: TMRLLoss
    optimizers: dict[str, torch.optim.Optimizer]
    policy: TensorDictModule  # the actor as the collector's policy
    collector: AnyCollector
    buffer: ReplayBuffer
    offline: TensorDict | None = None  # demonstration chunks mixed into every replay batch (rlpd)
    base_env: ChunkEnv | None = None  # the base policy alone on the eval episodes (methods with a base)

    def sample(self, batch_size: int, offline_fraction: float) -> TensorDict:
        if self.offline is None:
            return self.buffer.sample()
        return mixed_sample(self.buffer, self.offline, batch_size, offline_fraction)


def chunk_env_kwargs(cfg: FinetuneConfig, base: CSPPolicy | None, sensor: Mapping[str, Any] | None) -> dict:
    """``make_chunk_env``'s arguments but the batch size and seed: the target, method and chunk settings of
    ``cfg`` over ``base`` (None: raw actions) seen through ``sensor``."""
    c = cfg.chunk
    env_kw = dict(task=cfg.task, policy=base, method=cfg.method, exec_horizon=c.exec_horizon, sensor=sensor)
    env_kw |= dict(sigma_max=c.sigma_max, fixed_sigma=c.fixed_sigma, eps_bound=c.eps_bound)
    env_kw |= dict(z_mode=c.z_mode, z_map=c.z_map, steps=c.sample_steps, z_bound=c.z_bound, eps_map=c.eps_map)
    return env_kw


def make_actor(env, cfg: FinetuneConfig) -> tuple[Any, TensorDictModule]:
    """(the SAC loss module with its actor, critics and temperatures, the actor acting on ``env``'s state
    keys): the heads are the ones ``env``'s decoder takes."""
    keys = state_keys(env)
    state_dim = sum(env.observation_spec[k].shape[-1] for k in keys)
    dec = env.decoder
    heads = head_specs(dec.sizes, cfg.agent, sigma_max=dec.sigma_max, uses_base=dec.uses_base)
    loss = make_agent(state_dim, heads, cfg.agent, regularizer(cfg.agent, uses_base=dec.uses_base))
    return loss, TensorDictModule(ActorPolicy(loss.actor), in_keys=keys, out_keys=[ACTION])


def build_pipeline(
    cfg: FinetuneConfig,
    base: CSPPolicy | None,
    scratch_dir: Path,
    demos: EpisodeStore | None = None,
    warmup: bool = True,
    sensor: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> Pipeline:
    """make_env -> make_agent -> make_collector -> make_buffer, each from its own sub-config; with
    ``demos``, their chunks (same H_exec, reward and discount semantics as online data) for mixing;
    ``sensor``: the base policy's sensor settings (cameras, cloud), for tasks with a sensor; ``seed``: the
    training envs' seed (default ``cfg.seed``; a resumed run's is ``resume_seed``)."""
    c, seed = cfg.chunk, cfg.seed if seed is None else seed
    env_kw = chunk_env_kwargs(cfg, base, sensor)
    env = make_chunk_env(num_envs=cfg.collect.num_envs, seed=seed, **env_kw)
    worker_env = functools.partial(_worker_env, num_envs=cfg.collect.num_envs, seed=seed, **env_kw)
    eval_env = make_chunk_env(num_envs=cfg.eval.episodes, seed=cfg.eval.seed, **env_kw)
    base_env = None
    if base is not None and cfg.eval.every_env_steps > 0:
        # the eval env's own sub-envs: the base runs on the same episodes, never while the agent does
        base_env = make_zero_shot_env(
            cfg.task, cfg.eval.episodes, base, c.exec_horizon, cfg.eval.seed, sensor, c.sample_steps,
            backend=eval_env.backend,
        )  # fmt: skip
    loss, policy = make_actor(env, cfg)
    return Pipeline(
        env=env,
        eval_env=eval_env,
        loss=loss,
        optimizers=make_optimizers(loss, lr=cfg.agent.lr),
        policy=policy,
        collector=make_collector(env, policy, cfg.collect, warmup, worker_env),
        buffer=make_buffer(cfg.collect, cfg.agent.batch_size, scratch_dir, cfg.env_steps),
        offline=None
        if demos is None
        else demo_chunks(
            *read_demo_arrays(demos),
            env.backend.goal_xy,
            env.backend.goal_tol,
            cfg.chunk.exec_horizon,
            source=f"episode store {demos.path}",
        ),
        base_env=base_env,
    )


@dataclass
class RunHooks:
    """Where the loop's outputs go: MLflow for `tmrl finetune`, nowhere for the benchmark."""

    log: Callable[[dict[str, float], int], None] = lambda metrics, step: None
    checkpoint: Callable[[str, LoopState], None] = lambda name, state: None
    plot: Callable[[str, Callable[[Path], Path]], None] = lambda name, draw: None


def run_loop(cfg: FinetuneConfig, p: Pipeline, hooks: RunHooks, state: LoopState | None = None) -> dict:
    """collect -> extend -> update -> sync weights -> log -> evaluate -> checkpoint, until cfg.env_steps
    real environment steps; ``state`` (a resumed run's, else a fresh one) is updated in place, so that
    it is what an interrupted run must save. Returns the counters."""
    max_chunks = math.ceil(cfg.task.max_episode_steps / cfg.chunk.exec_horizon) + 1
    state = LoopState() if state is None else state
    counters = state.counters
    done = counters["env_steps"]
    every_eval, every_ckpt = max(cfg.eval.every_env_steps, 1), cfg.checkpoint_every_env_steps
    next_eval = (done // every_eval + 1) * every_eval
    next_ckpt, shown, out = (done // every_ckpt + 1) * every_ckpt, {}, {}
    evaluate_agent = functools.partial(
        evaluate, p.eval_env, p.policy, max_chunks, cfg.eval.seed, deterministic=cfg.eval.deterministic
    )
    if cfg.eval.every_env_steps > 0 and not done:
        # env step 0: the untrained agent beside the base alone, on the same fixed episodes
        first = {"eval/success_rate": evaluate_agent()}
        if p.base_env is not None:
            first["eval/base_success_rate"] = evaluate(p.base_env, dummy_action, max_chunks, cfg.eval.seed)
        hooks.log(first, 0)
        shown = {k.split("/")[-1]: f"{v:.2f}" for k, v in first.items()}
    bar = tqdm(total=cfg.env_steps, initial=done, unit="step", desc=f"finetune {cfg.method}",
               disable=not cfg.progress_bar)  # fmt: skip
    for batch in p.collector:
        flat = batch.reshape(-1)
        p.buffer.extend(flat)
        steps = int(flat[NEXT, ENV_STEPS].sum())
        counters["env_steps"] += steps
        counters["chunks"] += flat.numel()
        metrics = batch_stats(flat, p.env.decoder)
        metrics |= getattr(getattr(p.env, "backend", None), "link_metrics", dict)()  # a robot: the link
        if "train/sigma_p50" in metrics:  # a learned sigma
            state.sigma_history.append(
                (counters["env_steps"], [metrics[f"train/sigma_p{round(100 * q)}"] for q in SIGMA_QUANTILES])
            )
        # exploration at a glance: how many training episodes have reached the goal so far
        counters["successes"] += int((flat[NEXT, DONE] & flat[NEXT, SUCCESS]).sum())
        metrics["train/successes"] = float(counters["successes"])
        if len(p.buffer) >= max(cfg.collect.warmup_chunks, cfg.agent.batch_size):
            state.owed += cfg.agent.utd_ratio * flat.numel()  # fractional UTD ratios accumulate
            while state.owed >= 1:
                batch = p.sample(cfg.agent.batch_size, cfg.offline.fraction)
                out = update(p.loss, p.optimizers, batch)  # includes the Polyak target step
                counters["updates"] += 1
                state.owed -= 1
            if bad := {k: float(v) for k, v in out.items() if not math.isfinite(float(v))}:
                raise ValueError(  # NaN spreads to every later update, so the batch's last one tells
                    f"fine-tuning diverged at update {counters['updates']} ({counters['env_steps']} env "
                    f"steps): {bad}; checkpoints/agent_last.pt holds the last save before it"
                )
            metrics.update({f"train/{k}": float(v) for k, v in out.items()})  # the batch's last update
            p.collector.update_policy_weights_()
        last = counters["env_steps"] >= cfg.env_steps  # the final evaluation below covers this step
        if cfg.eval.every_env_steps > 0 and counters["env_steps"] >= next_eval and not last:
            metrics["eval/success_rate"] = evaluate_agent()
            next_eval += cfg.eval.every_env_steps
        hooks.log(metrics, counters["env_steps"])
        shown |= {k.split("/")[-1]: f"{v:.2f}" for k, v in metrics.items() if k in PROGRESS_KEYS}
        bar.update(steps)
        bar.set_postfix(shown)
        if counters["env_steps"] >= next_ckpt:
            hooks.checkpoint("agent_last.pt", state)
            next_ckpt += cfg.checkpoint_every_env_steps
        if last:
            break
        check_stop()  # SIGTERM or Ctrl-C, between batches: the caller saves and marks the run KILLED
    bar.close()
    if cfg.eval.every_env_steps > 0:
        traces: list = []
        final = evaluate_agent(traces=traces)
        hooks.log({"eval/success_rate": final}, counters["env_steps"])
        if "sigma" in p.env.decoder.sizes:
            hooks.plot("sigma_trace.png", lambda path: plot_sigma_traces(traces, cfg.method, path))
        print(f"[tmrl] {cfg.method}: {counters['env_steps']} env steps, final eval success {final:.0%}")
    if len(state.sigma_history) > 1:
        hooks.plot(
            "sigma_over_finetuning.png",
            lambda path: plot_sigma_over_finetuning(state.sigma_history, cfg.method, path),
        )
    hooks.checkpoint("agent_final.pt", state)
    return counters


def check_resume(client, cfg: FinetuneConfig, from_run: str) -> None:
    """Refuse a ``resume`` id that is not a fine-tuning run of ``from_run`` with the same method."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_run(cfg.resume).data.tags
    except MlflowException as err:
        raise ValueError(
            f"resume={cfg.resume!r} is not a run in {tracking.resolve_uri(cfg.tracking)}"
        ) from err
    if tags.get(tracking.PRETRAIN_TAG) != from_run or tags.get("tmrl.method") != cfg.method:
        raise ValueError(
            f"resume={cfg.resume!r} is not a method={cfg.method} fine-tuning run of {from_run!r} "
            f"(it is {tags.get('tmrl.method')!r} from {tags.get(tracking.PRETRAIN_TAG)!r})"
        )


def find_checkpoint(client, cfg: FinetuneConfig, run_dir: Path) -> tuple[Path, dict]:
    """The newest agent checkpoint of run ``cfg.resume`` (local, else from its artifacts): path and dict."""
    from mlflow.exceptions import MlflowException

    found = []
    for name in ("agent_final.pt", "agent_last.pt"):
        path = run_dir / "checkpoints" / name
        if not path.exists():
            try:
                path = Path(client.download_artifacts(cfg.resume, f"checkpoints/{name}", str(run_dir)))
            except (MlflowException, OSError):
                continue
        found.append((path, read_agent(path)))
    if not found:
        raise ValueError(f"resume={cfg.resume!r} has no agent checkpoint to continue from")
    return max(found, key=lambda f: f[1]["counters"]["env_steps"])


def run_name(cfg: FinetuneConfig) -> str:
    """A fine-tuning run's name in the MLflow UI when ``tracking.run_name`` is unset: stage, method, target
    and seed, e.g. ``finetune tmrl pointmaze-large task 1 seed 2``, ``finetune sac pointmaze-large from 1,4
    to 7,6 seed 0``, ``finetune dsrl cube-single heldout seed 1``."""
    target = cfg.task
    if target.task.name.endswith("cube"):  # the cube tasks take a variation, the mazes cells or a task id
        where = [target.variation]
    else:
        where = [f"task {target.task_id}"] if target.task_id is not None else []
        for word, cell in (("from", target.init_ij), ("to", target.goal_ij)):
            if cell is not None:
                where.append(f"{word} {','.join(str(c) for c in cell)}")
    return " ".join(["finetune", cfg.method, target.env, *where, f"seed {cfg.seed}"])


def finetune(cfg: FinetuneConfig, from_run: str) -> str:
    """Fine-tune the CSP policy of run ``from_run`` with ``cfg.method``; returns the new run's id.

    The run ends FINISHED, FAILED (with the error: ``tracking.end_run``) or, on Ctrl-C, KILLED after
    saving a checkpoint that ``resume=<run_id>`` continues from (see ``app.finetune_state``).
    """
    check_writable(cfg.output_dir, "output_dir")  # before any run is created
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory() as tmp:
        # "sac"/"rlpd" use no base policy, but the run they name must still be a fitting pre-training run
        base = load_base_policy(cfg, from_run, tmp)
    demos = open_demos(cfg.offline.path or base.demos_path, from_run) if cfg.method == "rlpd" else None
    if cfg.resume:
        client, run_id = tracking.client_for(cfg.tracking), cfg.resume
        check_resume(client, cfg, from_run)
    else:
        client, run_id = tracking.start_run(
            cfg.tracking,
            stage="finetune",
            tags={tracking.PRETRAIN_TAG: from_run, "tmrl.method": cfg.method},
            parent_run_id=from_run,
            name=run_name(cfg),
        )
    run_dir = Path(cfg.output_dir) / run_id
    log = tracking.RunLog(client, run_id, run_dir)
    owned = not cfg.resume  # a refused resume leaves the run's status as it was
    try:
        path, ckpt = find_checkpoint(client, cfg, run_dir) if cfg.resume else (None, None)
        seed = None if ckpt is None else resume_seed(cfg.seed, ckpt["counters"]["env_steps"])
        policy = None if cfg.method in ("sac", "rlpd") else base.policy
        p = build_pipeline(cfg, policy, run_dir / "buffer", demos, not cfg.resume, base.sensor, seed)
        if ckpt is None:
            state = LoopState()
            tracking.log_params(client, run_id, {**flatten(cfg), "from_run": from_run})
            tracking.copy_datasets(client, from_run, run_id, context="pre-training")  # the base's data
            client.log_text(run_id, to_yaml(cfg), "config.yaml")
        else:
            # the replay dump loads only into a storage of its own size: the one the checkpoint was saved with
            # (a checkpoint from before buffer_capacity: collect.buffer_size)
            saved = ckpt.get("replay_capacity", cfg.collect.buffer_size)
            if saved != p.buffer.storage.max_size:
                p.buffer = make_buffer(cfg.collect, cfg.agent.batch_size, run_dir / "buffer", capacity=saved)
            state = restore(path, ckpt, p.loss, p.optimizers, p.buffer, run_dir / "replay")
            client.update_run(run_id, status="RUNNING")
            owned = True

        def checkpoint(name: str, state: LoopState) -> Path:
            path = run_dir / "checkpoints" / name
            if not all(torch.isfinite(t).all() for t in p.loss.parameters()):
                raise ValueError(
                    f"fine-tuning diverged: the agent's weights are NaN or Inf at "
                    f"{state.counters['env_steps']} env steps; {path} is not overwritten"
                )
            save_checkpoint(path, run_dir / "replay", p.loss, p.optimizers, p.buffer, state)
            log.log_artifact(path, "checkpoints")  # the replay dump stays local
            return path

        def plot(name: str, draw: Callable[[Path], Path]) -> None:  # kept locally until it is delivered
            (run_dir / "plots").mkdir(parents=True, exist_ok=True)
            log.log_artifact(draw(run_dir / "plots" / name), "plots")

        hooks = RunHooks(log=log.log_metrics, checkpoint=checkpoint, plot=plot)
        again = f"`tmrl finetune --from-run {from_run} resume={run_id}` (same --config and overrides)"
        try:
            run_loop(cfg, p, hooks, state)
        except KeyboardInterrupt:
            checkpoint("agent_last.pt", state)
            steps = state.counters["env_steps"]
            print(
                f"[tmrl] interrupted at {steps} env steps, checkpoint saved; continue with {again}",
                flush=True,
            )
            raise
        except (RuntimeError, ValueError) as err:  # ValueError: TorchRL closing a worker not yet gone
            dead = dead_workers(p.collector)
            if not dead:
                raise
            path = checkpoint("agent_last.pt", state)  # the learner's state is whole: keep it
            raise tracking.RunFailed(
                f"{'; '.join(dead)}: {err}; the run's last checkpoint is {path}; continue with {again}"
            ) from err
        finally:
            p.collector.shutdown()
    except BaseException as err:
        if owned:
            log.close()
            tracking.end_run(client, run_id, ok=False, error=err)
        raise
    if log.close():  # a run whose results did not all reach the store is not marked FINISHED there
        tracking.end_run(client, run_id, ok=True)
    return run_id
