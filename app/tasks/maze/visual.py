"""The visual maze task: OGBench pointmaze seen through cameras (``visual-pointmaze-medium``, ...).

The policy reads the point's xy position (clean proprioception) and camera frames that show the goal
marker; the goal is given in no other way, so CSP's noised context (the normalized image embedding,
context_mode ``image_embedding``) carries the goal as the goal context does in the state task, and at
sigma = 1 the policy covers p(a | position). Demonstrations, evaluation tasks and fine-tuning targets are
the state maze's (same expert, same episodes, same five OGBench tasks); only the sensor differs: the
cameras (``MazeCameraConfig``), saved in the policy checkpoint as its ``sensor``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from app.tasks.maze.camera import MazeCameraConfig
from app.tasks.maze.env import MAZES, resolve_maze
from app.tasks.maze.task import MazeTask
from app.tasks.maze.visual_config import VisualMazeDemoConfig, VisualMazeFitConfig

if TYPE_CHECKING:
    from app.tasks.registry import TaskConfig
    from datamodules.image import ImageDataModule

VISUAL_PREFIX = "visual-"


def base_maze(env: str) -> str:
    """The state maze behind visual env ``env``: "visual-pointmaze-medium" -> "pointmaze-medium"."""
    if not env.startswith(VISUAL_PREFIX):
        raise ValueError(f"{env!r} is not a visual maze; expected one of {list(VisualMazeTask.env_names)}")
    return resolve_maze(env[len(VISUAL_PREFIX) :])[0]


def camera_config(sensor: Mapping[str, Any], who: str) -> MazeCameraConfig:
    """The cameras a policy's ``sensor`` dict describes; a clear error when it has none or unknown keys."""
    if not sensor:
        raise ValueError(
            f"{who} carries no camera settings; a visual maze policy needs its fit's demos.camera"
        )
    known = {f.name for f in dataclasses.fields(MazeCameraConfig)}
    if unknown := sorted(set(sensor) - known):
        raise ValueError(f"{who}: unknown camera settings {unknown}; expected keys of {sorted(known)}")
    return MazeCameraConfig(**sensor)


class VisualMazeTask(MazeTask):
    """The maze task through cameras: its env names are ``visual-<maze>``, its backend renders frames."""

    name = "visual-maze"
    env_names = tuple(VISUAL_PREFIX + short for short in MAZES)
    context_modes = ("image_embedding",)
    offline_demos = False  # RLPD's demo chunks carry no frames

    def canonical(self, env: str) -> str | None:
        try:
            return VISUAL_PREFIX + base_maze(env)
        except ValueError:
            return None

    def state_env(self, env: str) -> str:
        return base_maze(env)

    def camera(self, sensor: Mapping[str, Any], who: str) -> MazeCameraConfig:
        return camera_config(sensor, who)

    def fit_schema(self) -> type[VisualMazeFitConfig]:
        return VisualMazeFitConfig

    def datamodule(self, cfg: VisualMazeFitConfig) -> ImageDataModule:
        from datamodules.image import ImageDataModule

        return ImageDataModule(cfg.data, chunk_len=cfg.policy.chunk_len, seed=cfg.seed)

    def check_target(self, target: TaskConfig) -> None:
        dataclasses.replace(target, env=base_maze(target.env))  # checked by the state maze: cells, task id

    def dims(self, env: str) -> tuple[int, int, int]:
        obs_dim, action_dim, _ = super().dims(base_maze(env))
        return obs_dim, action_dim, 0  # the goal is seen in the frames only

    def sensor(self, cfg: VisualMazeFitConfig) -> dict[str, Any]:
        return dataclasses.asdict(cfg.demos.camera)

    def demo_config(
        self, env: str, episodes: int, length: int | None, seed: int, noise_std: float | None,
        options: Mapping[str, Any],
    ) -> VisualMazeDemoConfig:  # fmt: skip
        known = {f.name for f in dataclasses.fields(MazeCameraConfig)}
        if unknown := sorted(set(options) - known):
            flags = ", ".join("--" + name.replace("_", "-") for name in unknown)
            raise ValueError(
                f"{flags} do(es) not apply to {env!r}; its camera takes --cameras and --image-size"
            )
        state = super().demo_config(base_maze(env), episodes, length, seed, noise_std, {})
        fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
        fields["env"] = VISUAL_PREFIX + state.env
        return VisualMazeDemoConfig(**fields, camera=MazeCameraConfig(**options))
