"""The remote robot as a fine-tuning backend: one row, stepped over the network (app/robot/client.py).

The learner's ``ChunkEnv`` steps it like any simulated task: the base policy samples the chunk here, on the
learner, and its actions are streamed one request per env step (the robot applies each as it arrives and
answers with the next observation). A step the server answers ``truncated`` (its heartbeat stopped the
robot, another client reset it, it restarted) ends the episode; the collector then resets it. A server that
stays silent longer than ``reconnect_s`` raises :class:`~app.robot.client.RobotUnavailable`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from app.robot.client import RobotClient
from app.tasks.base import SubEnvBatch
from modules.nets.keys import GOAL, OBS


class RemoteBackend(SubEnvBatch):
    """The robot served at ``address``, as the :class:`~app.tasks.base.Backend` of one sub-env."""

    def __init__(self, address: str, timeout_s: float = 5.0, reconnect_s: float = 120.0, client=None) -> None:
        self.client = client or RobotClient(address, timeout_s=timeout_s, reconnect_s=reconnect_s)
        spec = self.client.spec
        self.num_envs = 1
        self.max_episode_steps = int(spec["max_episode_steps"])
        shapes = {k: (tuple(v["shape"]), v["dtype"]) for k, v in spec["observation"].items()}
        self.obs_dim = int(np.prod(shapes[OBS][0]))
        self.goal_dim = int(np.prod(shapes[GOAL][0])) if GOAL in shapes else 0
        self.action_dim = len(spec["action"]["low"])
        self.sensor_keys = [k for k in shapes if k not in (OBS, GOAL)]
        self.observation = np.zeros((1, self.obs_dim), np.float32)
        self.goal = np.zeros((1, self.goal_dim), np.float32)
        for key in self.sensor_keys:  # image (1, V, H, W, 3) uint8, pointcloud (1, P, 3) float32
            shape, dtype = shapes[key]
            setattr(self, key, np.zeros((1, *shape), dtype))
        self.reward = np.zeros(1, np.float32)
        self.terminated = np.zeros(1, bool)
        self.truncated = np.zeros(1, bool)
        self.success = np.zeros(1, bool)
        self.step_count = np.zeros(1, np.int64)
        self._was_reset = np.zeros(1, bool)
        self.ended: list[str] = []  # why the server ended episodes early (heartbeat, restart, ...)

    def seed(self, seed: int | None) -> None:
        """A robot's starting states are not seedable: nothing to do."""

    def _write(self, obs: dict[str, np.ndarray]) -> None:
        self.observation[0] = obs[OBS].reshape(-1)
        if self.goal_dim:
            self.goal[0] = obs[GOAL].reshape(-1)
        for key in self.sensor_keys:
            getattr(self, key)[0] = obs[key]

    def reset(self, mask: np.ndarray | None = None, seeds: Sequence[int] | None = None) -> None:
        if not self._mask(mask, "reset")[0]:
            return
        self._write(self.client.reset())
        self.reward[0] = 0.0
        self.terminated[0] = self.truncated[0] = self.success[0] = False
        self.step_count[0] = 0
        self._was_reset[0] = True

    def step(self, actions: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        idx, actions = self._rows_to_step(actions, mask)
        if len(idx):
            obs, reply = self.client.step(actions[0])
            if obs:  # (a restarted server has no observation of the lost episode: the last one stays)
                self._write(obs)
            self.step_count[0] += 1
            self.success[0] = bool(reply["success"])
            self.reward[0] = float(self.success[0])
            self.terminated[0] = bool(reply["terminated"])
            self.truncated[0] = bool(reply["truncated"]) and not self.terminated[0]
            ended = (reply.get("info") or {}).get("ended")
            if ended:
                self.ended.append(ended)
                print(f"[tmrl] robot episode ended early: {ended}", flush=True)
        return {k: getattr(self, k).copy() for k in ("reward", "terminated", "truncated", "success")}

    def observe(self, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        out = {OBS: self.observation.copy(), GOAL: self.goal.copy()}
        return out | {key: getattr(self, key).copy() for key in self.sensor_keys}

    def link_metrics(self) -> dict[str, float]:
        """The link since the last call, for the run's metrics: median round trip per op (ms), reconnects."""
        out = {f"robot/{op}_rtt_ms": v for op, v in self.client.take_latency_ms().items()}
        return out | {"robot/reconnects": float(self.client.reconnects)}

    def close(self) -> None:
        self.client.close()
