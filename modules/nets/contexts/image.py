"""The image-embedding context mode (the paper's VLA variant): noised, normalized camera-frame embeddings."""

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from modules.nets.contexts.base import ContextMode, check_rows
from modules.nets.encoders import ENCODERS
from modules.nets.image import ImageEncoder, ImageEncoderConfig
from modules.nets.keys import IMAGE

if TYPE_CHECKING:
    from modules.nets.policy import PolicyConfig


class ImageEmbeddingContext(ContextMode):
    """context_mode "image_embedding": the embedding of batch[IMAGE] (B, V, H, W, 3) is the noised part.

    ``embedder`` (an ``ImageEncoder`` of ``cfg.image_encoder``) encodes each of the V views by a timm
    backbone into D features and normalizes them (``cfg.image_encoder.embed_norm``); that embedding
    (B, V * D) is noised, eps_c (B, V * D) with view v's noise at [v * D, (v + 1) * D), and encoded by
    ``ENCODERS[cfg.encoder]``. clean part: obs_n ++ goal_n (B, d_o + d_g) (the proprioception and the
    goal, if any) through another encoder of that kind. Agent features: the noised-part encoder of the
    clean embedding, (B, cfg.width). Statistics: image_mean, image_std (3,) per RGB channel, in [0, 1]
    pixel units (``ImageEncoder.set_stats``).
    """

    def __init__(self, cfg: "PolicyConfig", obs_dim: int, goal_dim: int) -> None:
        super().__init__(cfg, obs_dim, goal_dim)
        self.embedder = ImageEncoder(cfg.image_encoder)
        self.clean_encoder = ENCODERS[cfg.encoder](obs_dim + goal_dim, cfg.width, cfg.width)
        self.noised_encoder = ENCODERS[cfg.encoder](self.embedder.out_dim, cfg.width, cfg.width)
        self.noise_shape = (self.embedder.out_dim,)
        self.feature_dim = self.noised_encoder.out_dim
        self.input_keys += (IMAGE,)
        self.stats_keys |= {"image_mean", "image_std"}

    @classmethod
    def check_config(cls, cfg: "PolicyConfig") -> None:
        """num_points 0 (the base's check) and a valid ``cfg.image_encoder``."""
        super().check_config(cfg)
        if not isinstance(cfg.image_encoder, ImageEncoderConfig):
            raise ValueError(
                f"PolicyConfig.image_encoder is {type(cfg.image_encoder).__name__}; "
                "expected an ImageEncoderConfig"
            )
        cfg.image_encoder.validate()

    def set_stats(self, stats: Mapping[str, np.ndarray | Tensor]) -> None:
        """The low-dim statistics and image_mean / image_std."""
        super().set_stats(stats)
        self.embedder.set_stats(stats["image_mean"], stats["image_std"])

    def track_statistics(self, batch: Mapping[str, Tensor], dtype: torch.dtype) -> None:
        """Run the embedder in training mode on batch[IMAGE] (no gradients): its data statistics (and a
        BatchNorm backbone's) move as in a training step; the modes of every module are restored."""
        if IMAGE not in batch:
            raise ValueError(f"batch has no key {IMAGE!r}; got keys {sorted(batch)}")
        was_training = self.embedder.training
        self.embedder.train()
        try:
            self.embedder(self.embedder.check(batch[IMAGE]))
        finally:
            self.embedder.train(was_training)

    def split(self, batch: Mapping[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(obs_n ++ goal_n (B, d_o + d_g), normalized embedding (B, V * D))."""
        o_n, g_n = self.low_dim(batch, dtype)
        if IMAGE not in batch:
            raise ValueError(f"batch has no key {IMAGE!r}; got keys {sorted(batch)}")
        images = self.embedder.check(batch[IMAGE])
        check_rows(images, IMAGE, o_n.shape[0])  # before the backbone runs
        embedding = self.embedder(images).to(dtype)
        return (o_n if g_n is None else torch.cat([o_n, g_n], dim=-1)), embedding
