"""CSPModule: the LightningModule that pre-trains a CSPPolicy with context smoothing.

It wraps the policy (it does not subclass it): the loss, the forward noising and sampling all live in
``modules.nets.policy``, so the fine-tuning stage loads the very same class from the checkpoint with no
Lightning import. This module adds what training needs: the optimizer, an EMA of the weights (used for
validation, evaluation and export), and, inside every Lightning checkpoint, the policy's own checkpoint dict
under ``"tmrl_policy"`` and the random number generators' states under ``"rng"``: a fit resumed from it
draws the noise the uninterrupted one would have (its data order is the data module's, see
datamodules/state.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch

from modules.nets.checkpoint import LIGHTNING_KEY, READABLE_VERSIONS, upgrade_v1_state_dict
from modules.nets.policy import CSPPolicy
from modules.rng import rng_states, set_rng_states

RNG_KEY = "rng"


class DivergedError(ValueError):
    """Training met a NaN or Inf loss (or weights): it stops there, before saving the step, so the
    checkpoints on disk hold the steps before it."""


@dataclass
class OptimConfig:
    """AdamW, gradient clipping and EMA settings."""

    lr: float = 3e-4
    weight_decay: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.95, 0.999])
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    ema_decay: float = 0.999  # 0 disables the EMA (the EMA copy then tracks the weights exactly)
    # training context-noise levels sigma ~ U[0, sigma_max]; 0 trains plain BC (no context smoothing),
    # the baseline CSP is compared with
    sigma_max: float = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip must be >= 0, got {self.grad_clip}")
        if not 0.0 <= self.sigma_max <= 1.0:
            raise ValueError(f"optim.sigma_max must be in [0, 1], got {self.sigma_max}")


class CSPModule(L.LightningModule):
    """Pre-trains ``policy`` on demonstration windows; ``ema`` is the copy used for evaluation."""

    def __init__(self, policy: CSPPolicy, optim: OptimConfig, seed: int = 0) -> None:
        super().__init__()
        self.policy = policy
        self.optim = optim
        self.seed = seed
        self.ema = copy.deepcopy(policy).requires_grad_(False)
        self._batch: dict[str, torch.Tensor] | None = None  # the training step's, for update_ema

    def _sigma(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training noise levels (B,) ~ U[0, optim.sigma_max]."""
        actions = batch["action"]
        return self.optim.sigma_max * torch.rand(actions.shape[0], device=actions.device)

    def _seed_step(self) -> None:
        """Several processes: the step's noise (sigma, flow time, action noise) from (seed, step, rank), so
        the ranks draw independent noise for their shares of the batch (one seed would give every rank the
        same draws), and a resumed fit draws what the uninterrupted one would have on every rank."""
        if self._trainer is None or self.trainer.world_size == 1:
            return  # one process: the global RNG, whose state a checkpoint saves and restores
        key = np.random.SeedSequence([self.seed, self.global_step, self.global_rank])
        torch.manual_seed(int(key.generate_state(1, np.uint64)[0]))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self._seed_step()
        loss = self.policy.loss(batch, sigma=self._sigma(batch))
        if not torch.isfinite(loss):  # raised before the optimizer step and the step's checkpoint
            raise DivergedError(
                f"train/loss is {loss.item()} at training step {self.global_step}: stopped; "
                "checkpoints/last.ckpt holds the last step saved before it (lower optim.lr or check the data)"
            )
        # the mean over all ranks' shares of the batch (one process: the batch's mean)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["action"]))
        self._batch = batch
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        # the EMA moves here, not in on_train_batch_end: callbacks' on_train_batch_end (the checkpoints)
        # run before the module's, and a checkpoint must hold the EMA of the step it records
        super().optimizer_step(*args, **kwargs)
        self.update_ema(self._batch)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # fixed noise per batch index, so val/loss moves only when the (EMA) weights do
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_idx)
            loss = self.ema.loss(batch, sigma=self._sigma(batch))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["action"]))
        return loss

    @torch.no_grad()
    def update_ema(self, batch: dict[str, torch.Tensor]) -> None:
        """One EMA step towards the trained weights, after an optimizer step on ``batch``."""
        ema_params = list(self.ema.parameters())
        params = [p.detach() for p in self.policy.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.optim.ema_decay)
        # running statistics (an image embedding's) must be those of the EMA's OWN features: its weights
        # lag the trained ones, so it tracks them on the batch itself (a forward of its encoder, no grad)
        self.ema.track_statistics(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.policy.parameters(),
            lr=self.optim.lr,
            weight_decay=self.optim.weight_decay,
            betas=tuple(self.optim.betas),
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the bare policy class reads this key: no Lightning needed to load a pre-trained policy
        checkpoint[LIGHTNING_KEY] = self.ema.to_checkpoint()
        checkpoint[RNG_KEY] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Before Lightning loads ``checkpoint["state_dict"]``: rename a version-1 policy's keys, and
        restore the RNG states saved with it.

        The version is that of the policy checkpoint under ``LIGHTNING_KEY``; version 1 held the context's
        modules at the policy's top level ("policy.obs_norm.*", "ema.clean_encoder.*", ...).
        """
        if LIGHTNING_KEY not in checkpoint:
            raise ValueError(
                f"Lightning checkpoint has no {LIGHTNING_KEY!r} entry: it was not written by CSPModule "
                f"(found keys {sorted(checkpoint)})"
            )
        version = checkpoint[LIGHTNING_KEY].get("version")
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"Lightning checkpoint holds policy checkpoint version {version!r}; this code reads "
                f"versions {list(READABLE_VERSIONS)}"
            )
        if version == 1:
            checkpoint["state_dict"] = upgrade_v1_state_dict(checkpoint["state_dict"], ("policy.", "ema."))
        if RNG_KEY in checkpoint:  # checkpoints written before RNG states were saved resume without them
            set_rng_states(checkpoint[RNG_KEY])
