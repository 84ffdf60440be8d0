"""Context-noise schedules over a CONTINUOUS noise level sigma in [0, 1].

sigma = 0 keeps the context exactly (behaviour cloning); sigma = 1 leaves (almost) pure noise, so
the policy there approaches the marginal p(a). Both schedules end at abar(1) ~ 0, unlike the
reference's 100-step DDPM schedule whose end still keeps sqrt(abar) = 0.60 of the context.
"""

import math

import torch
from torch import Tensor

_COSINE_OFFSET = 0.008  # Nichol & Dhariwal's s: keeps beta small near sigma = 0

# DDPM betas linspace(1e-4, 0.02) over 1000 steps. log abar after k steps = sum of log(1 - beta_i)
# over the first k; entry k of this table (k = 0..1000) holds it, entry 0 being log 1 = 0.
_LINEAR_STEPS = 1000
_LINEAR_LOG_ABAR = torch.cat(
    [
        torch.zeros(1, dtype=torch.float64),
        torch.cumsum(torch.log1p(-torch.linspace(1e-4, 0.02, _LINEAR_STEPS, dtype=torch.float64)), 0),
    ]
)


def _cosine(sigma: Tensor) -> Tensor:
    """Cosine schedule, normalized so abar(0) = 1; cos(pi/2) ~ 0 makes abar(1) ~ 1e-17."""

    def f(t: Tensor | float) -> Tensor:
        angle = (torch.as_tensor(t, dtype=torch.float64) + _COSINE_OFFSET) / (1 + _COSINE_OFFSET)
        return torch.cos(angle * (math.pi / 2)) ** 2

    return f(sigma) / f(0.0).to(sigma.device)


def _linear(sigma: Tensor) -> Tensor:
    """DDPM linear-beta schedule made continuous: log abar interpolated linearly between steps."""
    table = _LINEAR_LOG_ABAR.to(sigma.device)
    pos = sigma * _LINEAR_STEPS  # fractional number of DDPM steps taken
    lo = pos.floor().clamp(max=_LINEAR_STEPS - 1).long()
    frac = pos - lo
    return torch.exp(table[lo] * (1 - frac) + table[lo + 1] * frac)


SCHEDULES = {"cosine": _cosine, "linear": _linear}


def alpha_bar(sigma: Tensor, kind: str = "cosine") -> Tensor:
    """Signal fraction abar(sigma) in [0, 1], same shape and dtype as ``sigma``.

    Monotone non-increasing, abar(0) = 1 exactly. Raises ValueError for an unknown ``kind`` or a
    ``sigma`` outside [0, 1].
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {kind!r}; expected one of {sorted(SCHEDULES)}")
    sigma = torch.as_tensor(sigma)
    if not sigma.is_floating_point():
        sigma = sigma.to(torch.get_default_dtype())
    if sigma.numel() > 0 and not bool(((sigma >= 0) & (sigma <= 1)).all()):
        raise ValueError(
            f"sigma must lie in [0, 1]; got values in [{sigma.min().item():.4g}, {sigma.max().item():.4g}]"
        )
    # float64 inside so abar(0) rounds to exactly 1 and 1 - abar keeps its tiny values
    abar = SCHEDULES[kind](sigma.to(torch.float64)).clamp(0.0, 1.0)
    return abar.to(sigma.dtype)


def noise_context(c_n: Tensor, sigma: Tensor, eps: Tensor, kind: str = "cosine") -> Tensor:
    """Forward-noise a normalized context: sqrt(abar) * c_n + sqrt(1 - abar) * eps.

    Args:
        c_n: normalized context (B, ...).
        sigma: noise level per sample (B,), in [0, 1]; broadcast over the trailing dims of ``c_n``.
        eps: standard normal noise, same shape as ``c_n``.
        kind: key of ``SCHEDULES``.
    """
    if eps.shape != c_n.shape:
        raise ValueError(f"context noise has shape {tuple(eps.shape)}; expected {tuple(c_n.shape)} like c_n")
    if sigma.ndim != 1 or sigma.shape[0] != c_n.shape[0]:
        raise ValueError(f"sigma has shape {tuple(sigma.shape)}; expected ({c_n.shape[0]},), one per sample")
    abar = alpha_bar(sigma, kind).to(c_n.dtype).reshape(-1, *([1] * (c_n.ndim - 1)))  # (B, 1, ...)
    return abar.sqrt() * c_n + (1 - abar).sqrt() * eps
