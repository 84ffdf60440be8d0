"""The interface a lab implements for its robot, served by `tmrl robot-server` (app/robot/server.py).

A robot is one episode at a time of a goal-reaching task::

    class MyArm(Robot):
        observation_spec = {"observation": ArraySpec((7,)), "goal": ArraySpec((3,)),
                            "image": ArraySpec((1, 64, 64, 3), "uint8")}
        action_spec = BoxSpec(low=[-1] * 4, high=[1] * 4)
        max_episode_steps = 300
        env = "my-arm"                        # what the policy was pre-trained on (a name, for checks)

        def reset(self): ...                  # move to a start, return the observation dict
        def step(self, action): ...           # ONE action: (obs, reward, terminated, truncated, info)
        def safe_stop(self): ...              # hold position: called when the learner goes silent
        def success(self, obs, info): ...     # optional detector: True / False, or None (unknown)

The keys are the policy's: ``observation`` (d_o,) float32 proprioception, ``goal`` (d_g,) float32 (may be
(0,)), and any sensor the policy reads (``image`` (V, H, W, 3) uint8, ``pointcloud`` (P, 3) float32). The
server enforces ``action_spec`` before ``step`` sees an action, times every request out against its
heartbeat, and calls ``safe_stop`` when the learner misses it. Nothing here needs more than numpy: the
robot's computer installs numpy and pyzmq, not the learner's stack.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ArraySpec:
    """One observation array: its shape and dtype name."""

    shape: tuple[int, ...]
    dtype: str = "float32"

    def check(self, name: str, value: np.ndarray) -> np.ndarray:
        """``value`` as this spec's dtype; ValueError naming ``name`` if its shape differs."""
        a = np.asarray(value)
        if tuple(a.shape) != tuple(self.shape):
            raise ValueError(f"observation {name!r} has shape {a.shape}; the robot's spec says {self.shape}")
        return a.astype(self.dtype, copy=False)


@dataclass(frozen=True)
class BoxSpec:
    """The action box: one (low, high) pair per action dimension."""

    low: tuple[float, ...]
    high: tuple[float, ...]
    dims: int = field(init=False)

    def __post_init__(self) -> None:
        low, high = np.asarray(self.low, np.float64), np.asarray(self.high, np.float64)
        if low.ndim != 1 or low.shape != high.shape or not np.all(low < high):
            raise ValueError(
                f"BoxSpec: low {self.low} and high {self.high} must be 1-d, equal length, low < high"
            )
        object.__setattr__(self, "low", tuple(float(v) for v in low))
        object.__setattr__(self, "high", tuple(float(v) for v in high))
        object.__setattr__(self, "dims", len(low))


class Robot(ABC):
    """A robot (or the stand-in of app/robot/sim.py) as `tmrl robot-server` serves it (module docstring)."""

    observation_spec: dict[str, ArraySpec]
    action_spec: BoxSpec
    max_episode_steps: int
    env: str = ""  # the environment the policy fine-tuned here was pre-trained on (checked by the learner)

    @abstractmethod
    def reset(self) -> dict[str, np.ndarray]:
        """Start an episode; the first observation."""

    @abstractmethod
    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Apply one action (already within ``action_spec``): (obs, reward, terminated, truncated, info)."""

    def safe_stop(self) -> None:  # noqa: B027 - optional: a robot that stands still by itself needs none
        """Stop moving (hold or zero action): the learner went silent. Default: nothing to do."""

    def success(self, obs: dict[str, np.ndarray], info: dict[str, Any]) -> bool | None:
        """An optional success detector; None: the robot cannot tell (a human may label it)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional
        """Release the hardware."""
