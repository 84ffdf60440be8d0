"""CSPModule: training steps, EMA, and the checkpoint read back by the bare policy class."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.state import StateDataConfig, StateDataModule
from modules.csp import CSPModule, OptimConfig
from modules.nets.checkpoint import LIGHTNING_KEY, upgrade_v1_state_dict
from modules.nets.keys import ACTION, GOAL, OBS
from modules.nets.policy import CSPPolicy, PolicyConfig

V1_CKPT = (
    Path(__file__).resolve().parents[1] / "data" / "lightning_v1.ckpt"
)  # see tests/data/make_v1_fixtures.py


def tiny_module(store, ema_decay=0.9) -> tuple[CSPModule, StateDataModule]:
    dm = StateDataModule(StateDataConfig(path=str(store.path), batch_size=8, val_fraction=0.2), chunk_len=4)
    dm.setup("fit")
    policy = CSPPolicy(PolicyConfig(chunk_len=4, width=32, depth=1, heads=2, sample_steps=2), 3, 2, 2)
    policy.set_normalization(dm.stats)
    return CSPModule(policy, OptimConfig(lr=1e-3, ema_decay=ema_decay)), dm


def fit_tiny(module, dm, tmp_path, steps=6) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=2,
        val_check_interval=3,
        check_val_every_n_epoch=None,
        gradient_clip_val=1.0,
    )
    trainer.fit(module, datamodule=dm)
    return trainer


def test_training_changes_weights_and_ema_lags_behind(synthetic_store, tmp_path):
    module, dm = tiny_module(synthetic_store)
    before = [p.detach().clone() for p in module.policy.parameters()]
    trainer = fit_tiny(module, dm, tmp_path)
    assert trainer.global_step == 6
    after = list(module.policy.parameters())
    ema = list(module.ema.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    # the EMA moved off the initial weights but is not the live weights
    assert any(not torch.equal(b, e) for b, e in zip(before, ema, strict=True))
    assert any(not torch.equal(a, e) for a, e in zip(after, ema, strict=True))
    assert all(not p.requires_grad for p in module.ema.parameters())
    assert "val/loss" in trainer.callback_metrics and torch.isfinite(trainer.callback_metrics["val/loss"])


def test_checkpoint_reloads_into_the_bare_policy_without_lightning(synthetic_store, tmp_path):
    module, dm = tiny_module(synthetic_store)
    trainer = fit_tiny(module, dm, tmp_path)
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    assert LIGHTNING_KEY in torch.load(ckpt, weights_only=True)

    torch.manual_seed(1)
    obs = {OBS: torch.randn(5, 3), GOAL: torch.randn(5, 2)}
    z, eps = torch.randn(5, 4, 2), torch.randn(5, 2)
    expected = module.ema.sample(obs, 0.3, action_noise=z, context_noise=eps)
    torch.save({"obs": obs, "z": z, "eps": eps}, tmp_path / "inputs.pt")

    script = textwrap.dedent(f"""
        import sys, torch
        from modules.nets.policy import CSPPolicy
        policy = CSPPolicy.load({str(ckpt)!r})
        d = torch.load({str(tmp_path / "inputs.pt")!r})
        out = policy.sample(d["obs"], 0.3, action_noise=d["z"], context_noise=d["eps"])
        torch.save(out, {str(tmp_path / "out.pt")!r})
        loaded = set(m.split(".")[0] for m in sys.modules)
        assert not loaded & set(["lightning", "pytorch_lightning"]), "the bare policy pulled in Lightning"
    """)
    subprocess.run(
        [sys.executable, "-c", script], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[2])
    )
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_validation_loss_is_deterministic_for_fixed_weights(synthetic_store):
    module, dm = tiny_module(synthetic_store)
    batch = next(iter(dm.val_dataloader()))
    module.log = lambda *a, **k: None  # outside a Trainer
    torch.manual_seed(0)
    first = module.validation_step(batch, 0)
    torch.manual_seed(123)
    second = module.validation_step(batch, 0)
    assert torch.equal(first, second)


def test_sigma_max_bounds_the_training_noise_levels_and_zero_is_plain_bc(synthetic_store):
    seen = []
    for sigma_max in (0.0, 0.3):
        module, dm = tiny_module(synthetic_store)
        module.optim = OptimConfig(lr=1e-3, ema_decay=0.9, sigma_max=sigma_max)
        batch = next(iter(dm.train_dataloader()))
        loss = module.policy.loss
        module.policy.loss = lambda b, loss=loss, **kw: seen.append(kw["sigma"]) or loss(b, **kw)
        module.training_step(batch, 0)
    bc, csp = seen
    assert torch.equal(bc, torch.zeros_like(bc))  # plain BC: the context is never noised in training
    assert 0.0 < csp.max() <= 0.3 and csp.std() > 0  # U[0, sigma_max]
    with pytest.raises(ValueError, match="optim.sigma_max"):
        OptimConfig(sigma_max=1.5)


class _Windows(torch.utils.data.Dataset):
    """16 random windows for the v1 fixture's policy: d_o 5, d_g 2, L 4, d_a 3."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(7)
        self.rows = [
            {
                OBS: torch.randn(5, generator=g),
                GOAL: torch.randn(2, generator=g),
                ACTION: torch.rand(4, 3, generator=g),
            }
            for _ in range(16)
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def resume_v1(tmp_path, max_steps: int, ckpt_path=V1_CKPT) -> tuple[CSPModule, L.Trainer]:
    policy = CSPPolicy.load(V1_CKPT).train()  # architecture (and EMA weights) from its tmrl_policy entry
    module = CSPModule(policy, OptimConfig(lr=1e-3, ema_decay=0.9))
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(_Windows(), batch_size=8), ckpt_path=ckpt_path)
    return module, trainer


