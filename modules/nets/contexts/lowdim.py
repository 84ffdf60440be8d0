"""Low-dimensional context modes: the goal alone, or the whole observation (observation ++ goal)."""

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from modules.nets.contexts.base import ContextMode
from modules.nets.encoders import ENCODERS

if TYPE_CHECKING:
    from modules.nets.policy import PolicyConfig


class GoalContext(ContextMode):
    """context_mode "goal": the goal is noised, the observation stays clean; needs goal_dim > 0.

    clean part: obs_n (B, d_o) through ``ENCODERS[cfg.encoder]``; noised part: goal_n (B, d_g), eps_c
    (B, d_g), through another encoder of the same kind. No agent features (feature_dim 0).
    """

    def __init__(self, cfg: "PolicyConfig", obs_dim: int, goal_dim: int) -> None:
        if goal_dim == 0:
            raise ValueError(
                "PolicyConfig.context_mode='goal' needs goal_dim > 0; use 'observation' for goal-free tasks"
            )
        super().__init__(cfg, obs_dim, goal_dim)
        encoder = ENCODERS[cfg.encoder]
        self.clean_encoder = encoder(obs_dim, cfg.width, cfg.width)
        self.noised_encoder = encoder(goal_dim, cfg.width, cfg.width)
        self.noise_shape = (goal_dim,)
        self.feature_dim = 0

    def split(self, batch: Mapping[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(obs_n (B, d_o), goal_n (B, d_g))."""
        return self.low_dim(batch, dtype)


class ObservationContext(ContextMode):
    """context_mode "observation": the whole low-dim observation obs_n ++ goal_n (B, d_o + d_g) is noised.

    No clean part; one ``ENCODERS[cfg.encoder]`` encoder; eps_c (B, d_o + d_g); no agent features.
    """

    def __init__(self, cfg: "PolicyConfig", obs_dim: int, goal_dim: int) -> None:
        super().__init__(cfg, obs_dim, goal_dim)
        self.clean_encoder = None
        self.noised_encoder = ENCODERS[cfg.encoder](obs_dim + goal_dim, cfg.width, cfg.width)
        self.noise_shape = (obs_dim + goal_dim,)
        self.feature_dim = 0

    def split(self, batch: Mapping[str, Tensor], dtype: torch.dtype) -> tuple[None, Tensor]:
        """(None, obs_n ++ goal_n (B, d_o + d_g))."""
        o_n, g_n = self.low_dim(batch, dtype)
        return None, o_n if g_n is None else torch.cat([o_n, g_n], dim=-1)
