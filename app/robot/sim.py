"""The stand-in robot: any simulated task of the project behind the :class:`~app.robot.interface.Robot`
interface, served by `tmrl robot-server --env ...` in tests and demos in place of real hardware.

It is the task's own fine-tuning backend with one sub-env (so the episodes are the ones `tmrl finetune`
would run in process), seen one step at a time. ``step_delay_s`` adds a fixed wait to every step, to
stand in for a controller's period. ``safe_stops`` counts the server's stops.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from app.robot.interface import ArraySpec, BoxSpec, Robot


class SimRobot(Robot):
    """Task target ``target`` (a ``TaskConfig``) in simulation, with the sensor a policy reads (``sensor``:
    a pre-trained policy's ``sensor`` settings, e.g. its cameras; {} for a state policy)."""

    def __init__(
        self, target, seed: int = 0, sensor: dict[str, Any] | None = None, step_delay_s: float = 0.0
    ):
        self.backend = target.task.make_backend(target, 1, seed, sensor or {})
        self.env = target.env
        self.max_episode_steps = target.max_episode_steps
        self.step_delay_s = step_delay_s
        self.safe_stops = 0
        first = self._obs()
        self.observation_spec = {k: ArraySpec(tuple(v.shape), v.dtype.name) for k, v in first.items()}
        b = self.backend
        low = getattr(b, "_low", -np.ones(b.action_dim))  # the maze's box; the cube's is [-1, 1]
        high = getattr(b, "_high", np.ones(b.action_dim))
        self.action_spec = BoxSpec(tuple(low), tuple(high))

    def _obs(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v[0]) for k, v in self.backend.observe().items()}

    def reset(self) -> dict[str, np.ndarray]:
        self.backend.reset()
        return self._obs()

    def step(self, action: np.ndarray):
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        out = self.backend.step(np.asarray(action, np.float32)[None], np.ones(1, bool))
        info = {"success": bool(out["success"][0])}
        # the server keeps its own step count and time limit; the backend's truncation is the same limit
        return (
            self._obs(),
            float(out["reward"][0]),
            bool(out["terminated"][0]),
            bool(out["truncated"][0]),
            info,
        )

    def safe_stop(self) -> None:
        self.safe_stops += 1  # a simulation stands still between steps

    def close(self) -> None:
        self.backend.close()
