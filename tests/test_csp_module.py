"""CSPModule: training steps, EMA, and the checkpoint read back by the bare policy class."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch

from datamodules.state import StateDataConfig, StateDataModule
from modules.csp import CSPModule, OptimConfig
from modules.nets.keys import GOAL, OBS
from modules.nets.policy import LIGHTNING_KEY, CSPPolicy, PolicyConfig


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
        [sys.executable, "-c", script], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1])
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
