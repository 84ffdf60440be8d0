"""`tmrl bench [all | pretrain | finetune]`: where the time goes, measured in one run on this machine.

`tmrl bench pretrain`:

1. Training samples/s through Lightning vs a bare PyTorch loop on the same model, the same initial
   weights and the same pre-drawn batches (the ratio is Lightning's overhead).
2. Data-loader throughput (samples/s) vs what training consumes.
3. Chunk-sampling latency of the policy (K Euler steps) at batch 1 and 64, and forward FLOPs per sample.

`tmrl bench finetune`: env steps/s of the full fine-tuning loop, of the environment alone and of the base
policy's chunk sampling alone at the same batch; the two set a floor (an env step needs both), and the
loop's share of that floor is what collection, replay and SAC updates leave of it.

`tmrl bench` (or `tmrl bench all`): every benchmark at a quick size as one table (app/bench_suite.py); each
function here returns its rows as well as printing them.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from app.finetune import FinetuneConfig, RunHooks, build_pipeline, run_loop
from app.pretrain import ensure_demos, fit_task, make_datamodule
from app.schema import FitConfig
from app.tasks.base import Backend
from datamodules.state import StateDataModule
from modules.csp import CSPModule
from modules.nets.keys import ACTION
from modules.nets.policy import CSPPolicy, PolicyConfig

WARMUP = 3  # untimed steps: first-call allocations and thread-pool start-up


class Row(NamedTuple):
    """One measured figure of a benchmark, a row of `tmrl bench all`'s table."""

    name: str
    value: float
    unit: str
    note: str = ""


class _Batches(Dataset):
    """Pre-drawn batches served as-is, so both loops see identical inputs and no loading cost."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.batches[i]


class _StepTimer(L.Callback):
    def __init__(self) -> None:
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == WARMUP:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()


def bare_loop(module: CSPModule, batches: list[dict[str, torch.Tensor]], grad_clip: float) -> float:
    """Samples/s of a plain PyTorch loop doing what CSPModule does (loss, clip, AdamW, EMA)."""
    opt = module.configure_optimizers()
    module.train()
    for i, batch in enumerate(batches):
        if i == WARMUP:
            start = time.perf_counter()
        loss = module.policy.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(module.policy.parameters(), grad_clip)
        opt.step()
        module.update_ema(batch)
    elapsed = time.perf_counter() - start
    return (len(batches) - WARMUP) * len(batches[0][ACTION]) / elapsed


def lightning_loop(module: CSPModule, batches: list[dict[str, torch.Tensor]], grad_clip: float) -> float:
    """Samples/s of the same steps through a Lightning Trainer (no logger, checkpoints or bar)."""
    timer = _StepTimer()
    trainer = L.Trainer(
        max_steps=len(batches),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=grad_clip or None,
        callbacks=[timer],
    )
    loader = DataLoader(_Batches(batches), batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    return (len(batches) - WARMUP) * len(batches[0][ACTION]) / (timer.end - timer.start)


def endless(loader) -> Iterator:
    """The loader's batches epoch after epoch: a small dataset must not run out mid-benchmark."""
    while True:
        yield from loader


def loader_throughput(dm: StateDataModule, n_batches: int) -> float:
    """Samples/s the training DataLoader delivers (workers as configured)."""
    it = endless(dm.train_dataloader())
    next(it)  # worker start-up is a one-off cost
    start = time.perf_counter()
    count = 0
    for _ in range(n_batches):
        count += len(next(it)[ACTION])
    return count / (time.perf_counter() - start)


def sampling_latency_ms(policy: CSPPolicy, batch: dict[str, torch.Tensor], size: int, steps: int) -> float:
    """Median wall time (ms) of one ``policy.sample`` call of ``size`` chunks with ``steps`` Euler steps."""
    obs = {k: v[:1].expand(size, *v.shape[1:]).contiguous() for k, v in batch.items() if k != ACTION}
    times = []
    for _ in range(15):
        start = time.perf_counter()
        policy.sample(obs, 0.5, steps=steps)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[3:])


