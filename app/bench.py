"""`tmrl bench pretrain`: where pre-training time goes, measured in one run on this machine.

1. Training samples/s through Lightning vs a bare PyTorch loop on the same model, the same initial
   weights and the same pre-drawn batches (the ratio is Lightning's overhead).
2. Data-loader throughput (samples/s) vs what training consumes.
3. Chunk-sampling latency of the policy (K Euler steps) at batch 1 and 64, and forward FLOPs per sample.
"""

from __future__ import annotations

import copy
import statistics
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from app.pretrain import ensure_demos
from app.schema import FitConfig
from datamodules.state import StateDataModule
from modules.csp import CSPModule
from modules.nets.keys import ACTION
from modules.nets.policy import CSPPolicy

WARMUP = 3  # untimed steps: first-call allocations and thread-pool start-up


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
        module.on_train_batch_end()
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


def loader_throughput(dm: StateDataModule, n_batches: int) -> float:
    """Samples/s the training DataLoader delivers (workers as configured)."""
    it = iter(dm.train_dataloader())
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


def bench_pretrain(cfg: FitConfig, steps: int = 30) -> dict[str, float]:
    """Run the three measurements and print them; returns the figures."""
    L.seed_everything(cfg.seed)
    ensure_demos(cfg.data, cfg.demos)
    dm = StateDataModule(cfg.data, chunk_len=cfg.policy.chunk_len, seed=cfg.seed)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
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

    figures = {
        "params": params,
        "forward_mflop_per_sample": flops / 1e6,
        "bare_samples_per_s": bare,
        "lightning_samples_per_s": light,
        "lightning_over_bare": light / bare,
        "loader_samples_per_s": loader,
        "loader_over_training": loader / bare,
        "sample_ms_batch1": lat1,
        "sample_ms_batch64": lat64,
    }
    b, w, L_ = cfg.data.batch_size, cfg.data.num_workers, cfg.policy.chunk_len
    print(
        f"tmrl bench pretrain: {params:,} params, {flops / 1e6:.2f} MFLOP forward/sample, batch {b}, "
        f"chunk {L_}, {steps} timed steps, torch threads {torch.get_num_threads()}"
    )
    print(f"  training     bare loop  {bare:10.0f} samples/s")
    print(f"  training     Lightning  {light:10.0f} samples/s   Lightning/bare = {light / bare:.3f}")
    ratio = loader / bare
    print(f"  data loader  workers={w}  {loader:8.0f} samples/s   = {ratio:.1f}x training's consumption")
    k = cfg.eval.sample_steps
    print(f"  sampling     K={k}  batch 1: {lat1:.2f} ms/call   batch 64: {lat64:.2f} ms/call")
    return figures
