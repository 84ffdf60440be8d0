"""Point-cloud context: coordinate normalizer, PointNet encoder, and a low-dimensional code for eps_c.

The encoder is the compact PointNet of 3D Diffusion Policy (DP3): one MLP shared by every point,
a max-pool over the points, a projection. The max-pool makes it invariant to the order of the
points, which a downsampled cloud does not have.
"""

import numpy as np
import torch
from torch import Tensor, nn

from modules.nets.normalizer import _MIN_SCALE, _as_stat, _Normalizer

POINTNET_WIDTHS = (64, 128, 256)  # DP3's per-point MLP


def check_widths(widths: object, where: str) -> list[int]:
    """``widths`` as a list of ints, or raise ValueError naming ``where`` (e.g. the config field)."""
    if (
        not isinstance(widths, list | tuple)
        or not widths
        or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths)
    ):
        raise ValueError(f"{where}={widths!r}; expected a non-empty list of integers >= 1")
    return list(widths)


def check_cloud(cloud: object, num_points: int, key: str) -> Tensor:
    """Return ``cloud`` if it is a (B, num_points, 3) tensor, else raise ValueError naming ``key``."""
    if not isinstance(cloud, Tensor) or cloud.ndim != 3 or cloud.shape[2] != 3:
        shape = tuple(cloud.shape) if isinstance(cloud, Tensor) else type(cloud).__name__
        raise ValueError(f"batch[{key!r}] is {shape}; expected a tensor of shape (B, N={num_points}, 3)")
    if cloud.shape[1] != num_points:
        raise ValueError(
            f"batch[{key!r}] has {cloud.shape[1]} points per cloud; this policy was built for "
            f"{num_points} (PolicyConfig.num_points)"
        )
    return cloud


class PointCloudNorm(_Normalizer):
    """Centre and scale xyz coordinates: normalize(p) = (p - center) / max(scale, 1e-3), per axis.

    ``center`` (3,) and ``scale`` (3,) are buffers (saved in the state dict, so they travel with the
    checkpoint). A scalar scale is stored as three equal values: isotropic scaling keeps shapes
    undistorted, which a PointNet of the geometry may prefer; see ``pointcloud_stats``.
    """

    def __init__(self, name: str = "pointcloud") -> None:
        super().__init__(3, name)
        self.register_buffer("center", torch.zeros(3))
        self.register_buffer("scale", torch.ones(3))

    def set_stats(self, center: np.ndarray | Tensor, scale: np.ndarray | Tensor | float) -> None:
        """Store the dataset centre (3,) and scale (a scalar, (1,) or (3,)), in the cloud's units."""
        scale_t = torch.as_tensor(np.asarray(scale) if not isinstance(scale, Tensor) else scale)
        if scale_t.shape in ((), (1,)):  # one isotropic scale, as a scalar or (1,)
            scale_t = scale_t.reshape(()).expand(3)
        center_t = _as_stat(center, 3, f"{self.name}_center")
        scale_t = _as_stat(scale_t, 3, f"{self.name}_scale")
        if bool((scale_t < 0).any()):
            raise ValueError(f"{self.name}_scale must be >= 0; got {scale_t.tolist()}")
        self.center.copy_(center_t)
        self.scale.copy_(scale_t.clamp(min=_MIN_SCALE))
        self.is_set.fill_(True)

    def normalize(self, x: Tensor) -> Tensor:
        """Map raw points (..., 3) to centred, unit-scale coordinates."""
        self._check(x)
        return (x - self.center) / self.scale

    def unnormalize(self, x: Tensor) -> Tensor:
        """Inverse of ``normalize``."""
        self._check(x)
        return x * self.scale + self.center


def pointcloud_stats(points: np.ndarray, isotropic: bool = True) -> dict[str, np.ndarray]:
    """``pointcloud_center`` / ``pointcloud_scale`` for ``CSPPolicy.set_normalization`` from points (..., 3).

    center = mean of all points; scale = per-axis std, or (isotropic) the root of the mean per-axis
    variance, so the normalized coordinates have unit variance on average and eps_c ~ N(0, I) is on
    the same scale as the signal it replaces. A subsample of the dataset's clouds is enough.
    """
    flat = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if flat.shape[0] < 2:
        raise ValueError(f"pointcloud_stats needs at least 2 points; got array of shape {np.shape(points)}")
    var = flat.var(axis=0)  # (3,)
    scale = np.full(3, np.sqrt(var.mean())) if isotropic else np.sqrt(var)
    return {"pointcloud_center": flat.mean(axis=0), "pointcloud_scale": scale}


class PointNetEncoder(nn.Module):
    """DP3-style PointNet: per-point (Linear -> LayerNorm -> ReLU) per width, max-pool, Linear + LayerNorm.

    Args:
        out_dim: size of the cloud feature.
        widths: per-point MLP widths, e.g. (64, 128, 256).
        in_dim: coordinates per point (3: xyz).
    """

    def __init__(self, out_dim: int, widths: tuple[int, ...] | list[int] = POINTNET_WIDTHS, in_dim: int = 3):
        super().__init__()
        widths = check_widths(widths, "PointNetEncoder widths")
        layers: list[nn.Module] = []
        for a, b in zip([in_dim, *widths[:-1]], widths, strict=True):
            layers += [nn.Linear(a, b), nn.LayerNorm(b), nn.ReLU()]
        self.in_dim, self.out_dim = in_dim, out_dim
        self.point_mlp = nn.Sequential(*layers)
        self.project = nn.Sequential(nn.Linear(widths[-1], out_dim), nn.LayerNorm(out_dim))

    def forward(self, points: Tensor) -> Tensor:
        """(B, N, in_dim) -> (B, out_dim); the same for any order of the N points."""
        if points.ndim != 3 or points.shape[-1] != self.in_dim:
            raise ValueError(
                f"PointNetEncoder input has shape {tuple(points.shape)}; expected (B, N, {self.in_dim})"
            )
        per_point = self.point_mlp(points)  # (B, N, widths[-1]), each point on its own
        return self.project(per_point.amax(dim=1))  # max over points: order-invariant


class NoiseCodeMap(nn.Module):
    """Fixed linear map from a d-dim code to a D-dim context noise: eps_c = W @ code.

    W (D, d) is drawn once from a seeded generator (independent of the global torch RNG) and kept
    as a buffer, so a checkpoint carries it exactly. Its rows have unit norm, so when code ~ N(0, I_d)
    every coordinate of eps_c is exactly N(0, 1) (marginally; the D coordinates span only a d-dim
    subspace, which is the point: TMRL's eps_c head then has d outputs instead of D).
    """

    def __init__(self, code_dim: int, out_dim: int, seed: int = 0) -> None:
        super().__init__()
        if not 1 <= code_dim <= out_dim:
            raise ValueError(f"NoiseCodeMap code_dim={code_dim}; expected 1 <= code_dim <= out_dim={out_dim}")
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(out_dim, code_dim, generator=gen, dtype=torch.float64)
        self.register_buffer("weight", (w / w.norm(dim=1, keepdim=True)).to(torch.float32))
        self.code_dim, self.out_dim = code_dim, out_dim

    def forward(self, code: Tensor) -> Tensor:
        """code (B, d) -> eps_c (B, D)."""
        if code.ndim != 2 or code.shape[1] != self.code_dim:
            raise ValueError(f"context code has shape {tuple(code.shape)}; expected (B, {self.code_dim})")
        return code.to(self.weight.dtype) @ self.weight.T