def test_a_version_1_lightning_state_dict_converts_to_the_module_layout():
    ckpt = torch.load(V1_CKPT, weights_only=True)
    assert ckpt[LIGHTNING_KEY]["version"] == 1 and "policy.obs_norm.mean" in ckpt["state_dict"]
    module = CSPModule(CSPPolicy.load(V1_CKPT), OptimConfig())
    converted = upgrade_v1_state_dict(ckpt["state_dict"], ("policy.", "ema."))
    assert set(converted) == set(module.state_dict())
    assert (
        "policy.context.clean_encoder.net.0.weight" in converted and "ema.context.goal_norm.std" in converted
    )
    module.load_state_dict(converted)  # strict
    # the EMA half is the policy the Lightning checkpoint carries for the bare class
    for key, value in CSPPolicy.load(V1_CKPT).state_dict().items():
        assert torch.equal(module.ema.state_dict()[key], value), key


def test_fit_resumes_from_a_version_1_lightning_checkpoint(tmp_path):
    ckpt = torch.load(V1_CKPT, weights_only=True)
    converted = upgrade_v1_state_dict(ckpt["state_dict"], ("policy.", "ema."))
    module, trainer = resume_v1(tmp_path, max_steps=ckpt["global_step"])  # restores, trains no step
    assert trainer.global_step == 2
    assert all(torch.equal(v, converted[k]) for k, v in module.state_dict().items())
    assert trainer.optimizers[0].state  # AdamW moments restored, in the old parameter order
    for p in module.policy.parameters():
        assert trainer.optimizers[0].state[p]["exp_avg"].shape == p.shape

    module, trainer = resume_v1(tmp_path, max_steps=3)  # one more step from the old checkpoint
    assert trainer.global_step == 3
    assert not torch.equal(module.policy.net.pos_embed, converted["policy.net.pos_embed"])
    trainer.save_checkpoint(tmp_path / "v2.ckpt")  # and the version-2 checkpoint resumes as it is
    assert torch.load(tmp_path / "v2.ckpt", weights_only=True)[LIGHTNING_KEY]["version"] == 2
    _, trainer = resume_v1(tmp_path, max_steps=4, ckpt_path=tmp_path / "v2.ckpt")
    assert trainer.global_step == 4


def test_an_unreadable_lightning_checkpoint_is_refused(tmp_path):
    module = CSPModule(CSPPolicy.load(V1_CKPT), OptimConfig())
    ckpt = torch.load(V1_CKPT, weights_only=True)
    ckpt[LIGHTNING_KEY]["version"] = 7
    with pytest.raises(ValueError, match=r"policy checkpoint version 7; this code reads versions \[1, 2\]"):
        module.on_load_checkpoint(ckpt)
    with pytest.raises(ValueError, match="has no 'tmrl_policy' entry"):
        module.on_load_checkpoint({"state_dict": {}})


def test_ranks_draw_independent_step_noise_that_a_resume_draws_again(synthetic_store, monkeypatch):
    """Under several processes one seed would give every rank the same sigma, flow time and action noise
    for its share of the batch: the step's draws come from (seed, step, rank) instead."""
    module, _ = tiny_module(synthetic_store)

    def draws(rank: int, step: int, world: int = 2) -> torch.Tensor:
        trainer = type("T", (), {"world_size": world, "global_rank": rank})()
        monkeypatch.setattr(module, "_trainer", trainer)
        monkeypatch.setattr(CSPModule, "global_rank", property(lambda self: rank))
        monkeypatch.setattr(CSPModule, "global_step", property(lambda self: step))
        module._seed_step()
        return torch.rand(4)

    assert not torch.equal(draws(0, 5), draws(1, 5))  # ranks differ at the same step
    assert not torch.equal(draws(0, 5), draws(0, 6))  # steps differ on one rank
    assert torch.equal(draws(1, 5), draws(1, 5))  # a resumed step draws what it drew before
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(draws(0, 5, world=1), expected)  # one process: the global RNG, untouched
