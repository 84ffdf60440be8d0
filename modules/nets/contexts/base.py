"""The contract every context mode of ``CSPPolicy`` fulfils (``PolicyConfig.context_mode``).

A context mode decides what the policy conditions on and which part of it is noised (METHOD.md
section 1). It owns the normalizers of its inputs, the encoder of the clean part (or none), the encoder
of the part to be noised, and the shape of the noise eps_c; ``CSPPolicy`` adds the noising itself
(``modules.nets.schedule.noise_context``), the flow transformer, the action normalizer and checkpoints.
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from modules.nets.keys import GOAL, OBS
from modules.nets.normalizer import ZScore

if TYPE_CHECKING:
    from modules.nets.policy import PolicyConfig


def fetch(batch: Mapping[str, Tensor], key: str, dim: int, dtype: torch.dtype) -> Tensor:
    """``batch[key]`` as (B, dim) in ``dtype``, or raise ValueError naming the key."""
    if key not in batch:
        raise ValueError(f"batch has no key {key!r}; got keys {sorted(batch)}")
    value = batch[key]
    if not isinstance(value, Tensor) or value.ndim != 2 or value.shape[1] != dim:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"batch[{key!r}] is {shape}; expected a tensor of shape (B, {dim})")
    return value.to(dtype)


def check_rows(part: Tensor, key: str, rows: int) -> None:
    """Raise ValueError unless ``part`` (from ``batch[key]``) has as many rows as batch[OBS]."""
    if part.shape[0] != rows:
        raise ValueError(f"batch[{key!r}] has {part.shape[0]} rows but batch[{OBS!r}] has {rows}")


class ContextMode(nn.Module, ABC):
    """One way to turn a raw batch into the policy's condition features.

    Every mode reads the low-dimensional observation batch[OBS] (B, d_o) and, when goal_dim > 0, the
    goal batch[GOAL] (B, d_g), each through a ZScore normalizer (``obs_norm``, ``goal_norm``) held here.

    A subclass calls ``super().__init__`` and then sets, in this order (parameter order is checkpoint and
    optimizer-state order):
        clean_encoder: (B, d_clean) -> (B, F_clean) of the clean part, or None when everything is noised.
        noised_encoder: (B, *noise_shape) -> (B, F_noised) of the (noised) part; needs ``out_dim``.
        noise_shape: per-sample shape of the normalized part to be noised; eps_c is its flat version.
        feature_dim: size of ``features`` (the noised-part encoder's output on the CLEAN part), which a
            fine-tuning agent sees instead of a high-dimensional context; 0 when the agent sees the raw
            observation instead.
    and may extend ``input_keys`` and ``stats_keys``. It implements ``split`` and may override
    ``check_config`` and ``set_stats`` (calling the base's).

    Args:
        cfg: the policy's config (``cfg.context_mode`` names this mode).
        obs_dim: d_o, size of batch[OBS].
        goal_dim: d_g, size of batch[GOAL]; 0 when the task has no goal.
    """

    clean_encoder: nn.Module | None
    noised_encoder: nn.Module
    noise_shape: tuple[int, ...]
    feature_dim: int

    def __init__(self, cfg: "PolicyConfig", obs_dim: int, goal_dim: int) -> None:
        super().__init__()
        self.mode = cfg.context_mode
        self.obs_dim, self.goal_dim = obs_dim, goal_dim
        self.obs_norm = ZScore(obs_dim, OBS)
        self.goal_norm = ZScore(goal_dim, GOAL) if goal_dim > 0 else None
        self.input_keys: tuple[str, ...] = (OBS, GOAL) if goal_dim > 0 else (OBS,)
        self.stats_keys: frozenset[str] = frozenset(
            {"observation_mean", "observation_std"} | ({"goal_mean", "goal_std"} if goal_dim > 0 else set())
        )

    @classmethod
    def check_config(cls, cfg: "PolicyConfig") -> None:
        """Validate (and normalize in place) the config fields of this mode; raise ValueError naming them.

        The default, for modes without a point cloud: ``num_points`` must be 0.
        """
        if cfg.num_points != 0:
            raise ValueError(
                f"PolicyConfig.num_points={cfg.num_points} with context_mode={cfg.context_mode!r}; "
                "num_points must be >= 1 with context_mode='pointcloud' and 0 otherwise"
            )

    @property
    def context_dim(self) -> int:
        """d_c, the size of the flat noise eps_c: the product of ``noise_shape``."""
        return math.prod(self.noise_shape)

    @property
    def condition_dim(self) -> int:
        """F, the size of ``encode``'s output: the clean encoder's width (if any) plus the noised one's."""
        encoders = (self.clean_encoder, self.noised_encoder)
        return sum(encoder.out_dim for encoder in encoders if encoder is not None)

    def set_stats(self, stats: Mapping[str, np.ndarray | Tensor]) -> None:
        """Set the normalizers from ``stats``, which holds (at least) the names in ``stats_keys``."""
        self.obs_norm.set_stats(stats["observation_mean"], stats["observation_std"])
        if self.goal_norm is not None:
            self.goal_norm.set_stats(stats["goal_mean"], stats["goal_std"])

    def low_dim(self, batch: Mapping[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """Normalized (observation (B, d_o), goal (B, d_g) or None when goal_dim = 0) of a raw batch."""
        o_n = self.obs_norm.normalize(fetch(batch, OBS, self.obs_dim, dtype))
        if self.goal_norm is None:
            return o_n, None
        g_n = self.goal_norm.normalize(fetch(batch, GOAL, self.goal_dim, dtype))
        check_rows(g_n, GOAL, o_n.shape[0])
        return o_n, g_n

    @abstractmethod
    def split(self, batch: Mapping[str, Tensor], dtype: torch.dtype) -> tuple[Tensor | None, Tensor]:
        """Normalized (clean part (B, d_clean) or None, part to be noised (B, *noise_shape)) of a raw batch.

        Reads ``input_keys``; raises ValueError naming a missing or misshapen key.
        """

    def track_statistics(self, batch: Mapping[str, Tensor], dtype: torch.dtype) -> None:
        """Update running statistics from a raw batch (modes with data-tracked normalization); none here."""

    def encode(self, clean: Tensor | None, noised: Tensor) -> Tensor:
        """Condition features (B, F): clean_encoder(clean) ++ noised_encoder(noised), ``split``'s layout."""
        features = self.noised_encoder(noised)
        if clean is None:
            return features
        return torch.cat([self.clean_encoder(clean), features], dim=-1)

    def features(self, batch: Mapping[str, Tensor], dtype: torch.dtype) -> Tensor:
        """(B, feature_dim): the noised-part encoder on the CLEAN part (sigma = 0) of a raw batch."""
        if self.feature_dim == 0:
            raise ValueError(
                f"context_mode={self.mode!r} has no context features (feature_dim 0): a fine-tuning agent "
                "sees the raw observation; only a mode with feature_dim > 0 (e.g. 'pointcloud') has them"
            )
        return self.noised_encoder(self.split(batch, dtype)[1])
