"""What the robot link costs: env steps/s of the stand-in robot in process against the same robot behind
`tmrl robot-server` on this machine (loopback), with the round-trip time per step and per action chunk.

    python -m app.robot.latency --steps 2000 --exec-horizon 5
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np

from app.robot.client import RobotClient
from app.robot.sim import SimRobot
from app.tasks.registry import TaskConfig


def _steps_per_s(step, reset, action_dim: int, steps: int, max_episode_steps: int) -> tuple[float, list]:
    rng = np.random.default_rng(0)
    reset()
    times, t0 = [], time.perf_counter()
    for i in range(steps):
        if i and i % max_episode_steps == 0:
            reset()
        t = time.perf_counter()
        step(rng.uniform(-1, 1, action_dim).astype(np.float32))
        times.append(time.perf_counter() - t)
    return steps / (time.perf_counter() - t0), times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.robot.latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--exec-horizon", type=int, default=5, help="env steps per action chunk")
    p.add_argument("--port", type=int, default=5591)
    args = p.parse_args(argv)
    target = TaskConfig("pointmaze-large", None, max_episode_steps=300, init_ij=[1, 4], goal_ij=[7, 6])
    robot = SimRobot(target)
    dim = len(robot.action_spec.low)
    local, _ = _steps_per_s(robot.step, robot.reset, dim, args.steps, 300)
    robot.close()
    cmd = [sys.executable, "-m", "app.cli", "robot-server", "--env", "pointmaze-large", "--init", "1,4"]
    cmd += ["--goal", "7,6", "--max-episode-steps", "300", "--address", f"127.0.0.1:{args.port}"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        client = RobotClient(f"127.0.0.1:{args.port}", timeout_s=30.0, log=lambda line: None)
        remote, times = _steps_per_s(client.step, client.reset, dim, args.steps, 300)
        client.close()
    finally:
        server.terminate()
        server.wait(10)
    ms = 1000 * np.asarray(times)
    print(f"in process: {local:.0f} env steps/s; through tmrl robot-server (loopback): {remote:.0f}/s")
    print(
        f"round trip per step: median {np.median(ms):.2f} ms, p90 {np.percentile(ms, 90):.2f} ms, "
        f"p99 {np.percentile(ms, 99):.2f} ms; per chunk of {args.exec_horizon} steps: "
        f"{args.exec_horizon * np.median(ms):.1f} ms (median)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
