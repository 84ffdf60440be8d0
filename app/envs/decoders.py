"""Decoders: a high-level agent action (flat, in [-1, 1]^D) -> a chunk of low-level actions.

``BasePolicyDecoder`` decodes (z, sigma, eps_c) through the frozen CSP policy (TMRL, the fixed-sigma
ablation, DSRL), ``RawDecoder`` takes the action as the chunk itself (SAC), ``ZeroShotDecoder`` runs the base
policy alone (the reference a fine-tuning agent must not start below). All three implement
``ChunkDecoder`` completely, so no caller probes for optional parts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

import torch
from torch import Tensor

from modules.nets.keys import OBS
from modules.nets.policy import CSPPolicy

HEADS = ("z", "sigma", "eps_c")  # the parts of the high-level action a layout may hold
Z_MODES = ("repeat", "full")
Z_MAPS = ("atanh", "erfinv", "linear")
EPS_MAPS = ("atanh", "linear")
_ERFINV_CLIP = 1.0 - 1e-6  # erfinv(+-1) is infinite; the clip caps |z| at about 4.9


def _atanh(u: Tensor, bound: float) -> Tensor:
    """atanh(u) clipped to [-bound, bound]: the pre-tanh value of a squashed-Gaussian action, so an actor
    whose pre-tanh distribution is N(0, 1) hands out exactly N(0, 1) noise (up to the clip)."""
    edge = math.tanh(bound)
    return torch.atanh(u.clamp(-edge, edge))


class ChunkDecoder(Protocol):
    """What ChunkEnv and the agent need from a decoder: the whole contract, no optional parts."""

    action_dim: int  # D, size of the flat high-level action in [-1, 1]^D
    chunk_len: int  # actions per decoded chunk (ChunkEnv executes the first exec_horizon of them)
    env_action_dim: int  # d_a, size of one low-level action
    sizes: dict[str, int]  # the flat action's layout: head name -> size, in order (sum = action_dim)
    uses_base: bool  # True when the chunks come from the frozen base policy (its noise is the prior)
    sigma_max: float  # sigma = sigma_max * (u + 1) / 2 for a "sigma" head (unused without one)
    feature_dim: int  # F, size of ``features``: what the agent sees of a high-dimensional context; 0: none

    def split(self, action: Tensor) -> dict[str, Tensor]:
        """The flat action (N, D) as its named parts (decoded to the units the chunk generator takes)."""

    def features(self, obs: Mapping[str, Tensor]) -> Tensor:
        """(N, F) features of the observation's context for the agent ((N, 0) when F = 0)."""

    def __call__(self, action: Tensor, obs: Mapping[str, Tensor]) -> Tensor:
        """Chunk (N, L, d_a) of raw low-level actions."""


def _check_action(action: Tensor, dim: int, who: str) -> None:
    if not isinstance(action, Tensor) or action.ndim != 2 or action.shape[1] != dim:
        shape = tuple(action.shape) if isinstance(action, Tensor) else type(action).__name__
        raise ValueError(f"{who}: action is {shape}; expected a tensor of shape (N, {dim})")


