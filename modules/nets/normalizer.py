"""Normalizers that keep their statistics as buffers, so they travel with every checkpoint."""

import numpy as np
import torch
from torch import Tensor, nn

_MIN_SCALE = 1e-3  # floor on std / range: a constant dimension must not blow up to inf


def _as_stat(value: np.ndarray | Tensor, dim: int, what: str) -> Tensor:
    """Convert a statistic to a float32 (dim,) tensor, or raise naming ``what``."""
    t = torch.as_tensor(np.asarray(value) if not isinstance(value, Tensor) else value).detach()
    if t.shape != (dim,):
        raise ValueError(f"{what} has shape {tuple(t.shape)}; expected ({dim},)")
    t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} contains non-finite values: {t.tolist()}")
    return t


class _Normalizer(nn.Module):
    """Shared bookkeeping: a name for error messages and a buffer saying whether stats were set."""

    def __init__(self, dim: int, name: str) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"{name} normalizer needs dim >= 1; got {dim}")
        self.dim = dim
        self.name = name
        self.register_buffer("is_set", torch.tensor(False))

    def _check(self, x: Tensor) -> None:
        if not bool(self.is_set):
            raise RuntimeError(
                f"{self.name} normalization statistics were never set; call "
                "CSPPolicy.set_normalization(stats) with dataset statistics before training or sampling"
            )
        if x.shape[-1] != self.dim:
            raise ValueError(f"{self.name} has last dimension {x.shape[-1]}; expected {self.dim}")


class ZScore(_Normalizer):
    """Per-dimension standardization: normalize(x) = (x - mean) / max(std, 1e-3)."""

    def __init__(self, dim: int, name: str = "context") -> None:
        super().__init__(dim, name)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def set_stats(self, mean: np.ndarray | Tensor, std: np.ndarray | Tensor) -> None:
        """Store the dataset mean and standard deviation, each of shape (dim,)."""
        mean_t = _as_stat(mean, self.dim, f"{self.name}_mean")
        std_t = _as_stat(std, self.dim, f"{self.name}_std")
        if bool((std_t < 0).any()):
            raise ValueError(f"{self.name}_std must be >= 0; got {std_t.tolist()}")
        self.mean.copy_(mean_t)
        self.std.copy_(std_t.clamp(min=_MIN_SCALE))
        self.is_set.fill_(True)

    def normalize(self, x: Tensor) -> Tensor:
        """Map raw values (..., dim) to zero mean, unit variance."""
        self._check(x)
        return (x - self.mean) / self.std

    def unnormalize(self, x: Tensor) -> Tensor:
        """Inverse of ``normalize``."""
        self._check(x)
        return x * self.std + self.mean


class MinMax(_Normalizer):
    """Per-dimension affine map of [min, max] onto [-1, 1].

    The range is floored at 1e-3 around the centre, so a constant dimension maps to 0 instead of
    dividing by zero, and ``unnormalize`` of anything in [-1, 1] stays within 5e-4 of that constant.
    """

    def __init__(self, dim: int, name: str = "action") -> None:
        super().__init__(dim, name)
        self.register_buffer("center", torch.zeros(dim))
        self.register_buffer("half_range", torch.ones(dim))

    def set_stats(self, low: np.ndarray | Tensor, high: np.ndarray | Tensor) -> None:
        """Store the dataset per-dimension minimum and maximum, each of shape (dim,)."""
        low_t = _as_stat(low, self.dim, f"{self.name}_min")
        high_t = _as_stat(high, self.dim, f"{self.name}_max")
        if bool((high_t < low_t).any()):
            raise ValueError(
                f"{self.name}_max must be >= {self.name}_min; got {low_t.tolist()} > {high_t.tolist()}"
            )
        self.center.copy_((high_t + low_t) / 2)
        self.half_range.copy_(((high_t - low_t) / 2).clamp(min=_MIN_SCALE / 2))
        self.is_set.fill_(True)

    def normalize(self, x: Tensor) -> Tensor:
        """Map raw values (..., dim) so that [min, max] lands on [-1, 1]."""
        self._check(x)
        return (x - self.center) / self.half_range

    def unnormalize(self, x: Tensor) -> Tensor:
        """Inverse of ``normalize``: [-1, 1] back to raw units."""
        self._check(x)
        return x * self.half_range + self.center
