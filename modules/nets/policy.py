"""The CSP policy: ONE class for pre-training (``loss``) and fine-tuning (``sample``).

A flow-matching generator of action chunks conditioned on a diffusion-noised context
(METHOD.md section 1). Normalization statistics live inside it as buffers, and ``save``/``load``
need torch alone, so a TMRL job or a robot loads it without Lightning.
"""

import pickle
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from os import PathLike
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.nets.encoders import ENCODERS
from modules.nets.keys import ACTION, GOAL, OBS, POINTCLOUD
from modules.nets.normalizer import MinMax, ZScore
from modules.nets.pointnet import (
    POINTNET_WIDTHS,
    NoiseCodeMap,
    PointCloudNorm,
    PointNetEncoder,
    check_cloud,
    check_widths,
)
from modules.nets.schedule import SCHEDULES, noise_context
from modules.nets.transformer import FlowTransformer

CONTEXT_MODES = ("goal", "observation", "pointcloud")
CHECKPOINT_FORMAT = "tmrl-policy"
CHECKPOINT_VERSION = 1
LIGHTNING_KEY = "tmrl_policy"  # where a Lightning checkpoint carries the policy checkpoint dict


@dataclass
class PolicyConfig:
    """Architecture and sampling settings of ``CSPPolicy``.

    Attributes:
        context_mode: what gets noised. "goal": only the goal (the observation is given clean);
            "observation": the whole low-dim observation (observation ++ goal, if any);
            "pointcloud": the normalized xyz of ``batch[POINTCLOUD]`` (B, N, 3), encoded by a PointNet
            AFTER noising; the observation (the robot's proprioceptive state) ++ goal, if any, is clean.
        encoder: key of ``ENCODERS`` for the low-dim context encoders (pointcloud mode: the clean one).
        chunk_len: L, actions per generated chunk.
        width, depth, heads, mlp_ratio: transformer size (width must be divisible by heads).
        schedule: key of ``SCHEDULES``, the context-noise schedule over sigma in [0, 1].
        sample_steps: K, default number of Euler steps in ``sample``.
        num_points: N, points per cloud; required (>= 1) in pointcloud mode, 0 in the other modes.
            A batch with another N is refused (clouds are downsampled to a fixed N per dataset).
        pointnet_widths: per-point MLP widths of the PointNet (pointcloud mode only).
        context_code_dim: d > 0 adds a fixed map from a d-dim code to eps_c (``context_noise_from_code``),
            the low-dimensional eps_c parameterization TMRL needs for large contexts; 0: none.
    """

    context_mode: str = "goal"
    encoder: str = "mlp"
    chunk_len: int = 16
    width: int = 128
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    schedule: str = "cosine"
    sample_steps: int = 10
    num_points: int = 0
    pointnet_widths: list[int] = field(default_factory=lambda: list(POINTNET_WIDTHS))
    context_code_dim: int = 0

    def __post_init__(self) -> None:
        choices = {"context_mode": CONTEXT_MODES, "encoder": sorted(ENCODERS), "schedule": sorted(SCHEDULES)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"PolicyConfig.{name}={getattr(self, name)!r}; expected one of {list(allowed)}"
                )
        for name in ("chunk_len", "width", "depth", "heads", "sample_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PolicyConfig.{name}={value!r}; expected an integer >= 1")
        if (
            isinstance(self.mlp_ratio, bool)
            or not isinstance(self.mlp_ratio, int | float)
            or self.mlp_ratio <= 0
        ):
            raise ValueError(f"PolicyConfig.mlp_ratio={self.mlp_ratio!r}; expected a number > 0")
        if self.width % self.heads != 0:
            raise ValueError(
                f"PolicyConfig.width={self.width} must be divisible by PolicyConfig.heads={self.heads}"
            )
        self._check_pointcloud_fields()

    def _check_pointcloud_fields(self) -> None:
        for name in ("num_points", "context_code_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"PolicyConfig.{name}={value!r}; expected an integer >= 0")
        cloud = self.context_mode == "pointcloud"
        if cloud != (self.num_points > 0):
            raise ValueError(
                f"PolicyConfig.num_points={self.num_points} with context_mode={self.context_mode!r}; "
                "num_points must be >= 1 with context_mode='pointcloud' and 0 otherwise"
            )
        self.pointnet_widths = check_widths(self.pointnet_widths, "PolicyConfig.pointnet_widths")


def _check_shape(t: Tensor, shape: tuple[int, ...], name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {shape}")


class CSPPolicy(nn.Module):
    """Context-smoothed flow-matching policy over action chunks.

    Args:
        cfg: architecture and sampling settings.
        obs_dim: d_o, size of ``batch[OBS]``.
        action_dim: d_a, size of one action.
        goal_dim: d_g, size of ``batch[GOAL]``; 0 when the task has no goal.

    Attributes:
        context_dim: d_c, size of the NOISED context and of eps_c (goal mode: d_g; observation mode:
            d_o + d_g; pointcloud mode: N * 3, eps_c flat (B, N * 3), point i's xyz at [3i, 3i + 3)).
        context_code_dim: d of ``context_noise_from_code`` (``cfg.context_code_dim``; 0: no code map).

    Pointcloud mode: condition = enc_clean(obs_n ++ goal_n) ++ PointNet(noised normalized cloud). The
    goal, if any, stays clean beside the proprioceptive state: the cloud is the context to smooth.
    """

    def __init__(self, cfg: PolicyConfig, obs_dim: int, action_dim: int, goal_dim: int = 0) -> None:
        super().__init__()
        for name, value, low in (
            ("obs_dim", obs_dim, 1),
            ("action_dim", action_dim, 1),
            ("goal_dim", goal_dim, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"CSPPolicy {name}={value!r}; expected an integer >= {low}")
        if cfg.context_mode == "goal" and goal_dim == 0:
            raise ValueError(
                "PolicyConfig.context_mode='goal' needs goal_dim > 0; use 'observation' for goal-free tasks"
            )
        self.cfg = cfg
        self.obs_dim, self.action_dim, self.goal_dim = obs_dim, action_dim, goal_dim
        self.obs_norm = ZScore(obs_dim, OBS)
        self.goal_norm = ZScore(goal_dim, GOAL) if goal_dim > 0 else None
        self.action_norm = MinMax(action_dim, ACTION)
        self.cloud_norm = PointCloudNorm(POINTCLOUD) if cfg.context_mode == "pointcloud" else None
        encoder_cls = ENCODERS[cfg.encoder]
        if cfg.context_mode == "goal":
            self.context_dim = goal_dim
            self.clean_encoder = encoder_cls(obs_dim, cfg.width, cfg.width)
            self.noised_encoder = encoder_cls(self.context_dim, cfg.width, cfg.width)
        elif cfg.context_mode == "observation":
            self.context_dim = obs_dim + goal_dim
            self.clean_encoder = None
            self.noised_encoder = encoder_cls(self.context_dim, cfg.width, cfg.width)
        else:
            self.context_dim = 3 * cfg.num_points
            self.clean_encoder = encoder_cls(obs_dim + goal_dim, cfg.width, cfg.width)
            self.noised_encoder = PointNetEncoder(cfg.width, cfg.pointnet_widths)
        feature_dim = cfg.width * (1 if self.clean_encoder is None else 2)
        self.net = FlowTransformer(
            action_dim, cfg.chunk_len, feature_dim, cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio
        )
        if cfg.context_code_dim > self.context_dim:
            raise ValueError(
                f"PolicyConfig.context_code_dim={cfg.context_code_dim} exceeds context_dim={self.context_dim}"
            )
        # own seeded generator: building the map does not shift the weight initialization
        self.code_map = NoiseCodeMap(cfg.context_code_dim, self.context_dim) if cfg.context_code_dim else None

    # ------------------------------------------------------------------ normalization
    def set_normalization(self, stats: Mapping[str, np.ndarray | Tensor]) -> None:
        """Set dataset statistics: observation_mean/std, goal_mean/std (if goal_dim > 0), action_min/max,
        and in pointcloud mode pointcloud_center (3,) and pointcloud_scale (scalar, (1,) or (3,)) (see
        ``modules.nets.pointnet.pointcloud_stats``)."""
        expected = {"observation_mean", "observation_std", "action_min", "action_max"}
        if self.goal_dim > 0:
            expected |= {"goal_mean", "goal_std"}
        if self.cloud_norm is not None:
            expected |= {"pointcloud_center", "pointcloud_scale"}
        missing, unknown = expected - set(stats), set(stats) - expected
        if missing or unknown:
            raise ValueError(
                f"normalization stats: missing keys {sorted(missing)}, unexpected keys {sorted(unknown)}; "
                f"expected exactly {sorted(expected)} (goal statistics only when goal_dim > 0, "
                "pointcloud statistics only when context_mode='pointcloud')"
            )
        self.obs_norm.set_stats(stats["observation_mean"], stats["observation_std"])
        if self.goal_norm is not None:
            self.goal_norm.set_stats(stats["goal_mean"], stats["goal_std"])
        if self.cloud_norm is not None:
            self.cloud_norm.set_stats(stats["pointcloud_center"], stats["pointcloud_scale"])
        self.action_norm.set_stats(stats["action_min"], stats["action_max"])

    # ------------------------------------------------------------------ inputs
    def _dtype(self) -> torch.dtype:
        return self.net.pos_embed.dtype

    def _input(self, batch: Mapping[str, Tensor], key: str, dim: int) -> Tensor:
        """Fetch ``batch[key]`` as (B, dim) in the network's dtype, or raise naming the key."""
        if key not in batch:
            raise ValueError(f"batch has no key {key!r}; got keys {sorted(batch)}")
        value = batch[key]
        if not isinstance(value, Tensor) or value.ndim != 2 or value.shape[1] != dim:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"batch[{key!r}] is {shape}; expected a tensor of shape (B, {dim})")
        return value.to(self._dtype())

    def _cloud(self, obs: Mapping[str, Tensor]) -> Tensor:
        """Fetch ``batch[POINTCLOUD]`` as (B, N, 3) with N = ``cfg.num_points``, or raise naming the key."""
        if POINTCLOUD not in obs:
            raise ValueError(f"batch has no key {POINTCLOUD!r}; got keys {sorted(obs)}")
        return check_cloud(obs[POINTCLOUD], self.cfg.num_points, POINTCLOUD).to(self._dtype())

    def _normalized_context(self, obs: Mapping[str, Tensor]) -> tuple[Tensor | None, Tensor]:
        """Split the normalized inputs into (clean part or None, part to be noised).

        The part to be noised is (B, d_c), or (B, N, 3) in pointcloud mode.
        """
        o_n = self.obs_norm.normalize(self._input(obs, OBS, self.obs_dim))  # (B, d_o)
        g_n = None
        if self.goal_norm is not None:
            g_n = self.goal_norm.normalize(self._input(obs, GOAL, self.goal_dim))  # (B, d_g)
        p_n = self.cloud_norm.normalize(self._cloud(obs)) if self.cloud_norm is not None else None
        for key, part in ((GOAL, g_n), (POINTCLOUD, p_n)):
            if part is not None and part.shape[0] != o_n.shape[0]:
                raise ValueError(
                    f"batch[{key!r}] has {part.shape[0]} rows but batch[{OBS!r}] has {o_n.shape[0]}"
                )
        if self.cfg.context_mode == "goal":
            return o_n, g_n
        low_dim = o_n if g_n is None else torch.cat([o_n, g_n], dim=-1)  # (B, d_o + d_g)
        return (None, low_dim) if p_n is None else (low_dim, p_n)

    def noised_context(
        self, obs: Mapping[str, Tensor], sigma: Tensor, context_noise: Tensor
    ) -> tuple[Tensor | None, Tensor]:
        """(clean part (B, d) or None, noised normalized context (B, d_c), or (B, N, 3) for a cloud).

        ``sigma`` (B,) in [0, 1] and ``context_noise`` eps_c (B, d_c) set the forward noising of the
        normalized context; at sigma = 0 the context passes through exactly. A cloud's eps_c is flat:
        point i's xyz noise is eps_c[:, 3i:3i + 3].
        """
        clean, c_n = self._normalized_context(obs)
        _check_shape(context_noise, (c_n.shape[0], self.context_dim), "context_noise")
        eps = context_noise.to(c_n.dtype).reshape(c_n.shape)
        return clean, noise_context(c_n, sigma, eps, self.cfg.schedule)

    def encode(self, obs: Mapping[str, Tensor], sigma: Tensor, context_noise: Tensor) -> Tensor:
        """Context features (B, F): enc_clean(clean part) ++ enc_noised(noised context).

        Arguments as in ``noised_context``; in pointcloud mode enc_noised is the PointNet.
        """
        clean, c_sigma = self.noised_context(obs, sigma, context_noise)
        features = self.noised_encoder(c_sigma)
        if clean is not None:
            features = torch.cat([self.clean_encoder(clean), features], dim=-1)
        return features

    @property
    def context_code_dim(self) -> int:
        """d, the size of the code ``context_noise_from_code`` takes; 0 when the policy has no code map."""
        return self.cfg.context_code_dim

    def context_noise_from_code(self, code: Tensor) -> Tensor:
        """Low-dim eps_c parameterization: code (B, d) -> eps_c (B, d_c), ~N(0, I) per entry when code is.

        A fixed, seeded linear map with unit-norm rows (``NoiseCodeMap``), carried in the checkpoint; a
        TMRL eps_c head of d outputs instead of d_c (N * 3 for a cloud) feeds it.
        """
        if self.code_map is None:
            raise ValueError(
                "this policy has no context code map: build it with PolicyConfig.context_code_dim > 0"
            )
        return self.code_map(code)

    def velocity(self, x: Tensor, tau: Tensor, sigma: Tensor, features: Tensor) -> Tensor:
        """Network output v_hat (B, L, d_a) for x_tau (B, L, d_a), tau (B,), sigma (B,), features (B, F)."""
        return self.net(x, tau, self.net.prepare(sigma, features))

    # ------------------------------------------------------------------ training
    def loss(
        self,
        batch: Mapping[str, Tensor],
        *,
        sigma: Tensor | None = None,
        tau: Tensor | None = None,
        action_noise: Tensor | None = None,
        context_noise: Tensor | None = None,
    ) -> Tensor:
        """Flow-matching loss (scalar) on a batch of raw-unit demo windows.

        batch[OBS] (B, d_o), batch[GOAL] (B, d_g) if goal_dim > 0, batch[POINTCLOUD] (B, N, 3) in
        pointcloud mode, batch[ACTION] (B, L, d_a).
        sigma, tau ~ U[0, 1] and the noises ~ N(0, I) unless given (tests pass them explicitly).
        """
        if ACTION not in batch:
            raise ValueError(f"batch has no key {ACTION!r}; got keys {sorted(batch)}")
        actions = batch[ACTION]
        b, shape = actions.shape[0], (actions.shape[0], self.cfg.chunk_len, self.action_dim)
        _check_shape(actions, shape, f"batch[{ACTION!r}]")
        kw = {"device": actions.device, "dtype": self._dtype()}
        sigma = torch.rand(b, **kw) if sigma is None else sigma
        tau = torch.rand(b, **kw) if tau is None else tau
        eps_a = torch.randn(shape, **kw) if action_noise is None else action_noise
        eps_c = torch.randn(b, self.context_dim, **kw) if context_noise is None else context_noise
        for name, value, want in (("sigma", sigma, (b,)), ("tau", tau, (b,)), ("action_noise", eps_a, shape)):
            _check_shape(value, want, name)

        a_n = self.action_norm.normalize(actions.to(self._dtype()))  # (B, L, d_a) in [-1, 1]
        t = tau.to(a_n.dtype)[:, None, None]  # (B, 1, 1)
        x_tau = (1 - t) * a_n + t * eps_a  # straight path: data at tau = 0, noise at tau = 1
        target = eps_a - a_n  # d x_tau / d tau
        features = self.encode(batch, sigma, eps_c)  # (B, F), context noised at level sigma
        return F.mse_loss(self.velocity(x_tau, tau, sigma, features), target)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        obs: Mapping[str, Tensor],
        sigma: Tensor | float,
        action_noise: Tensor | None = None,
        context_noise: Tensor | None = None,
        steps: int | None = None,
    ) -> Tensor:
        """Generate a chunk of RAW actions (B, L, d_a).

        Args:
            obs: batch[OBS] (B, d_o), batch[GOAL] (B, d_g) if goal_dim > 0 and batch[POINTCLOUD]
                (B, N, 3) in pointcloud mode, raw units.
            sigma: context-noise level in [0, 1], REQUIRED: a float or 0-dim tensor is broadcast
                to the batch, or one per sample (B,).
            action_noise: z (B, L, d_a), the start of the flow at tau = 1; N(0, I) if None.
            context_noise: eps_c (B, d_c); N(0, I) if None (from a low-dim code: ``context_noise_from_code``).
            steps: number of Euler steps, default ``cfg.sample_steps``.
        """
        b = self._input(obs, OBS, self.obs_dim).shape[0]
        kw = {"device": obs[OBS].device, "dtype": self._dtype()}
        sigma = torch.as_tensor(sigma, **kw)
        sigma = sigma.expand(b) if sigma.ndim == 0 else sigma
        _check_shape(sigma, (b,), "sigma")
        steps = self.cfg.sample_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps={steps!r}; expected an integer >= 1")
        shape = (b, self.cfg.chunk_len, self.action_dim)
        x = torch.randn(shape, **kw) if action_noise is None else action_noise
        eps_c = torch.randn(b, self.context_dim, **kw) if context_noise is None else context_noise
        _check_shape(x, shape, "action_noise")
        x = x.to(kw["dtype"])

        # the context features and sigma's embedding are fixed across the Euler steps: compute once
        cond = self.net.prepare(sigma, self.encode(obs, sigma, eps_c))
        dt = 1.0 / steps
        for k in range(steps):  # tau = 1, 1 - dt, ..., dt: only times seen in training
            tau = torch.full((b,), 1.0 - k * dt, **kw)
            x = x - dt * self.net(x, tau, cond)  # Euler step of dx/dtau = v_hat towards tau = 0
        # the data were normalized into [-1, 1]; clamping keeps samples inside the demonstrated range
        return self.action_norm.unnormalize(x.clamp(-1.0, 1.0))

    # ------------------------------------------------------------------ checkpoints
    def to_checkpoint(self) -> dict[str, Any]:
        """A dict of plain types and CPU tensors, loadable with ``torch.load(weights_only=True)``."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": asdict(self.cfg),
            "dims": {"obs_dim": self.obs_dim, "action_dim": self.action_dim, "goal_dim": self.goal_dim},
            "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in self.state_dict().items()},
        }

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any]) -> "CSPPolicy":
        """Rebuild a policy (in eval mode) from ``to_checkpoint``'s dict."""
        if not isinstance(ckpt, Mapping) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a policy checkpoint: expected a dict with format={CHECKPOINT_FORMAT!r}")
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise ValueError(
                f"policy checkpoint version {ckpt.get('version')!r}; expected {CHECKPOINT_VERSION}"
            )
        missing = {"config", "dims", "state_dict"} - set(ckpt)
        if missing:
            raise ValueError(f"policy checkpoint lacks keys {sorted(missing)}")
        try:
            cfg = PolicyConfig(**ckpt["config"])
            policy = cls(cfg, **ckpt["dims"])
        except TypeError as err:  # unknown config field or dims key
            raise ValueError(f"policy checkpoint has a bad config or dims: {err}") from err
        try:
            policy.load_state_dict(ckpt["state_dict"])
        except RuntimeError as err:  # missing/unexpected keys or shapes that disagree with dims
            raise ValueError(
                f"policy checkpoint state_dict does not match its config and dims: {err}"
            ) from err
        return policy.eval()

    def save(self, path: str | PathLike) -> None:
        """Write ``to_checkpoint()`` with torch.save."""
        torch.save(self.to_checkpoint(), path)

    @classmethod
    def load(cls, path: str | PathLike, map_location: Any = "cpu") -> "CSPPolicy":
        """Load a policy (eval mode) from a ``save`` file or a Lightning checkpoint with ``tmrl_policy``."""
        try:
            obj = torch.load(path, map_location=map_location, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            raise ValueError(
                f"{path}: cannot be read by torch.load(weights_only=True) ({err}); expected a file written "
                f"by CSPPolicy.save or a Lightning checkpoint with plain-typed contents"
            ) from err
        if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
            ckpt = obj
        elif isinstance(obj, Mapping) and LIGHTNING_KEY in obj:
            ckpt = obj[LIGHTNING_KEY]
        else:
            found = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
            raise ValueError(
                f"{path}: expected a policy checkpoint (format {CHECKPOINT_FORMAT!r}, from CSPPolicy.save) "
                f"or a Lightning checkpoint with the top-level key {LIGHTNING_KEY!r}; found {found}"
            )
        try:
            policy = cls.from_checkpoint(ckpt)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
        if isinstance(map_location, str | torch.device):
            policy = policy.to(map_location)
        return policy