class BasePolicyDecoder:
    """Flat action in [-1, 1]^D -> (z, sigma, eps_c) -> a chunk from the frozen CSP policy.

    Args:
        policy: the pre-trained policy. It is put in eval mode with gradients off and never changed.
        heads: ordered subset of ``HEADS``, the layout of the flat action; must hold "z". Absent heads take
            defaults: sigma = ``fixed_sigma``, eps_c = zeros.
        sigma_max: sigma = sigma_max * (u + 1) / 2, so u in [-1, 1] spans [0, sigma_max].
        fixed_sigma: the context-noise level when "sigma" is not a head.
        eps_bound: bound of eps_c (or of its code): |eps_c| <= eps_bound.
        eps_map: "atanh": eps_c = atanh(u) clipped to the bound, so an actor head with a N(0, 1) pre-tanh
            distribution gives exactly the N(0, I) context noise of pre-training; "linear": eps_c =
            eps_bound * u. A policy with a context code map (``context_code_dim`` d > 0, needed for point
            clouds) takes the code instead: the eps_c head has d outputs and eps_c =
            ``policy.context_noise_from_code(code)``.
        z_mode: "repeat": d_z = d_a, one vector repeated over the chunk; "full": d_z = L * d_a (with a
            N(0, 1) actor and "atanh", exactly the noise the base policy was trained on).
        z_map: "atanh": z = atanh(u), clipped to +-z_bound (see eps_map); "erfinv": z = sqrt(2) erfinv(u),
            so a UNIFORM u gives N(0, 1) noise; "linear": z = 3 u.
        z_bound: the clip of the "atanh" map.
        steps: Euler steps per chunk; None = the policy's ``cfg.sample_steps``.
    """

    def __init__(
        self,
        policy: CSPPolicy,
        heads: list[str],
        sigma_max: float = 1.0,
        fixed_sigma: float = 0.0,
        eps_bound: float = 1.0,
        z_mode: str = "repeat",
        z_map: str = "erfinv",
        steps: int | None = None,
        z_bound: float = 4.0,
        eps_map: str = "linear",
    ) -> None:
        heads = list(heads)
        if "z" not in heads or len(set(heads)) != len(heads) or not set(heads) <= set(HEADS):
            raise ValueError(f"heads={heads!r}; expected distinct names from {list(HEADS)} including 'z'")
        for name, value, ok, want in (
            ("sigma_max", sigma_max, 0 < sigma_max <= 1, "in (0, 1]"),
            ("fixed_sigma", fixed_sigma, 0 <= fixed_sigma <= 1, "in [0, 1]"),
            ("eps_bound", eps_bound, eps_bound > 0, "> 0"),
            ("z_mode", z_mode, z_mode in Z_MODES, f"one of {list(Z_MODES)}"),
            ("z_map", z_map, z_map in Z_MAPS, f"one of {list(Z_MAPS)}"),
            ("z_bound", z_bound, z_bound > 0, "> 0"),
            ("eps_map", eps_map, eps_map in EPS_MAPS, f"one of {list(EPS_MAPS)}"),
            ("steps", steps, steps is None or (isinstance(steps, int) and steps >= 1), "None or >= 1"),
        ):
            if not ok:
                raise ValueError(f"BasePolicyDecoder {name}={value!r}; expected {want}")
        # a context the agent sees through features is too large for an eps_c head of its own size
        if policy.feature_dim and "eps_c" in heads and not policy.context_code_dim:
            raise ValueError(
                f"the policy's context is a {policy.cfg.context_mode} ({policy.context_dim} numbers) with no "
                f"context code map, too large for an eps_c head; pre-train with policy.context_code_dim > 0 "
                f"(e.g. 16), or fine-tune without the eps_c head (method=dsrl)"
            )
        self.policy = policy.eval().requires_grad_(False)  # frozen: only sampled, never trained
        self.heads, self.sigma_max, self.fixed_sigma = heads, sigma_max, fixed_sigma
        self.eps_bound, self.z_mode, self.z_map, self.steps = eps_bound, z_mode, z_map, steps
        self.z_bound, self.eps_map = z_bound, eps_map
        self.chunk_len, self.env_action_dim = policy.cfg.chunk_len, policy.action_dim
        self.feature_dim = policy.feature_dim  # CONTEXT_FEATURE size; 0: the agent sees OBS and GOAL
        self.uses_base = True
        d_z = policy.action_dim * (policy.cfg.chunk_len if z_mode == "full" else 1)
        sizes = {"z": d_z, "sigma": 1, "eps_c": policy.context_code_dim or policy.context_dim}
        self.sizes = {h: sizes[h] for h in heads}  # layout of the flat action, in order
        self.action_dim = sum(self.sizes.values())

    def split(self, action: Tensor) -> dict[str, Tensor]:
        """Decode a flat action (N, D) into z (N, L, d_a), sigma (N,) and eps_c (N, d_c), defaults filled
        (eps_c is the code (N, d) when the policy has a context code map)."""
        _check_action(action, self.action_dim, "BasePolicyDecoder")
        # a squashed Gaussian can land a hair outside [-1, 1] in float32; the maps assume the box
        chunks = action.clamp(-1.0, 1.0).split(list(self.sizes.values()), dim=-1)
        parts = dict(zip(self.heads, chunks, strict=True))
        n, length, d_a = action.shape[0], self.chunk_len, self.env_action_dim
        u = parts["z"]  # (N, d_z)
        if self.z_map == "atanh":
            z = _atanh(u, self.z_bound)
        elif self.z_map == "erfinv":
            z = math.sqrt(2.0) * torch.erfinv(u.clamp(-_ERFINV_CLIP, _ERFINV_CLIP))
        else:
            z = 3.0 * u
        z = z[:, None, :].expand(n, length, d_a) if self.z_mode == "repeat" else z.reshape(n, length, d_a)
        if "sigma" in parts:
            sigma = self.sigma_max * (parts["sigma"][:, 0] + 1.0) / 2.0  # (N,)
        else:
            sigma = action.new_full((n,), self.fixed_sigma)
        if "eps_c" in parts:
            u = parts["eps_c"]
            eps_c = _atanh(u, self.eps_bound) if self.eps_map == "atanh" else self.eps_bound * u  # (N, d_c)
        else:
            eps_c = action.new_zeros((n, self.policy.context_dim))  # no head: the clean context
        return {"z": z, "sigma": sigma, "eps_c": eps_c}

    def inputs(self, obs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The policy's inputs (its ``input_keys``) from the env's observation, on the policy's device."""
        device = next(self.policy.parameters()).device
        return {k: obs[k].to(device) for k in self.policy.input_keys}

    @torch.no_grad()
    def __call__(self, action: Tensor, obs: Mapping[str, Tensor]) -> Tensor:
        """Chunk (N, L, d_a) of raw low-level actions for all N sub-envs in one batched sample call."""
        device = next(self.policy.parameters()).device
        parts = {k: v.to(device) for k, v in self.split(action).items()}
        eps_c = parts["eps_c"]
        if "eps_c" in self.sizes and self.policy.context_code_dim:
            eps_c = self.policy.context_noise_from_code(eps_c)  # (N, d) code -> (N, d_c)
        chunk = self.policy.sample(
            self.inputs(obs), parts["sigma"], action_noise=parts["z"], context_noise=eps_c, steps=self.steps
        )
        return chunk.to(action.device, torch.float32)

    @torch.no_grad()
    def features(self, obs: Mapping[str, Tensor]) -> Tensor:
        """(N, F) features of the CLEAN context (sigma = 0) by the frozen policy: the agent's view of it."""
        if not self.feature_dim:
            return torch.zeros(obs[OBS].shape[0], 0)
        return self.policy.context_features(self.inputs(obs)).float().cpu()


class RawDecoder:
    """The flat action IS the chunk: exec_horizon * d_a values in [-1, 1] (the SAC baseline).

    Args:
        exec_horizon: actions per chunk.
        action_dim: d_a, size of one low-level action (``self.action_dim`` is the flat size H * d_a).
    """

    def __init__(self, exec_horizon: int, action_dim: int) -> None:
        for name, value in (("exec_horizon", exec_horizon), ("action_dim", action_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RawDecoder {name}={value!r}; expected an integer >= 1")
        self.chunk_len, self.env_action_dim = exec_horizon, action_dim
        self.action_dim = exec_horizon * action_dim
        self.sizes = {"action": self.action_dim}  # one head: the raw chunk
        self.uses_base, self.sigma_max, self.feature_dim = False, 1.0, 0

    def split(self, action: Tensor) -> dict[str, Tensor]:
        """{"action": (N, H, d_a)}: the chunk itself."""
        return {"action": self(action, {})}

    def features(self, obs: Mapping[str, Tensor]) -> Tensor:
        return torch.zeros(obs[OBS].shape[0], 0)

    def __call__(self, action: Tensor, obs: Mapping[str, Tensor]) -> Tensor:
        """(N, H * d_a) -> (N, H, d_a), action-major (the first d_a values are the first action)."""
        _check_action(action, self.action_dim, "RawDecoder")
        return action.reshape(action.shape[0], self.chunk_len, self.env_action_dim)


class ZeroShotDecoder:
    """The base policy alone with fresh N(0, I) action and context noise, at sigma = 0 by default (BC
    zero-shot, METHOD.md section 2): the reference a fine-tuning agent must not start below. Its
    one-number action is ignored.

    Args:
        policy: the pre-trained policy (frozen).
        steps: Euler steps per chunk; None = the policy's ``cfg.sample_steps``.
        sigma: the context-noise level, in [0, 1].
    """

    action_dim = 1
    sizes = {"unused": 1}  # the one-number action the env's spec needs
    uses_base, sigma_max = True, 1.0

    def __init__(self, policy: CSPPolicy, steps: int | None = None, sigma: float = 0.0) -> None:
        if not 0.0 <= sigma <= 1.0:
            raise ValueError(f"ZeroShotDecoder sigma={sigma!r}; expected a value in [0, 1]")
        self.sigma = float(sigma)
        self.policy = policy.eval().requires_grad_(False)
        self.chunk_len, self.env_action_dim, self.steps = policy.cfg.chunk_len, policy.action_dim, steps
        self._base = BasePolicyDecoder(policy, ["z"], steps=steps)
        self.feature_dim = self._base.feature_dim

    def split(self, action: Tensor) -> dict[str, Tensor]:
        """{"sigma": (N,)}: the fixed level (the action is ignored)."""
        _check_action(action, 1, "ZeroShotDecoder")
        return {"sigma": action.new_full((action.shape[0],), self.sigma)}

    @torch.no_grad()
    def __call__(self, action: Tensor, obs: Mapping[str, Tensor]) -> Tensor:
        """Chunk (N, L, d_a): z and eps_c drawn from torch's global generator (seed it for a fixed set)."""
        _check_action(action, 1, "ZeroShotDecoder")
        chunk = self.policy.sample(self._base.inputs(obs), self.sigma, steps=self.steps)
        return chunk.to(action.device, torch.float32)

    def features(self, obs: Mapping[str, Tensor]) -> Tensor:
        return self._base.features(obs)
