"""Context encoders: map a (normalized, possibly noised) context to a feature vector.

Variants are chosen by name from the literal dict ``ENCODERS``; every entry is built as
``ENCODERS[name](in_dim, out_dim, hidden)`` and maps (B, in_dim) to (B, out_dim).
"""

import math

import torch
from torch import Tensor, nn


class MLPEncoder(nn.Module):
    """Two-layer SiLU MLP with a LayerNorm on the output.

    The LayerNorm keeps clean and noised features on one scale, whatever the noise level.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden", hidden)):
            if value < 1:
                raise ValueError(f"MLPEncoder {name} must be >= 1; got {value}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, out_dim),
            nn.LayerNorm(out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_dim) -> (B, out_dim)."""
        return self.net(x)


class FourierEncoder(MLPEncoder):
    """Fixed sin/cos features of each input dimension at octave frequencies, then the MLP.

    A plain MLP of a low-dimensional context (an xy position, a goal) is biased towards smooth functions,
    while a maze's shortest-path direction field turns sharply at walls; octave features let the network
    resolve that. The raw input is kept beside the features.
    """

    NUM_FREQS = 8  # pi * 2^k, k = 0..7: periods from 2 down to 1/64 of a unit of the normalized input

    def __init__(self, in_dim: int, out_dim: int, hidden: int) -> None:
        super().__init__(in_dim * (1 + 2 * self.NUM_FREQS), out_dim, hidden)
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(self.NUM_FREQS), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_dim) -> (B, out_dim)."""
        angles = (x[..., None] * self.freqs).flatten(-2)  # (B, in_dim * NUM_FREQS)
        return self.net(torch.cat([x, angles.sin(), angles.cos()], dim=-1))


ENCODERS = {"mlp": MLPEncoder, "fourier": FourierEncoder}
