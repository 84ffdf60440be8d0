"""Fine-tuning over several collector workers: local sync (``MultiSyncCollector``) and TorchRL's
torch.distributed collector on loopback (launcher "mp"), through ``run_loop``; and the refused settings.

The agent learns from scratch (method=sac: no pre-training run needed), so each test is a few seconds of
work beside its workers' start-up. After the run the actor gets a new output layer on its trained trunk,
with a minimal log-std: a worker's action is then tanh(loc(state)) of ITS copy of the weights, which the
learner recomputes. Local workers act on the learner's very weight tensors (TorchRL shares them in
memory); distributed ones on copies that only the weight sync updates."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from app.config import load_config
from app.finetune import FinetuneConfig, RunHooks, _worker_env, build_pipeline, run_loop, state_keys
from modules.nets.keys import ACTION, ENV_STEPS, GOAL, NEXT
from tests.tiny import tiny_config

TINY = ["method=sac", "env_steps=200", "eval.every_env_steps=0", "collect.workers=2"]


class Recording:
    """The collector's batches, recorded on their way to ``run_loop``; one iterator for the whole test (a
    multi-process collector is iterated once)."""

    def __init__(self, collector) -> None:
        self.collector, self.batches = collector, []
        self.it = iter(collector)

    def __iter__(self):
        for batch in self.it:
            self.batches.append(batch.clone())
            yield batch

    def __getattr__(self, name: str):
        return getattr(self.collector, name)


def finetune_tiny(overrides: list[str]):
    """A tiny run through ``run_loop``; returns the config, the pipeline (collector still up) and counters."""
    cfg = load_config(FinetuneConfig, tiny_config("tmrl"), [*TINY, *overrides])
    tmp = tempfile.TemporaryDirectory()
    p = build_pipeline(cfg, None, Path(tmp.name))
    p.collector = Recording(p.collector)
    try:
        counters = run_loop(cfg, p, RunHooks())
    except BaseException:
        p.collector.shutdown()
        raise
    p.tmp = tmp  # removed with the pipeline
    return cfg, p, counters


def perturb(actor) -> None:
    """A new output layer on the trained trunk: minimal log-std whatever the state, so that the actor acts
    tanh(loc(state)), and random loc weights, so that loc spreads over the states."""
    with torch.no_grad():
        out, dim = actor.out, actor.action_dim
        out.weight[dim:].zero_()
        out.bias[dim:] = -1e3
        out.weight[:dim] = 0.3 * torch.randn(
            out.weight[:dim].shape, generator=torch.Generator().manual_seed(0)
        )


def learners_loc(p, batch) -> torch.Tensor:
    state = torch.cat([batch[k] for k in state_keys(p.env)], dim=-1)
    with torch.no_grad():
        action, _ = p.loss.actor(state.reshape(-1, state.shape[-1]), deterministic=True)
    return torch.atanh(action.reshape(batch[ACTION].shape))


def check_counts_and_weights(cfg, p, counters, lag: int) -> None:
    """The counters add up over the batches, and within ``lag`` batches of a weight sync the workers act with
    the learner's new weights (sync: the very next batch; async: batches under way may predate the sync, and
    a worker applies the weights it received in a thread of its own, later on a loaded machine)."""
    batches = p.collector.batches
    assert counters["env_steps"] >= cfg.env_steps and counters["updates"] > 0
    assert counters["env_steps"] == sum(int(b[NEXT, ENV_STEPS].sum()) for b in batches)
    assert counters["chunks"] == sum(b.numel() for b in batches)
    perturb(p.loss.actor)
    p.collector.update_policy_weights_()
    gaps = []
    for _ in range(lag + 1):
        new = next(p.collector.it)
        loc = learners_loc(p, new)
        inside = loc.abs() < 2.5  # where tanh does not saturate in float32
        assert loc[inside].std() > 0.3 and inside.float().mean() > 0.5  # the check below tells weights apart
        # the worker's pre-tanh action is loc + exp(-5) * noise: its weights are the learner's
        gaps.append(float((torch.atanh(new[ACTION][inside]) - loc[inside]).abs().max()))
        if gaps[-1] < 0.05:
            return
    raise AssertionError(f"no batch of the {lag + 1} after the sync acted with the new weights: {gaps}")


def test_sync_workers_each_give_a_sub_batch_and_act_with_the_learners_weights():
    cfg, p, counters = finetune_tiny(["collect.sync=true"])
    try:
        per_worker = cfg.collect.num_envs * cfg.collect.chunks_per_batch
        first = p.collector.batches[0]
        assert all(b.shape[0] == 2 and b[0].numel() == per_worker for b in p.collector.batches)
        c = cfg.chunk
        for i in range(2):  # sub-batch i is worker i's, on its own seed stream
            env = _worker_env(i, cfg.seed, task=cfg.task, num_envs=cfg.collect.num_envs, policy=None,
                              method="sac", exec_horizon=c.exec_horizon)  # fmt: skip
            assert torch.equal(first[i][:, 0][GOAL], env.reset()[GOAL])
        assert not torch.equal(first[0][GOAL], first[1][GOAL])
        check_counts_and_weights(cfg, p, counters, lag=0)  # sync: the very next batch has the new weights
    finally:
        p.collector.shutdown()


@pytest.mark.parametrize("sync", [True, False])
def test_distributed_workers_on_loopback_act_with_the_learners_weights(sync):
    cfg, p, counters = finetune_tiny(["collect.backend=distributed", f"collect.sync={str(sync).lower()}"])
    try:
        assert type(p.collector.collector).__name__ == "WatchedDistributedCollector"
        # the workers hold copies: the weights reach them through the weight sync alone, as on other nodes
        assert not any(t.is_shared() for t in p.loss.actor.parameters())
        assert len(p.collector.procs) == 2 and all(proc.is_alive() for proc in p.collector.procs)
        goals = torch.cat([b[GOAL].reshape(-1, b[GOAL].shape[-1]) for b in p.collector.batches])
        if sync:  # every batch holds both workers' envs (async: whichever worker is done first, which on
            # a loaded machine can be the same one for the few batches of this budget)
            assert len(torch.unique(goals, dim=0)) > cfg.collect.num_envs
        check_counts_and_weights(cfg, p, counters, lag=0 if sync else 8)
    finally:
        p.collector.shutdown()
    assert not any(proc.is_alive() for proc in p.collector.procs)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("collect.backend=ray", "collect.backend='ray'; expected one of ['local', 'distributed']"),
        ("collect.launcher=slurm", "collect.launcher='slurm'; expected one of ['mp', 'submitit']"),
        ("collect.tcp_port=80", "collect.tcp_port must be 0 (free) or in [1024, 65533], got 80"),
        ("collect.sync=maybe", "collect.sync"),
        ("collect.workers=0 collect.sync=true", "collect.sync=true needs collect.workers >= 1"),
        (
            "collect.workers=0 collect.backend=distributed",
            "collect.backend=distributed needs collect.workers",
        ),
        ("collect.launcher=submitit", "collect.launcher=submitit needs collect.backend=distributed"),
    ],
)
def test_bad_collect_settings_are_refused_naming_the_key(override, message):
    with pytest.raises(Exception, match="collect") as err:
        load_config(FinetuneConfig, tiny_config("tmrl"), override.split())
    assert message in str(err.value)
