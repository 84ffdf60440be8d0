"""Factories of the high-level TMRL agent: its action layout, regularizer, loss and collector policy.

The settings come as any object with the attributes of :class:`AgentSettings` (the app's ``AgentConfig``
is one), and the decoder's facts as plain values (its flat action layout ``sizes``, ``sigma_max`` and
whether it runs the base policy), so this package depends on no app-side type.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

import torch
from torchrl.envs.utils import ExplorationType, exploration_type

from modules.tmrl.actor import ChunkActor, HeadSpec
from modules.tmrl.critic import CriticEnsemble
from modules.tmrl.loss import TMRLLoss


class AgentSettings(Protocol):
    """What the factories read of the agent's settings (field meanings: the app's ``AgentConfig``)."""

    hidden: int  # width of every actor and critic hidden layer
    actor_layers: int
    init_std: float | None  # pre-tanh std of the non-sigma heads at the start (None: the SAC default)
    sigma_init: float  # median sigma of the sigma head at the start, in sigma units
    sigma_init_std: float  # pre-tanh std of the sigma head at the start
    regularizer: str  # "entropy", "prior" or "auto" (prior for decoders that run the base policy)
    autotune_alpha: bool
    target_entropy_per_dim: float  # entropy target per dim of the z / eps_c / raw heads ("entropy")
    target_entropy_sigma: float  # entropy target of the sigma head ("entropy")
    target_kl_per_dim: float  # KL budget per dim of the z / eps_c / raw heads ("prior"), >= 0
    target_kl_sigma: float  # KL budget of the sigma head ("prior"), >= 0
    critic_layers: int
    num_critics: int
    gamma: float  # discount per ENVIRONMENT step
    tau: float  # Polyak rate of the target critics
    init_alpha: float
    entropy_in_target: bool


def regularizer(cfg: AgentSettings, *, uses_base: bool) -> str:
    """The actor's regularizer: ``cfg.regularizer``, with "auto" = "prior" when the decoder runs the base
    policy (``uses_base``) and "entropy" otherwise (raw-action SAC / RLPD)."""
    if cfg.regularizer != "auto":
        return cfg.regularizer
    return "prior" if uses_base else "entropy"


def head_specs(
    sizes: Mapping[str, int], cfg: AgentSettings, *, sigma_max: float, uses_base: bool
) -> list[HeadSpec]:
    """The high-level action layout: one tanh-Gaussian head per part of the decoder's flat action.

    Args:
        sizes: the decoder's flat action layout, head name -> dims, in order (e.g. ``{"z": 2, "sigma": 1,
            "eps_c": 2}``; the raw-action decoder of "sac" is one head, ``{"action": H * d_a}``).
        cfg: the entropy targets (or minus the KL budgets, for the "prior" regularizer) and the sigma
            head's initial distribution (median ``cfg.sigma_init``, in sigma units).
        sigma_max: the decoder's sigma range, sigma = sigma_max * (tanh(loc) + 1) / 2 (read only when
            ``sizes`` has a "sigma" head).
        uses_base: whether the decoder runs the base policy (resolves ``cfg.regularizer`` "auto").

    Raises:
        ValueError: ``cfg.sigma_init`` outside (0, sigma_max) with a "sigma" head.
    """
    kl = regularizer(cfg, uses_base=uses_base) == "prior"
    per_dim = -cfg.target_kl_per_dim if kl else cfg.target_entropy_per_dim
    sigma_target = -cfg.target_kl_sigma if kl else cfg.target_entropy_sigma
    heads = []
    for name, dim in sizes.items():
        if name == "sigma":
            u = 2.0 * cfg.sigma_init / sigma_max - 1.0  # sigma = sigma_max * (tanh(loc) + 1) / 2
            if not -1.0 < u < 1.0:
                raise ValueError(
                    f"agent.sigma_init={cfg.sigma_init} must lie inside (0, chunk.sigma_max={sigma_max})"
                )
            heads.append(HeadSpec(name, dim, sigma_target, math.atanh(u), cfg.sigma_init_std))
        else:
            heads.append(HeadSpec(name, dim, per_dim * dim))
    return heads


class ActorPolicy(torch.nn.Module):
    """The actor as the collector's policy: samples while exploring, tanh(mean) when deterministic."""

    def __init__(self, actor: ChunkActor) -> None:
        super().__init__()
        self.actor = actor

    def forward(self, *state: torch.Tensor) -> torch.Tensor:
        """``state``: the state tensors (B, d_i) (observation, goal[, context feature]), concatenated in
        that order; returns the high-level action (B, D) in [-1, 1]."""
        deterministic = exploration_type() == ExplorationType.DETERMINISTIC
        action, _ = self.actor(torch.cat(state, dim=-1), deterministic=deterministic)
        return action


def make_agent(
    state_dim: int, heads: list[HeadSpec], cfg: AgentSettings, regularizer: str = "entropy"
) -> TMRLLoss:
    """The actor, the critic ensemble and their SAC loss, for states (B, state_dim) and the flat action
    (B, sum of the heads' dims); ``regularizer``: see ``ChunkActor``."""
    names = [h.name for h in heads]
    sigma_index = sum(h.dim for h in heads[: names.index("sigma")]) if "sigma" in names else None
    actor = ChunkActor(
        state_dim,
        heads,
        hidden=cfg.hidden,
        layers=cfg.actor_layers,
        init_std=cfg.init_std,
        regularizer=regularizer,
    )
    critic = CriticEnsemble(
        state_dim,
        sum(h.dim for h in heads),
        num_critics=cfg.num_critics,
        hidden=cfg.hidden,
        layers=cfg.critic_layers,
        sigma_index=sigma_index,
    )
    return TMRLLoss(
        actor,
        critic,
        heads,
        gamma=cfg.gamma,
        init_alpha=cfg.init_alpha,
        entropy_in_target=cfg.entropy_in_target,
        tau=cfg.tau,
        autotune_alpha=cfg.autotune_alpha,
    )
