"""An ensemble of LayerNorm MLP Q-functions evaluated in one batched pass.

Every critic's weights are stacked along a leading ensemble dimension E, so the whole ensemble is
a handful of batched matmuls (no Python loop over critics, no vmap); on a CPU this is as fast as
one wide MLP. The critic input is (state, action, sinusoidal features of sigma) when the action
carries a sigma head (METHOD.md section 2: "(state, z, embedding of sigma, eps_c)").
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class EnsembleLinear(nn.Module):
    """E independent ``nn.Linear`` layers stored as one (E, in, out) weight.

    Accepts a shared input (B, in), which every member sees, or a per-member input (E, B, in).
    """

    def __init__(self, num: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(num, out_dim))
        # nn.Linear's default init, drawn independently per member so the critics disagree
        bound = 1.0 / math.sqrt(in_dim)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:  # (B, in) shared by all members
            return torch.matmul(x, self.weight) + self.bias[:, None]  # (E, B, out)
        return torch.baddbmm(self.bias[:, None], x, self.weight)  # (E, B, out)


class EnsembleLayerNorm(nn.Module):
    """LayerNorm over the feature dimension with a separate affine per ensemble member."""

    def __init__(self, num: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num, 1, dim))
        self.bias = nn.Parameter(torch.zeros(num, 1, dim))

    def forward(self, x: Tensor) -> Tensor:
        # x (E, B, dim); addcmul fuses the per-member scale and shift into one pass
        return torch.addcmul(self.bias, F.layer_norm(x, x.shape[-1:]), self.weight)


def sigma_features(sigma: Tensor, dim: int) -> Tensor:
    """Fourier features (B,) -> (B, dim) of the sigma action in [-1, 1] (cos half, then sin half).

    Frequencies pi * 2^k, k = 0..log2(16), geometrically spaced: the lowest separates the two ends of
    [-1, 1] with one smooth period, the highest resolves steps of about 1/16 in sigma.
    """
    half = dim // 2
    freqs = math.pi * torch.logspace(0, 4, half, base=2.0, device=sigma.device, dtype=sigma.dtype)
    args = sigma[:, None] * freqs  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class CriticEnsemble(nn.Module):
    """``num_critics`` Q(s, a) MLPs, LayerNorm after every hidden Linear, ReLU activations.

    Args:
        state_dim, action_dim: sizes of the high-level state and the flat action.
        num_critics: E.
        hidden, layers: width and number of hidden layers (``layers=0`` is a linear critic,
            useful for hand-checkable tests).
        sigma_index: position of the sigma head in the action; when given, sigma is also fed
            through ``sigma_features`` sinusoidal features.
        sigma_features: number of those features (even).
    """

    def __init__(
        self,
        state_dim: int,
        action_dim: int,
        num_critics: int = 5,
        hidden: int = 256,
        layers: int = 3,
        sigma_index: int | None = None,
        sigma_features: int = 16,
    ) -> None:
        super().__init__()
        if num_critics < 1 or layers < 0:
            raise ValueError(f"need num_critics >= 1 and layers >= 0, got {num_critics}, {layers}")
        if sigma_index is not None and not 0 <= sigma_index < action_dim:
            raise ValueError(f"sigma_index {sigma_index} outside the action (dim {action_dim})")
        if sigma_index is not None and (sigma_features < 2 or sigma_features % 2):
            raise ValueError(f"sigma_features must be a positive even number, got {sigma_features}")
        self.num_critics = num_critics
        self.state_dim, self.action_dim = state_dim, action_dim
        self.sigma_index = sigma_index
        self.sigma_dim = sigma_features if sigma_index is not None else 0
        in_dim = state_dim + action_dim + self.sigma_dim
        self.hidden = nn.ModuleList()
        self.norms = nn.ModuleList()
        for i in range(layers):
            self.hidden.append(EnsembleLinear(num_critics, in_dim if i == 0 else hidden, hidden))
            self.norms.append(EnsembleLayerNorm(num_critics, hidden))
        self.out = EnsembleLinear(num_critics, hidden if layers else in_dim, 1)

    def forward(self, state: Tensor, action: Tensor) -> Tensor:
        """Q-values (num_critics, B) of state (B, state_dim) and action (B, action_dim)."""
        parts = [state, action]
        if self.sigma_index is not None:
            parts.append(sigma_features(action[:, self.sigma_index], self.sigma_dim))
        h = torch.cat(parts, dim=-1)  # (B, in_dim), shared by all critics
        for linear, norm in zip(self.hidden, self.norms, strict=True):
            h = F.relu(norm(linear(h)))  # (E, B, hidden)
        return self.out(h).squeeze(-1)  # (E, B)