def forward_flops_per_sample(policy: CSPPolicy, batch: dict[str, torch.Tensor]) -> float:
    """FLOPs of one training-loss forward pass, per sample (backward costs about twice this)."""
    with FlopCounterMode(display=False) as counter:
        policy.loss(batch)
    return counter.get_total_flops() / len(batch[ACTION])


def bench_pretrain(cfg: FitConfig, steps: int = 30) -> list[Row]:
    """Run the three measurements and print them; returns their rows."""
    L.seed_everything(cfg.seed)
    ensure_demos(fit_task(cfg), cfg.data, cfg.demos)
    dm = make_datamodule(cfg)  # low-dim states or point clouds, as the config says
    dm.setup("fit")
    it = endless(dm.train_dataloader())
    batches = [next(it) for _ in range(steps + WARMUP)]
    policy = CSPPolicy(cfg.policy, obs_dim=dm.obs_dim, action_dim=dm.action_dim, goal_dim=dm.goal_dim)
    policy.set_normalization(dm.stats)
    module = CSPModule(policy, cfg.optim)
    params = sum(p.numel() for p in policy.parameters())
    flops = forward_flops_per_sample(policy, batches[0])

    torch.manual_seed(cfg.seed)
    bare = bare_loop(copy.deepcopy(module), batches, cfg.optim.grad_clip)
    torch.manual_seed(cfg.seed)
    light = lightning_loop(copy.deepcopy(module), batches, cfg.optim.grad_clip)
    loader = loader_throughput(dm, steps)
    lat1 = sampling_latency_ms(policy.eval(), batches[0], 1, cfg.eval.sample_steps)
    lat64 = sampling_latency_ms(policy, batches[0], 64, cfg.eval.sample_steps)

    b, w, L_, k = cfg.data.batch_size, cfg.data.num_workers, cfg.policy.chunk_len, cfg.eval.sample_steps
    size = f"width {cfg.policy.width} x {cfg.policy.depth}, chunk {L_}"
    rows = [
        Row("parameters", params, "", size),
        Row("forward FLOPs per sample", flops / 1e6, "MFLOP", "backward costs about twice this"),
        Row("training, bare PyTorch loop", bare, "samples/s", f"batch {b}, {steps} timed steps"),
        Row("training, Lightning", light, "samples/s", f"{light / bare:.3f} x the bare loop"),
        Row("data loader", loader, "samples/s", f"workers {w}: {loader / bare:.1f}x training's consumption"),
        Row("chunk sampling, batch 1", lat1, "ms/call", f"K {k}"),
        Row("chunk sampling, batch 64", lat64, "ms/call", f"K {k}"),
    ]
    print(
        f"tmrl bench pretrain: {params:,} params, {flops / 1e6:.2f} MFLOP forward/sample, batch {b}, "
        f"chunk {L_}, {steps} timed steps, torch threads {torch.get_num_threads()}"
    )
    print(f"  training     bare loop  {bare:10.0f} samples/s")
    print(f"  training     Lightning  {light:10.0f} samples/s   Lightning/bare = {light / bare:.3f}")
    ratio = loader / bare
    print(f"  data loader  workers={w}  {loader:8.0f} samples/s   = {ratio:.1f}x training's consumption")
    print(f"  sampling     K={k}  batch 1: {lat1:.2f} ms/call   batch 64: {lat64:.2f} ms/call")
    return rows


def unit_stats(policy: CSPPolicy) -> dict[str, np.ndarray]:
    """Identity normalization: speed does not depend on the statistics."""
    d_o, d_g, d_a = policy.obs_dim, policy.goal_dim, policy.action_dim
    stats = {"observation_mean": np.zeros(d_o), "observation_std": np.ones(d_o)}
    stats |= {"action_min": -np.ones(d_a), "action_max": np.ones(d_a)}
    if d_g:
        stats |= {"goal_mean": np.zeros(d_g), "goal_std": np.ones(d_g)}
    if "pointcloud_center" in policy.stats_keys:
        stats |= {"pointcloud_center": np.array([0.425, 0.0, 0.1]), "pointcloud_scale": np.array([0.2])}
    if "image_mean" in policy.stats_keys:
        stats |= {"image_mean": np.full(3, 0.5), "image_std": np.full(3, 0.25)}
    return stats


