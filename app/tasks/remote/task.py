"""The remote robot task: fine-tune on a robot whose controller runs `tmrl robot-server` elsewhere.

``task.env=remote task.address=HOST:PORT``: the observation and action sizes, the time limit and the sensor
keys come from the server's spec (asked once per address); the policy is pre-trained on a simulated task
(or on the robot's own demonstrations written as an episode store) and checked against that spec. One
robot is one sub-env: ``collect.num_envs`` and ``eval.episodes`` must be 1 (every env of the run, training,
evaluation and the base policy's, talks to the same robot in turn; a reset by one ends another's episode,
which the server reports and the collector then resets).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.tasks.base import Backend, Task, ZeroShot
from modules.nets.keys import GOAL, OBS

if TYPE_CHECKING:
    from app.schema import DemoConfig, FitConfig
    from app.tasks.registry import TaskConfig
    from datamodules.episodes import EpisodeStore
    from datamodules.state import WindowDataModule
    from modules.nets.policy import CSPPolicy

PRETRAIN_ELSEWHERE = (
    "the remote robot fine-tunes only: pre-train on a simulated task (or on demonstrations recorded on the "
    "robot, as an episode store) and pass that run to `tmrl finetune --from-run`"
)
MODES = {"goal": (), "pointcloud": ("pointcloud",), "image": ("image",)}  # the sensor key each mode reads


class RemoteTask(Task):
    name = "remote"
    env_names = ("remote",)
    context_modes = tuple(MODES)
    demo_length = 300
    offline_demos = False

    def __init__(self) -> None:
        self._specs: dict[str, dict[str, Any]] = {}

    def canonical(self, env: str) -> str | None:
        return "remote" if env == "remote" else None

    def check_target(self, target: TaskConfig) -> None:
        from app.robot.protocol import parse_address

        if not target.address:
            raise ValueError("task.env=remote needs task.address=HOST:PORT of the `tmrl robot-server`")
        parse_address(target.address)
        if target.init_ij is not None or target.goal_ij is not None:
            raise ValueError("task.init_ij/goal_ij are maze cells; the remote robot's starts are its own")

    def spec(self, address: str) -> dict[str, Any]:
        """The server's spec (cached): asking it is one short connection."""
        if address not in self._specs:
            from app.robot.client import RobotClient

            client = RobotClient(address, keepalive=False, reconnect_s=30.0)
            self._specs[address] = client.spec
            client.close()
        return self._specs[address]

    def dims(self, env: str) -> tuple[int, int, int]:
        raise ValueError("the remote robot's sizes come from its server: target_dims(task) asks it")

    def target_dims(self, target: TaskConfig) -> tuple[int, int, int]:
        import math

        obs = self.spec(str(target.address))["observation"]
        size = {k: math.prod(v["shape"]) for k, v in obs.items()}
        return size[OBS], len(self.spec(str(target.address))["action"]["low"]), size.get(GOAL, 0)

    def check_policy(self, policy: CSPPolicy, target: TaskConfig, who: str) -> None:
        have = set(self.spec(str(target.address))["observation"])
        missing = [k for k in MODES.get(policy.cfg.context_mode, ()) if k not in have]
        if missing:
            raise ValueError(
                f"{who} reads {missing} (context_mode={policy.cfg.context_mode!r}) but the robot at "
                f"{target.address} sends only {sorted(have)}"
            )
        super().check_policy(policy, target, who)

    def make_backend(
        self, target: TaskConfig, num_envs: int, seed: int, sensor: Mapping[str, Any]
    ) -> Backend:
        from app.tasks.remote.backend import RemoteBackend

        if num_envs != 1:
            raise ValueError(
                f"task.env=remote drives one robot: {num_envs} sub-envs asked; set collect.num_envs=1 and "
                "eval.episodes=1"
            )
        backend = RemoteBackend(str(target.address))
        if backend.max_episode_steps != target.max_episode_steps:
            backend.close()
            raise ValueError(
                f"task.max_episode_steps={target.max_episode_steps} but the robot at {target.address} ends "
                f"episodes after {backend.max_episode_steps} steps: set task.max_episode_steps="
                f"{backend.max_episode_steps}"
            )
        return backend

    # -- pre-training and demonstrations happen elsewhere ----------------------------------------------
    def fit_schema(self) -> type[FitConfig]:
        raise ValueError(PRETRAIN_ELSEWHERE)

    def datamodule(self, cfg: FitConfig) -> WindowDataModule:
        raise ValueError(PRETRAIN_ELSEWHERE)

    def demo_config(
        self, env: str, episodes: int, length: int | None, seed: int, noise_std: float | None,
        options: Mapping[str, Any],
    ) -> DemoConfig:  # fmt: skip
        raise ValueError(PRETRAIN_ELSEWHERE)

    def generate_demos(
        self, demos: DemoConfig, out: str | Path, progress: bool = True, overwrite: bool = False
    ) -> EpisodeStore:
        raise ValueError(PRETRAIN_ELSEWHERE)

    def zero_shot(
        self, policy: CSPPolicy, cfg: FitConfig, env: str | None, out: Path, progress: bool = True
    ) -> ZeroShot:
        raise ValueError(PRETRAIN_ELSEWHERE)
