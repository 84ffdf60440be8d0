"""Context encoders: map a (normalized, possibly noised) context to a feature vector.

Variants are chosen by name from the literal dict ``ENCODERS``; every entry is built as
``ENCODERS[name](in_dim, out_dim, hidden)`` and maps (B, in_dim) to (B, out_dim).
"""

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


ENCODERS = {"mlp": MLPEncoder}
