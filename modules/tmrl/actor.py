"""The high-level TMRL actor: one tanh-squashed Gaussian head per part of the chunk-level action.

The high-level action is ONE flat vector in [-1, 1]^D laid out head after head, e.g.
``[HeadSpec("z", 2), HeadSpec("sigma", 1), HeadSpec("eps_c", 2)]`` gives D = 5 with z in
``action[:, 0:2]``, sigma in ``action[:, 2:3]`` and eps_c in ``action[:, 3:5]``. Each head keeps its
own log-probability so that the loss can give each its own temperature (METHOD.md section 2).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REGULARIZERS = ("entropy", "prior")  # what each head's temperature weighs: -entropy, or KL to the start
_LOG2 = math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass
class HeadSpec:
    """One part of the high-level action.

    Attributes:
        name: used in diagnostics (``alpha_<name>``, ``entropy_<name>``) and by ``split_heads``.
        dim: number of action dimensions of this head.
        target_entropy: SAC entropy target of this head's temperature; None means ``-dim``.
        init_loc: pre-tanh mean of this head's dims at initialization (0: the middle of [-1, 1]).
        init_std: pre-tanh std of this head's dims at initialization; None: the actor's ``init_std``.
    """

    name: str
    dim: int
    target_entropy: float | None = None
    init_loc: float = 0.0
    init_std: float | None = None

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"HeadSpec {self.name!r}: dim must be >= 1, got {self.dim}")

    @property
    def entropy_target(self) -> float:
        """The target entropy actually used: the override, or ``-dim``."""
        return -float(self.dim) if self.target_entropy is None else float(self.target_entropy)


def head_slices(heads: list[HeadSpec]) -> dict[str, slice]:
    """Where each head lives in the flat action vector, in layout order."""
    slices, start = {}, 0
    for head in heads:
        if head.name in slices:
            raise ValueError(f"duplicate head name {head.name!r}")
        slices[head.name] = slice(start, start + head.dim)
        start += head.dim
    return slices


def split_heads(action: Tensor, heads: list[HeadSpec]) -> dict[str, Tensor]:
    """Split a flat action (..., D) into ``{name: (..., dim)}`` views."""
    return {name: action[..., sl] for name, sl in head_slices(heads).items()}


def tanh_log_det(u: Tensor) -> Tensor:
    """log |d tanh(u) / du| = log(1 - tanh(u)^2), elementwise, in a form stable for large |u|.

    Uses 1 - tanh(u)^2 = 4 e^{-2u} / (1 + e^{-2u})^2, so the log is 2 * (log 2 - u - softplus(-2u));
    evaluating log(1 - tanh(u)^2) directly gives -inf once tanh(u) rounds to 1.
    """
    return 2.0 * (_LOG2 - u - F.softplus(-2.0 * u))


def mlp_trunk(in_dim: int, hidden: int, layers: int) -> nn.Sequential:
    """Linear -> LayerNorm -> ReLU, ``layers`` times (LayerNorm keeps the features' scale steady)."""
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(in_dim if i == 0 else hidden, hidden), nn.LayerNorm(hidden), nn.ReLU()]
    return nn.Sequential(*mods)


