"""DiT-style flow-matching transformer over the L action tokens of a chunk.

Every token is one action of the chunk. The condition (flow time tau, context-noise level sigma,
context features) enters only through adaLN-Zero modulation, so at initialization each block is
the identity and the network outputs exactly zero.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FREQ_DIM = 128  # sinusoid width for each of tau and sigma
_TIME_SCALE = 1000.0  # times in [0, 1] are scaled like DDPM step indices before the sinusoid


def sinusoid(t: Tensor, dim: int = FREQ_DIM, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) of ``t * 1000`` (cos half, then sin half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * _TIME_SCALE)[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    # x (B, L, W), shift/scale (B, 1, W): scale around 1 so a zero modulation is the identity
    return x * (1 + scale) + shift


class FlowCondition(NamedTuple):
    """The parts of the condition that depend only on (sigma, context features).

    They stay fixed across the Euler steps of one sampling call, so ``FlowTransformer.prepare``
    computes them once and ``forward`` adds the tau-dependent parts each step.
    """

    sigma_part: Tensor  # (B, W) sigma's share of the time MLP's first layer
    context_part: Tensor  # (B, W) context features' share of the condition vector


class _Block(nn.Module):
    """Pre-norm self-attention + MLP block with adaLN-Zero (shift, scale, gate) modulation."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = max(1, int(width * mlp_ratio))
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)
        )
        self.modulation = nn.Linear(width, 6 * width)  # zero-initialized by FlowTransformer

    def _attention(self, h: Tensor) -> Tensor:
        b, n, w = h.shape
        qkv = (
            self.qkv(h).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        )  # (3, B, H, L, Dh)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, L, Dh)
        return self.proj(out.transpose(1, 2).reshape(b, n, w))

    def forward(self, x: Tensor, act_cond: Tensor) -> Tensor:
        """x (B, L, W), act_cond = SiLU(cond) (B, W) -> (B, L, W)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(act_cond)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self._attention(_modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class FlowTransformer(nn.Module):
    """Velocity network v_hat(x_tau, tau, sigma, features) for action chunks.

    Args:
        action_dim: d_a, size of one action.
        chunk_len: L, number of action tokens (fixes the learned positional embedding).
        feature_dim: F, size of the context feature vector.
        width, depth, heads, mlp_ratio: transformer size.
    """

    def __init__(
        self,
        action_dim: int,
        chunk_len: int,
        feature_dim: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.action_dim = action_dim
        self.chunk_len = chunk_len
        self.feature_dim = feature_dim
        self.action_embed = nn.Sequential(nn.Linear(action_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, chunk_len, width))
        # time MLP on sinusoid(tau) ++ sinusoid(sigma); its first layer is split in two so that
        # sigma's share can be computed once per sampling call (the sum equals one Linear on the concat)
        self.tau_in = nn.Linear(FREQ_DIM, width)
        self.sigma_in = nn.Linear(FREQ_DIM, width, bias=False)
        self.time_out = nn.Sequential(nn.SiLU(), nn.Linear(width, width))
        # condition = Linear(time embedding ++ features), split the same way
        self.cond_time = nn.Linear(width, width)
        self.cond_context = nn.Linear(feature_dim, width, bias=False)
        self.blocks = nn.ModuleList(_Block(width, heads, mlp_ratio) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(width, 2 * width)
        self.decoder = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, action_dim))
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.pos_embed, std=0.02)
        # adaLN-Zero: every block starts as the identity and the output starts at zero
        zeroed = [block.modulation for block in self.blocks] + [self.final_modulation, self.decoder[-1]]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def prepare(self, sigma: Tensor, features: Tensor) -> FlowCondition:
        """Precompute the tau-independent condition parts: sigma (B,), features (B, F)."""
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"features have shape {tuple(features.shape)}; expected (B, {self.feature_dim})")
        if sigma.shape != (features.shape[0],):
            raise ValueError(f"sigma has shape {tuple(sigma.shape)}; expected ({features.shape[0]},)")
        return FlowCondition(self.sigma_in(sinusoid(sigma)), self.cond_context(features))

    def forward(self, x: Tensor, tau: Tensor, cond: FlowCondition) -> Tensor:
        """x_tau (B, L, d_a), tau (B,), cond from ``prepare`` -> v_hat (B, L, d_a)."""
        b = x.shape[0]
        if x.shape[1:] != (self.chunk_len, self.action_dim):
            raise ValueError(
                f"x has shape {tuple(x.shape)}; expected (B, {self.chunk_len}, {self.action_dim})"
            )
        if tau.shape != (b,):
            raise ValueError(f"tau has shape {tuple(tau.shape)}; expected ({b},)")
        time_emb = self.time_out(self.tau_in(sinusoid(tau)) + cond.sigma_part)  # (B, W)
        act_cond = F.silu(self.cond_time(time_emb) + cond.context_part)  # (B, W)
        h = self.action_embed(x) + self.pos_embed  # (B, L, W)
        for block in self.blocks:
            h = block(h, act_cond)
        shift, scale = self.final_modulation(act_cond)[:, None].chunk(2, dim=-1)  # (B, 1, W) each
        return self.decoder(_modulate(self.final_norm(h), shift, scale))  # (B, L, d_a)
