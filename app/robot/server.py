"""`tmrl robot-server`: serve a :class:`~app.robot.interface.Robot` to a learner over ZeroMQ (REP socket).

One request, one reply (app/robot/protocol.py):

    spec            the robot's observation and action specs, time limit, heartbeat, session id
    reset           start an episode (after a human's Enter with ``confirm_reset``); its first observation
    step action     apply ONE action of the current episode; obs, reward, terminated, truncated, success
    ping            keep the episode alive while the learner computes (the robot holds meanwhile)

Safety lives here, not in the learner:

- **Action bounds.** A non-finite action or one of the wrong size is refused; one outside ``action_spec``
  is clipped into it (``out_of_bounds="clip"``, reported in the reply's info) or refused without moving
  (``"refuse"``).
- **Heartbeat.** While an episode runs, no request for ``heartbeat_s`` (the learner died, hung, or the
  network fell) stops the robot (``robot.safe_stop()``) and ends the episode: the learner's next step is
  answered ``truncated`` with the reason. A ``ping`` after ``heartbeat_s`` without a step also calls
  ``safe_stop`` (the robot holds while the learner updates) but keeps the episode.
- **Whose episode.** Every step names the episode it belongs to (session id + count); a step of an episode
  that ended (heartbeat, another client's reset, a server restart) is answered ``truncated``, never run.

Human in the loop: ``confirm_reset`` waits for Enter on the robot's terminal before each episode (someone
puts the scene back); ``label_success`` asks "success? [y/n]" at the end of an episode the robot's own
detector (``Robot.success``, or ``info["success"]``) cannot judge. Both answers are recorded in the
episode's replies (info ``human_reset``, ``human_success``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from app.robot.interface import Robot
from app.robot.protocol import VERSION, ProtocolError, decode, encode, parse_address


@dataclasses.dataclass
class ServerConfig:
    """How the robot is served.

    Attributes:
        address: HOST:PORT to bind ("0.0.0.0:5555" for every interface; the default is loopback only).
        heartbeat_s: the longest silence of the learner during an episode before the robot stops.
        out_of_bounds: "clip" an action outside the robot's box into it, or "refuse" it.
        confirm_reset: wait for Enter on this terminal before each episode starts.
        label_success: ask a human at the end of an episode whose success the robot cannot detect.
    """

    address: str = "127.0.0.1:5555"
    heartbeat_s: float = 2.0
    out_of_bounds: str = "clip"
    confirm_reset: bool = False
    label_success: bool = False

    def __post_init__(self) -> None:
        parse_address(self.address)
        if not (isinstance(self.heartbeat_s, int | float) and math.isfinite(self.heartbeat_s)) or (
            self.heartbeat_s <= 0
        ):
            raise ValueError(f"heartbeat_s={self.heartbeat_s!r}; expected seconds > 0")
        if self.out_of_bounds not in ("clip", "refuse"):
            raise ValueError(f"out_of_bounds={self.out_of_bounds!r}; expected 'clip' or 'refuse'")


class RobotServer:
    """Serves ``robot`` as ``cfg`` says; ``prompt`` asks the human (default: ``input``), ``log`` reports."""

    def __init__(
        self,
        robot: Robot,
        cfg: ServerConfig,
        prompt: Callable[[str], str] = input,
        log: Callable[[str], None] = lambda line: print(line, flush=True),
    ) -> None:
        self.robot, self.cfg, self.prompt, self.log = robot, cfg, prompt, log
        self.session = uuid.uuid4().hex[:12]  # a restarted server is another session
        self.episode = 0  # episodes started in this session
        self.live = False  # an episode runs
        self.steps = 0
        self.last_obs: dict[str, np.ndarray] = {}
        self.ended = ""  # why the last episode ended, for a late step
        self.last_request = self.last_step = time.monotonic()
        self.held = False  # safe_stop called since the last step
        self.stats = {"steps": 0, "clipped": 0, "refused": 0, "heartbeat_stops": 0, "holds": 0}
        self.low = np.asarray(robot.action_spec.low, np.float64)
        self.high = np.asarray(robot.action_spec.high, np.float64)
        self.bound_to: str | None = None

    # -- the loop ------------------------------------------------------------------------------------
    def serve(self, stop: threading.Event | None = None) -> None:
        """Answer requests until ``stop`` is set (or Ctrl-C); the robot is stopped on the way out."""
        import zmq

        host, port = parse_address(self.cfg.address)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(f"tcp://{'*' if host in ('0.0.0.0', '*') else host}:{port}")
        self.bound_to = f"{host}:{port}"
        self.log(
            f"[tmrl] robot server on {self.bound_to} (session {self.session}, "
            f"heartbeat {self.cfg.heartbeat_s} s)"
        )
        try:
            while stop is None or not stop.is_set():
                if sock.poll(int(min(self.cfg.heartbeat_s, 0.1) * 1000)):
                    frames = sock.recv_multipart(copy=True)
                    self.last_request = time.monotonic()
                    sock.send_multipart(self.handle(frames))
                elif self.live and time.monotonic() - self.last_request > self.cfg.heartbeat_s:
                    self._end(f"heartbeat missed: no command for {self.cfg.heartbeat_s:.1f} s: robot stopped")
                    self.robot.safe_stop()
                    self.stats["heartbeat_stops"] += 1
        except KeyboardInterrupt:
            pass
        finally:
            self.robot.safe_stop()
            sock.close()
            ctx.term()

    def handle(self, frames: list[bytes]) -> list[bytes]:
        """The reply to one request (never raises: an error is the reply's ``error``)."""
        try:
            header, arrays = decode(frames)
            op = header.get("op")
            if op == "spec":
                return encode(self.spec())
            if op == "ping":
                return encode(self.ping())
            if op == "reset":
                return self.reset()
            if op == "step":
                return self.step(header, arrays)
            raise ProtocolError(f"unknown op {op!r}; expected spec, reset, step or ping")
        except Exception as err:  # the learner hears every failure; the server keeps serving
            return encode({"ok": False, "error": f"{type(err).__name__}: {err}"})

    # -- the requests --------------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        r = self.robot
        obs = {k: {"shape": list(s.shape), "dtype": s.dtype} for k, s in r.observation_spec.items()}
        return {
            "ok": True, "version": VERSION, "session": self.session, "env": r.env, "observation": obs,
            "action": {"low": list(r.action_spec.low), "high": list(r.action_spec.high)},
            "max_episode_steps": int(r.max_episode_steps), "heartbeat_s": self.cfg.heartbeat_s,
            "out_of_bounds": self.cfg.out_of_bounds, "human_reset": self.cfg.confirm_reset,
        }  # fmt: skip

    def ping(self) -> dict[str, Any]:
        if self.live and not self.held and time.monotonic() - self.last_step > self.cfg.heartbeat_s:
            self.robot.safe_stop()  # the learner is thinking: hold, keep the episode
            self.held = True
            self.stats["holds"] += 1
        return {"ok": True, "session": self.session, "episode": self.episode, "live": self.live}

    def reset(self) -> list[bytes]:
        if self.live:
            self._end("the robot was reset (by this or another client)")
        info: dict[str, Any] = {}
        if self.cfg.confirm_reset:
            self.prompt(f"[tmrl] episode {self.episode + 1}: put the scene back, then press Enter ")
            info["human_reset"] = True
        obs = self._checked(self.robot.reset())
        self.episode += 1
        self.live, self.steps, self.ended, self.held = True, 0, "", False
        self.last_obs, self.last_step = obs, time.monotonic()
        return encode({"ok": True, "session": self.session, "episode": self.episode, "info": info}, obs)

    def step(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> list[bytes]:
        mine = header.get("session") == self.session and header.get("episode") == self.episode
        if not (mine and self.live):
            why = self.ended if mine else "not this server's current episode (it restarted, or was reset)"
            return self._reply(self.last_obs, 0.0, False, True, False, {"ended": why or "no episode"})
        action = self._bounded(arrays.get("action"))
        if action is None:
            raise ValueError(
                f"action {arrays.get('action')} is outside the robot's box [{self.low}, {self.high}]: "
                "refused, the robot did not move"
            )
        clipped, action = action
        obs, reward, terminated, truncated, info = self.robot.step(action)
        obs = self._checked(obs)
        info = dict(info or {})
        self.steps += 1
        self.stats["steps"] += 1
        self.last_obs, self.last_step, self.held = obs, time.monotonic(), False
        truncated = bool(truncated) or (self.steps >= self.robot.max_episode_steps and not terminated)
        success = info.get("success")
        success = self.robot.success(obs, info) if success is None else success
        if (terminated or truncated) and success is None and self.cfg.label_success:
            answer = self.prompt(
                f"[tmrl] episode {self.episode} ended after {self.steps} steps: success? [y/n] "
            )
            success = answer.strip().lower().startswith("y")
            info["human_success"] = bool(success)
        if clipped:
            info["clipped"] = True
            self.stats["clipped"] += 1
        if terminated or truncated:
            self._end(f"episode {self.episode} ended after {self.steps} steps")
        return self._reply(obs, float(reward), bool(terminated), truncated, bool(success), info)

    # -- helpers -------------------------------------------------------------------------------------
    def _bounded(self, action) -> tuple[bool, np.ndarray] | None:
        """(clipped?, the action to apply), None when it is refused for its bounds; ValueError when it is
        not an action at all."""
        if action is None:
            raise ValueError("a step without an `action` array")
        a = np.asarray(action, np.float64)
        if a.shape != self.low.shape or not np.all(np.isfinite(a)):
            raise ValueError(
                f"action {a.tolist()} (shape {a.shape}): expected {self.low.shape[0]} finite values"
            )
        outside = bool(np.any((a < self.low) | (a > self.high)))
        if outside and self.cfg.out_of_bounds == "refuse":
            self.stats["refused"] += 1
            return None
        return outside, np.clip(a, self.low, self.high)

    def _checked(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.robot.observation_spec
        if set(obs) != set(spec):
            raise ValueError(
                f"the robot returned observation keys {sorted(obs)}; its spec has {sorted(spec)}"
            )
        return {k: spec[k].check(k, v) for k, v in obs.items()}

    def _end(self, why: str) -> None:
        self.live, self.ended = False, why

    def _reply(self, obs, reward, terminated, truncated, success, info) -> list[bytes]:
        header = {
            "ok": True, "session": self.session, "episode": self.episode, "reward": reward,
            "terminated": terminated, "truncated": truncated, "success": success, "info": info,
        }  # fmt: skip
        return encode(header, obs)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The server's flags (``tmrl robot-server`` and ``python -m app.robot.server``)."""
    d = ServerConfig()
    p.add_argument(
        "--address", default=d.address, help="HOST:PORT to listen on (0.0.0.0:PORT: every interface)"
    )
    p.add_argument(
        "--heartbeat", type=float, default=d.heartbeat_s, help="seconds of silence before a safe stop"
    )
    p.add_argument("--out-of-bounds", choices=["clip", "refuse"], default=d.out_of_bounds)
    p.add_argument("--confirm-reset", action="store_true", help="wait for Enter before each episode")
    p.add_argument("--label-success", action="store_true", help="ask for success when the robot cannot tell")


def config_of(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        args.address, args.heartbeat, args.out_of_bounds, args.confirm_reset, args.label_success
    )


def load_robot(spec: str) -> Robot:
    """``module:Class`` (or ``module:factory``) called with no arguments: a lab's own robot."""
    import importlib

    module, sep, name = spec.partition(":")
    if not sep:
        raise ValueError(f"--robot {spec!r}: expected module:Class, e.g. my_lab.arm:Arm")
    robot = getattr(importlib.import_module(module), name)()
    if not isinstance(robot, Robot):
        raise ValueError(f"--robot {spec!r} made a {type(robot).__name__}, not an app.robot.interface.Robot")
    return robot


def main(argv: list[str] | None = None) -> int:
    """The robot side without the learner's stack: ``python -m app.robot.server --robot module:Class``."""
    p = argparse.ArgumentParser(prog="python -m app.robot.server", description=__doc__.split("\n")[0])
    p.add_argument("--robot", required=True, help="module:Class of your Robot implementation")
    add_arguments(p)
    args = p.parse_args(argv)
    RobotServer(load_robot(args.robot), config_of(args)).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