class ChunkActor(nn.Module):
    """Squashed-Gaussian SAC actor over the flat high-level action, one output layer for all heads.

    Args:
        state_dim: size of the high-level state (observation ++ goal).
        heads: the action layout; D = sum of the heads' dims.
        hidden, layers: trunk width and depth.
        log_std_min, log_std_max: range the pre-tanh log-std is smoothly squashed into.
        init_std: pre-tanh std of every dimension at initialization (set through the output bias), or
            None for the usual SAC start (raw output ~0: std = exp of the middle of the range, 0.22 for
            [-5, 2]). A head's own ``HeadSpec.init_std`` / ``init_loc`` win. For TMRL the usual start is a
            poor one: tanh(N(0, 0.22)) keeps z near 0, a noise the base policy never saw (its success drops
            to ~0). With init_std = 1 and init_loc = 0, atanh of the action is exactly N(0, 1): the noise
            the base policy was trained on (``z_map="atanh"`` in the chunk decoder).

        regularizer: "entropy" (SAC): each head's temperature weighs its log-density, so the actor is pulled
            towards the maximum-entropy distribution (for a sigma head: sigma_max / 2, whatever the base
            does there). "prior": it weighs the log-ratio to the initial distribution p0 instead, so where
            the critic has no preference the actor stays at p0 (for TMRL: the base's own N(0, I) noise at
            sigma near 0) and moves only as far as the critic's advantage pays for the KL.

    The output layer's weights start at zero, so the initial distribution is the same in every state
    (only the biases set it): what the agent does before it has learned anything is fully specified.
    """

    def __init__(
        self,
        state_dim: int,
        heads: list[HeadSpec],
        hidden: int = 256,
        layers: int = 2,
        log_std_min: float = -5.0,
        log_std_max: float = 2.0,
        init_std: float | None = None,
        regularizer: str = "entropy",
    ) -> None:
        super().__init__()
        if regularizer not in REGULARIZERS:
            raise ValueError(f"ChunkActor regularizer={regularizer!r}; expected one of {list(REGULARIZERS)}")
        self.regularizer = regularizer
        if not heads:
            raise ValueError("ChunkActor needs at least one head")
        if layers < 1:
            raise ValueError(f"ChunkActor needs layers >= 1, got {layers}")
        head_slices(heads)  # validates unique names
        self.heads = list(heads)
        self.action_dim = sum(h.dim for h in heads)
        self.log_std_min, self.log_std_max = float(log_std_min), float(log_std_max)
        self.trunk = mlp_trunk(state_dim, hidden, layers)
        # ONE output layer for all heads: [loc (D) | raw log-std (D)], head after head within each half
        self.out = nn.Linear(hidden, 2 * self.action_dim)
        # (D, n_heads) one-hot: per-dimension log-densities @ head_of_dim = each head's log-density
        head_of_dim = torch.zeros(self.action_dim, len(heads))
        for h, sl in enumerate(head_slices(heads).values()):
            head_of_dim[sl, h] = 1.0
        self.register_buffer("head_of_dim", head_of_dim, persistent=False)
        with torch.no_grad():
            self.out.weight.zero_()  # the initial distribution is the biases' alone, in every state
            self.out.bias.zero_()
            for head, sl in zip(self.heads, head_slices(self.heads).values(), strict=True):
                self.out.bias[sl] = head.init_loc
                std = init_std if head.init_std is None else head.init_std
                if std is not None:
                    self.out.bias[self.action_dim + sl.start : self.action_dim + sl.stop] = self._raw_log_std(
                        std, head.name
                    )
        # the initial distribution, kept as the prior of regularizer="prior" (it travels in checkpoints)
        loc0, raw0 = self.out.bias.detach().clone().chunk(2)
        self.register_buffer("prior_loc", loc0)  # (D,)
        self.register_buffer("prior_log_std", self._squash_log_std(raw0))  # (D,)

    def _raw_log_std(self, std: float, name: str) -> float:
        """The raw log-std output for which ``_squash_log_std`` gives log(std)."""
        log_std = math.log(std) if std > 0 else -math.inf
        if not self.log_std_min < log_std < self.log_std_max:
            raise ValueError(
                f"init_std={std} (head {name!r}) is outside the actor's std range "
                f"(exp({self.log_std_min}), exp({self.log_std_max})) = "
                f"({math.exp(self.log_std_min):.3g}, {math.exp(self.log_std_max):.3g})"
            )
        half_range = 0.5 * (self.log_std_max - self.log_std_min)
        return math.atanh((log_std - self.log_std_min) / half_range - 1.0)

    def _squash_log_std(self, raw: Tensor) -> Tensor:
        # tanh keeps the gradient alive at the bounds, unlike a hard clamp
        half_range = 0.5 * (self.log_std_max - self.log_std_min)
        return self.log_std_min + half_range * (torch.tanh(raw) + 1.0)

    def forward(self, state: Tensor, deterministic: bool = False) -> tuple[Tensor, Tensor]:
        """Sample (or take the mode of) the high-level action.

        Args:
            state: (B, state_dim).
            deterministic: return tanh(loc) and zero log-probs instead of a reparameterized sample.

        Returns:
            action (B, D) in [-1, 1], log_probs (B, n_heads): each head's log-density of its part
            of the squashed action (tanh correction included, summed over the head's dims). With
            ``regularizer="prior"`` the log-RATIO log pi(a|s) - log p0(a) to the initial distribution p0
            instead (the tanh corrections cancel): a one-sample estimate of KL(pi || p0), which SAC's
            machinery then keeps small, in place of keeping the entropy large.
        """
        loc, raw_log_std = self.out(self.trunk(state)).chunk(2, dim=-1)  # (B, D) each
        if deterministic:
            return torch.tanh(loc), loc.new_zeros(loc.shape[0], len(self.heads))
        log_std = self._squash_log_std(raw_log_std)
        noise = torch.randn_like(loc)
        u = loc + log_std.exp() * noise  # (B, D) pre-tanh sample, differentiable in loc/std
        # Normal log-density written with the noise itself: (u - loc) / std == noise exactly
        if self.regularizer == "prior":
            prior = ((u - self.prior_loc) / self.prior_log_std.exp()).pow(2)
            per_dim = 0.5 * (prior - noise.pow(2)) + self.prior_log_std - log_std  # (B, D)
        else:
            per_dim = -0.5 * noise.pow(2) - log_std - _HALF_LOG_2PI - tanh_log_det(u)  # (B, D)
        return torch.tanh(u), per_dim @ self.head_of_dim  # (B, D), (B, n_heads)