def features_per_s(env, calls: int) -> float:
    """Observations/s of the frozen policy's context encoder (the decoder's ``features``: a PointNet, an
    image backbone) at the env batch, on one fixed observation."""
    env.reset()
    obs = env._observation()
    env.decoder.features(obs)  # first call allocates
    start = time.perf_counter()
    for _ in range(calls):
        env.decoder.features(obs)
    return calls * env.batch_size[0] / (time.perf_counter() - start)


def env_steps_per_s(backend: Backend, steps: int) -> float:
    """The batched env alone (physics only: no clouds), random actions, auto-reset of finished sub-envs."""
    backend.reset()
    rng = np.random.default_rng(0)
    n, live, done = backend.num_envs, np.ones(backend.num_envs, bool), 0
    start = time.perf_counter()
    while done < steps:
        out = backend.step(rng.uniform(-1, 1, (n, backend.action_dim)), live)
        done += n
        finished = out["terminated"] | out["truncated"]
        if finished.any():
            backend.reset(finished)
    return done / (time.perf_counter() - start)


def sensor_per_s(backend: Backend, count: int) -> float:
    """Sensor observations/s of fresh scenes (a point cloud: depth renders, back-projection, crop and
    downsampling); only ``observe`` is timed, not the resets between rounds."""
    rounds, spent = max(1, count // backend.num_envs), 0.0
    for _ in range(rounds):
        backend.reset()
        start = time.perf_counter()
        backend.observe()
        spent += time.perf_counter() - start
    return rounds * backend.num_envs / spent


def sampling_env_steps_per_s(env, exec_horizon: int, calls: int) -> float:
    """The decoder (base-policy chunk sampling) alone at the env batch, in env steps it would serve."""
    env.reset()
    action = env.action_spec.rand()
    obs = env._observation()
    env.decoder(action, obs)  # first call allocates
    start = time.perf_counter()
    for _ in range(calls):
        env.decoder(action, obs)
    return calls * env.batch_size[0] * exec_horizon / (time.perf_counter() - start)


def updates_per_s(p, batch_size: int, count: int = 50) -> float:
    """SAC updates/s of the pipeline's agent on replay batches of ``batch_size`` (sampling included)."""
    from modules.tmrl.loss import update

    for _ in range(WARMUP):
        update(p.loss, p.optimizers, p.sample(batch_size, 0.0))
    start = time.perf_counter()
    for _ in range(count):
        update(p.loss, p.optimizers, p.sample(batch_size, 0.0))
    return count / (time.perf_counter() - start)


def _workers(cfg: FinetuneConfig) -> str:
    c = cfg.collect
    if not c.workers:
        return "none (in-process)"
    where = f"distributed, launcher {c.launcher}" if c.backend == "distributed" else "local"
    return f"{c.workers} ({'sync' if c.sync else 'async'}, {where})"


def bench_finetune(
    cfg: FinetuneConfig, policy_cfg: PolicyConfig, env_steps: int, sensor: Mapping[str, Any] | None = None
) -> list[Row]:
    """Full loop vs its floor (environment + base-policy sampling [+ sensor]) at the config's batch of
    envs; ``sensor``: a task's sensor settings (a point-cloud fit config's demos.cube). Returns the rows."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    threads = torch.get_num_threads()  # the collector's shutdown may change it
    obs_dim, action_dim, goal_dim = cfg.task.task.target_dims(cfg.task)
    sensor = dict(sensor or {})
    base = CSPPolicy(policy_cfg, obs_dim, action_dim, goal_dim=goal_dim, sensor=sensor)
    base.set_normalization(unit_stats(base))
    cfg = dataclasses.replace(cfg, env_steps=env_steps, progress_bar=False)
    cfg.eval.every_env_steps = 0
    n, h = cfg.collect.num_envs, cfg.chunk.exec_horizon
    with tempfile.TemporaryDirectory() as tmp:
        p = build_pipeline(cfg, None if cfg.method == "sac" else base, Path(tmp), sensor=sensor)
        clouds = base.feature_dim > 0  # a sensor rendered once per chunk for the agent's view
        # the env alone on a batch of its own, so the pipeline's env stays as the collector left it
        backend = cfg.task.task.make_backend(cfg.task, n, cfg.seed, sensor)
        r_env = env_steps_per_s(backend, min(env_steps, 2000))
        r_cloud = sensor_per_s(backend, 4 * n) if clouds else float("inf")
        backend.close()
        r_sample = sampling_env_steps_per_s(p.env, h, 50)
        r_feat = features_per_s(p.env, 20) if clouds else float("inf")
        start = time.perf_counter()
        counters = run_loop(cfg, p, RunHooks())
        r_loop = counters["env_steps"] / (time.perf_counter() - start)
        p.collector.shutdown()
        r_update = updates_per_s(p, cfg.agent.batch_size) if len(p.buffer) else float("nan")
    # an env step needs its physics, 1/H of a chunk sample and, on the cube, 1/H of a cloud
    floor = 1.0 / (1.0 / r_env + 1.0 / r_sample + 1.0 / (r_cloud * h))
    a = cfg.agent
    chunks_per_step = 1.0 / h  # high-level transitions per env step (fewer where episodes end mid-chunk)
    need = a.utd_ratio * chunks_per_step * r_loop  # updates/s the loop's collection rate asks for
    agent = f"{a.num_critics} critics x {a.critic_layers} x {a.hidden}, batch {a.batch_size}"
    what = ", ".join(f"{k} {sensor[k]}" for k in ("num_points", "cameras") if k in sensor)
    # seconds making clouds per env step over seconds per env step of the whole loop
    cloud_share = r_loop / (r_cloud * h)
    # the context encoder runs twice per chunk: the agent's features and the chunk sample's condition
    encoder_share = 2 * r_loop / (r_feat * h)
    rows = [Row("environment alone", r_env, "env steps/s", f"physics, {n} sub-envs")]
    if clouds:
        rows.append(Row("sensor alone", r_cloud, "observations/s", f"{what}; one per chunk"))
    rows += [
        Row("chunk sampling alone", r_sample, "env steps/s", f"batch {n}, K {cfg.chunk.sample_steps}"),
        Row("floor (all)", floor, "env steps/s", "an env step needs each of the above"),
        Row("full loop", r_loop, "env steps/s", f"{r_loop / floor:.0%} of the floor; torch threads "
            f"{threads}, collector workers {_workers(cfg)}"),
        Row("SAC updates", r_update, "updates/s", f"{agent}; UTD {a.utd_ratio:g} asks {need:.0f}/s"),
    ]  # fmt: skip
    if clouds:
        rows += [
            Row("the sensor's share of a fine-tuning env step", 100 * cloud_share, "%"),
            Row("context encoder alone", r_feat, "observations/s", f"batch {n}, twice per chunk"),
            Row("the context encoder's share of a fine-tuning env step", 100 * encoder_share, "%"),
        ]
    print(
        f"tmrl bench finetune: {cfg.task.env}, method {cfg.method}, {n} envs, H_exec {h}, "
        f"K {cfg.chunk.sample_steps}, policy width {policy_cfg.width} x {policy_cfg.depth}, "
        f"{counters['env_steps']} env steps ({counters['updates']} updates), torch threads {threads}, "
        f"collector workers {_workers(cfg)}"
    )
    print(f"  environment alone      {r_env:9.0f} env steps/s   (physics)")
    if clouds:
        print(
            f"  sensor alone           {r_cloud:9.1f} observations/s ({what}): "
            f"{r_cloud * h:.0f} env steps/s at one per chunk"
        )
    print(f"  chunk sampling alone   {r_sample:9.0f} env steps/s   (batch {n})")
    print(f"  floor (all)            {floor:9.0f} env steps/s")
    print(f"  full loop              {r_loop:9.0f} env steps/s   = {r_loop / floor:.0%} of the floor")
    print(
        f"  SAC updates            {r_update:9.0f} updates/s     ({agent}); UTD {a.utd_ratio:g} per chunk = "
        f"{need:.0f} updates/s at the loop's rate"
    )
    if clouds:
        print(f"  the sensor's share of a fine-tuning env step: {cloud_share:.0%}")
        print(
            f"  context encoder alone  {r_feat:9.0f} observations/s (batch {n}); twice per chunk, its share "
            f"of a fine-tuning env step: {encoder_share:.0%}"
        )
    return rows
