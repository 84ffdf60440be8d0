"""The CSP policy: ONE class for pre-training (``loss``) and fine-tuning (``sample``).

A flow-matching generator of action chunks conditioned on a diffusion-noised context
(METHOD.md section 1). Normalization statistics live inside it as buffers, and ``save``/``load``
need torch alone, so a TMRL job or a robot loads it without Lightning.
"""

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from os import PathLike
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.nets.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    load_checkpoint_file,
    plain_copy,
    read_checkpoint,
)
from modules.nets.contexts import CONTEXTS
from modules.nets.contexts.base import fetch
from modules.nets.encoders import ENCODERS
from modules.nets.image import ImageEncoderConfig
from modules.nets.keys import ACTION, OBS
from modules.nets.normalizer import MinMax
from modules.nets.pointnet import POINTNET_WIDTHS, NoiseCodeMap
from modules.nets.schedule import SCHEDULES, noise_context
from modules.nets.transformer import FlowTransformer


@dataclass
class PolicyConfig:
    """Architecture and sampling settings of ``CSPPolicy``.

    Attributes:
        context_mode: key of ``modules.nets.contexts.CONTEXTS``, what gets noised and how it is encoded:
            "goal" (the goal; the observation is clean), "observation" (observation ++ goal, if any) or
            "pointcloud" (the xyz of ``batch[POINTCLOUD]`` (B, N, 3), by a PointNet; the rest is clean) or
            "image_embedding" (the normalized embedding of the frames ``batch[IMAGE]`` (B, V, H, W, 3) by
            ``image_encoder``; the rest is clean).
        encoder: key of ``ENCODERS`` for the low-dim context encoders (pointcloud mode: the clean one;
            image_embedding: the clean one and the embedding's).
        chunk_len: L, actions per generated chunk.
        width, depth, heads, mlp_ratio: transformer size (width must be divisible by heads).
        schedule: key of ``SCHEDULES``, the context-noise schedule over sigma in [0, 1].
        sample_steps: K, default number of Euler steps in ``sample``.
        num_points: N, points per cloud; required (>= 1) in pointcloud mode, 0 in the other modes.
            A batch with another N is refused (clouds are downsampled to a fixed N per dataset).
        pointnet_widths: per-point MLP widths of the PointNet (pointcloud mode only).
        context_code_dim: d > 0 adds a fixed map from a d-dim code to eps_c (``context_noise_from_code``),
            the low-dimensional eps_c parameterization TMRL needs for large contexts; 0: none.
        image_encoder: the camera-frame encoder (image_embedding mode only; a dict of its fields is
            converted): timm backbone, weights, norm, frames' size and views.
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
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)

    def __post_init__(self) -> None:
        self.image_encoder = ImageEncoderConfig.from_value(self.image_encoder)  # a checkpoint holds a dict
        choices = {"context_mode": list(CONTEXTS), "encoder": sorted(ENCODERS), "schedule": sorted(SCHEDULES)}
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
        for name in ("num_points", "context_code_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"PolicyConfig.{name}={value!r}; expected an integer >= 0")
        CONTEXTS[self.context_mode].check_config(self)


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
        sensor: plain JSON-like description of the sensor the policy was trained with (cameras, crop
            box, point count, ...); saved in the checkpoint. Default {}.

    Attributes:
        context: the ``ContextMode`` of ``cfg.context_mode`` (``CONTEXTS``): the context's normalizers
            (``context.obs_norm``, ``context.goal_norm``, ``context.cloud_norm``...) and encoders
            (``context.clean_encoder``, ``context.noised_encoder``).
        context_dim: d_c, size of the NOISED context and of eps_c (goal: d_g; observation: d_o + d_g;
            pointcloud: N * 3, eps_c flat (B, N * 3), point i's xyz at [3i, 3i + 3); image_embedding:
            V * D, view v's embedding noise at [v * D, (v + 1) * D)).
        action_norm: MinMax normalizer of the actions onto [-1, 1].
    """

    def __init__(
        self,
        cfg: PolicyConfig,
        obs_dim: int,
        action_dim: int,
        goal_dim: int = 0,
        *,
        sensor: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("obs_dim", obs_dim, 1),
            ("action_dim", action_dim, 1),
            ("goal_dim", goal_dim, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"CSPPolicy {name}={value!r}; expected an integer >= {low}")
        self.cfg = cfg
        self.obs_dim, self.action_dim, self.goal_dim = obs_dim, action_dim, goal_dim
        self.sensor = {} if sensor is None else sensor
        self.action_norm = MinMax(action_dim, ACTION)
        self.context = CONTEXTS[cfg.context_mode](cfg, obs_dim, goal_dim)
        self.context_dim = self.context.context_dim
        size = (cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio)
        self.net = FlowTransformer(action_dim, cfg.chunk_len, self.context.condition_dim, *size)
        if cfg.context_code_dim > self.context_dim:
            raise ValueError(
                f"PolicyConfig.context_code_dim={cfg.context_code_dim} exceeds context_dim={self.context_dim}"
            )
        # own seeded generator: building the map does not shift the weight initialization
        self.code_map = NoiseCodeMap(cfg.context_code_dim, self.context_dim) if cfg.context_code_dim else None

    # ------------------------------------------------------------------ description
    @property
    def sensor(self) -> dict[str, Any]:
        """The sensor the policy was trained with (plain JSON-like dict; {} when none was given)."""
        return self._sensor

    @sensor.setter
    def sensor(self, value: Mapping[str, Any]) -> None:
        if not isinstance(value, Mapping):
            raise ValueError(f"CSPPolicy.sensor must be a dict; got {type(value).__name__}")
        self._sensor = plain_copy(value, "CSPPolicy.sensor")

    @property
    def input_keys(self) -> tuple[str, ...]:
        """The batch keys the policy reads, in order: OBS, GOAL (if goal_dim > 0), then the mode's own."""
        return self.context.input_keys

    @property
    def stats_keys(self) -> frozenset[str]:
        """The statistic names ``set_normalization`` expects, exactly."""
        return self.context.stats_keys | {"action_min", "action_max"}

    @property
    def feature_dim(self) -> int:
        """Size of ``context_features``: 0 when a fine-tuning agent sees the raw observation instead."""
        return self.context.feature_dim

    @property
    def context_code_dim(self) -> int:
        """d, the size of the code ``context_noise_from_code`` takes; 0 when the policy has no code map."""
        return self.cfg.context_code_dim

    # ------------------------------------------------------------------ normalization
    def set_normalization(self, stats: Mapping[str, np.ndarray | Tensor]) -> None:
        """Set dataset statistics, exactly the names of ``stats_keys``: observation_mean/std, goal_mean/std
        (if goal_dim > 0), action_min/max and the context mode's own (see its ``set_stats``)."""
        expected = self.stats_keys
        missing, unknown = expected - set(stats), set(stats) - expected
        if missing or unknown:
            raise ValueError(
                f"normalization stats: missing keys {sorted(missing)}, unexpected keys {sorted(unknown)}; "
                f"expected exactly {sorted(expected)} for context_mode={self.cfg.context_mode!r} with "
                f"goal_dim={self.goal_dim}"
            )
        self.context.set_stats(stats)
        self.action_norm.set_stats(stats["action_min"], stats["action_max"])

    # ------------------------------------------------------------------ context
    def _dtype(self) -> torch.dtype:
        return self.net.pos_embed.dtype

    def noised_context(
        self, obs: Mapping[str, Tensor], sigma: Tensor, context_noise: Tensor
    ) -> tuple[Tensor | None, Tensor]:
        """(clean part (B, d) or None, noised normalized context (B, d_c), or (B, N, 3) for a cloud).

        ``sigma`` (B,) in [0, 1] and ``context_noise`` eps_c (B, d_c) set the forward noising of the
        normalized context; at sigma = 0 the context passes through exactly. A cloud's eps_c is flat:
        point i's xyz noise is eps_c[:, 3i:3i + 3].
        """
        clean, c_n = self.context.split(obs, self._dtype())
        _check_shape(context_noise, (c_n.shape[0], self.context_dim), "context_noise")
        eps = context_noise.to(c_n.dtype).reshape(c_n.shape)
        return clean, noise_context(c_n, sigma, eps, self.cfg.schedule)

    def encode(self, obs: Mapping[str, Tensor], sigma: Tensor, context_noise: Tensor) -> Tensor:
        """Context features (B, F): enc_clean(clean part) ++ enc_noised(noised context).

        Arguments as in ``noised_context``; in pointcloud mode enc_noised is the PointNet.
        """
        return self.context.encode(*self.noised_context(obs, sigma, context_noise))

    @torch.no_grad()
    def context_features(self, obs: Mapping[str, Tensor]) -> Tensor:
        """float32 (B, feature_dim) on the policy's device: the noised-part encoder of the CLEAN context.

        What a fine-tuning agent sees instead of a high-dimensional context (pointcloud: the PointNet of
        the normalized cloud; image_embedding: the encoder of the clean embedding). ``obs`` holds
        ``input_keys`` in raw units. Raises ValueError when the mode has none (feature_dim 0: goal and
        observation modes).
        """
        return self.context.features(obs, self._dtype()).float()

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
    @torch.no_grad()
    def track_statistics(self, batch: Mapping[str, Tensor]) -> None:
        """Update the running statistics of the context (an image embedding's; a no-op for the others) on
        a raw training batch, as a training forward would, without gradients (the EMA copy's, per step)."""
        self.context.track_statistics(batch, self._dtype())

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

        batch: the ``input_keys`` (batch[OBS] (B, d_o), ...) and batch[ACTION] (B, L, d_a).
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
            obs: the ``input_keys`` in raw units: batch[OBS] (B, d_o), batch[GOAL] (B, d_g) if
                goal_dim > 0, batch[POINTCLOUD] (B, N, 3) in pointcloud mode, batch[IMAGE] (B, V, H, W, 3)
                uint8 in image_embedding mode.
            sigma: context-noise level in [0, 1], REQUIRED: a float or 0-dim tensor is broadcast
                to the batch, or one per sample (B,).
            action_noise: z (B, L, d_a), the start of the flow at tau = 1; N(0, I) if None.
            context_noise: eps_c (B, d_c); N(0, I) if None (from a low-dim code: ``context_noise_from_code``).
            steps: number of Euler steps, default ``cfg.sample_steps``.
        """
        b = fetch(obs, OBS, self.obs_dim, self._dtype()).shape[0]
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
            "sensor": plain_copy(self.sensor, "CSPPolicy.sensor"),
            "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in self.state_dict().items()},
        }

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any]) -> "CSPPolicy":
        """Rebuild a policy (in eval mode) from ``to_checkpoint``'s dict, of any readable version.

        A version-1 dict (no sensor, the context's modules at the top level) is read with sensor {}
        (see ``modules.nets.checkpoint.read_checkpoint``). An image backbone is built without its weight
        sources (no ``image_encoder.weights`` file is read, nothing is fetched by timm): the state_dict
        holds its weights; ``policy.cfg`` keeps the saved config.
        """
        config, dims, sensor, state_dict = read_checkpoint(ckpt)
        try:
            cfg = PolicyConfig(**config)
            offline = replace(cfg, image_encoder=cfg.image_encoder.without_weight_sources())
            policy = cls(offline, **dims, sensor=sensor)
        except TypeError as err:  # unknown config field or dims key
            raise ValueError(f"policy checkpoint has a bad config or dims: {err}") from err
        policy.cfg = cfg  # saving again writes the config as it was trained
        try:
            policy.load_state_dict(state_dict)
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
        ckpt = load_checkpoint_file(path, map_location)
        try:
            policy = cls.from_checkpoint(ckpt)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
        if isinstance(map_location, str | torch.device):
            policy = policy.to(map_location)
        return policy
