"""The point-cloud context mode: a noised, normalized xyz cloud encoded by a PointNet."""

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from modules.nets.contexts.base import ContextMode, check_rows
from modules.nets.encoders import ENCODERS
from modules.nets.keys import POINTCLOUD
from modules.nets.pointnet import PointCloudNorm, PointNetEncoder, check_cloud, check_widths

if TYPE_CHECKING:
    from modules.nets.policy import PolicyConfig


class PointCloudContext(ContextMode):
    """context_mode "pointcloud": batch[POINTCLOUD] (B, N, 3), N = ``cfg.num_points``, is the noised part.

    clean part: obs_n ++ goal_n (B, d_o + d_g) (the proprioceptive state and the goal, if any) through
    ``ENCODERS[cfg.encoder]``; noised part: the cloud normalized by ``cloud_norm`` (B, N, 3) through a
    PointNet of ``cfg.pointnet_widths`` and width ``cfg.width``. eps_c is flat (B, N * 3): point i's xyz
    noise is eps_c[:, 3i:3i + 3]. Agent features: the PointNet of the clean cloud, (B, cfg.width).
    Statistics: pointcloud_center (3,) and pointcloud_scale (scalar, (1,) or (3,)), see
    ``modules.nets.pointnet.pointcloud_stats``.
    """

    def __init__(self, cfg: "PolicyConfig", obs_dim: int, goal_dim: int) -> None:
        super().__init__(cfg, obs_dim, goal_dim)
        self.cloud_norm = PointCloudNorm(POINTCLOUD)
        self.clean_encoder = ENCODERS[cfg.encoder](obs_dim + goal_dim, cfg.width, cfg.width)
        self.noised_encoder = PointNetEncoder(cfg.width, cfg.pointnet_widths)
        self.num_points = cfg.num_points
        self.noise_shape = (cfg.num_points, 3)
        self.feature_dim = self.noised_encoder.out_dim
        self.input_keys += (POINTCLOUD,)
        self.stats_keys |= {"pointcloud_center", "pointcloud_scale"}

    @classmethod
    def check_config(cls, cfg: "PolicyConfig") -> None:
        """num_points >= 1; ``pointnet_widths`` a non-empty list of integers >= 1 (stored as a list)."""
        if cfg.num_points < 1:
            raise ValueError(
                f"PolicyConfig.num_points={cfg.num_points} with context_mode={cfg.context_mode!r}; "
                "num_points must be >= 1 with context_mode='pointcloud' and 0 otherwise"
            )
        cfg.pointnet_widths = check_widths(cfg.pointnet_widths, "PolicyConfig.pointnet_widths")

    def set_stats(self, stats: Mapping[str, np.ndarray | Tensor]) -> None:
        """The low-dim statistics and pointcloud_center / pointcloud_scale."""
        super().set_stats(stats)
        self.cloud_norm.set_stats(stats["pointcloud_center"], stats["pointcloud_scale"])

    def split(self, batch: Mapping[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(obs_n ++ goal_n (B, d_o + d_g), normalized cloud (B, N, 3))."""
        o_n, g_n = self.low_dim(batch, dtype)
        if POINTCLOUD not in batch:
            raise ValueError(f"batch has no key {POINTCLOUD!r}; got keys {sorted(batch)}")
        p_n = self.cloud_norm.normalize(check_cloud(batch[POINTCLOUD], self.num_points, POINTCLOUD).to(dtype))
        check_rows(p_n, POINTCLOUD, o_n.shape[0])
        return (o_n if g_n is None else torch.cat([o_n, g_n], dim=-1)), p_n
