"""The maze task: OGBench pointmaze with low-dimensional state, its scripted expert and its five fixed
evaluation tasks. Heavy imports (OGBench, the evaluation) happen inside the methods that need them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.tasks.base import Backend, Replay, Task, ZeroShot
from app.tasks.maze.config import ExpertConfig
from app.tasks.maze.env import MAZES, resolve_maze

if TYPE_CHECKING:
    import numpy as np

    from app.schema import DemoConfig, FitConfig
    from app.tasks.maze.camera import MazeCameraConfig
    from app.tasks.registry import TaskConfig
    from datamodules.episodes import EpisodeStore
    from datamodules.state import WindowDataModule
    from modules.nets.policy import CSPPolicy


class MazeTask(Task):
    name = "maze"
    env_names = tuple(MAZES)
    context_modes = ("goal", "observation")
    demo_length = 1000
    offline_demos = True

    def canonical(self, env: str) -> str | None:
        try:
            return resolve_maze(env)[0]
        except ValueError:
            return None

    def fit_schema(self) -> type[FitConfig]:
        from app.schema import FitConfig

        return FitConfig

    def datamodule(self, cfg: FitConfig) -> WindowDataModule:
        from datamodules.state import StateDataModule

        return StateDataModule(cfg.data, chunk_len=cfg.policy.chunk_len, seed=cfg.seed)

    def check_target(self, target: TaskConfig) -> None:
        from app.tasks.maze.backend import check_maze_target

        check_maze_target(target)

    def dims(self, env: str) -> tuple[int, int, int]:
        from app.tasks.maze.backend import maze_dims

        return (*maze_dims(env), 2)

    # ---- what the visual maze (app/tasks/maze/visual.py) changes: the env names and the cameras
    def state_env(self, env: str) -> str:
        """The (state) pointmaze behind ``env``, a short name."""
        return resolve_maze(env)[0]

    def camera(self, sensor: Mapping[str, Any], who: str) -> MazeCameraConfig | None:
        """The cameras a policy's ``sensor`` describes; the state maze has none."""
        return None

    def make_backend(
        self, target: TaskConfig, num_envs: int, seed: int, sensor: Mapping[str, Any]
    ) -> Backend:
        import dataclasses

        from app.tasks.maze.backend import BatchedMaze

        camera = self.camera(sensor, f"the policy fine-tuned on task.env={target.env!r}")
        state_target = dataclasses.replace(target, env=self.state_env(target.env))
        return BatchedMaze(state_target, num_envs, seed, camera=camera)

    def demo_config(
        self, env: str, episodes: int, length: int | None, seed: int, noise_std: float | None,
        options: Mapping[str, Any],
    ) -> DemoConfig:  # fmt: skip
        from app.schema import DemoConfig

        resolve_maze(env)
        expert = ExpertConfig() if noise_std is None else ExpertConfig(noise_std=noise_std)
        return DemoConfig(
            env=env, episodes=episodes, episode_length=length or self.demo_length, seed=seed, expert=expert
        )

    def generate_demos(
        self, demos: DemoConfig, out: str | Path, progress: bool = True, overwrite: bool = False
    ) -> EpisodeStore:
        from app.tasks.maze.demos import generate_maze_demos

        return generate_maze_demos(
            env=self.state_env(demos.env),
            episodes=demos.episodes,
            out=out,
            episode_length=demos.episode_length,
            seed=demos.seed,
            expert=demos.expert,
            progress=progress,
            overwrite=overwrite,
            camera=getattr(demos, "camera", None),
        )

    def zero_shot(
        self, policy: CSPPolicy, cfg: FitConfig, env: str | None, out: Path, progress: bool = True
    ) -> ZeroShot:
        from app.evaluation import policy_table
        from app.tasks.maze import evaluate

        env_name = cfg.eval.env or env or cfg.demos.env
        camera = self.camera(policy.sensor, "the evaluated policy")
        state_env = self.state_env(env_name)
        results = evaluate.evaluate_zero_shot(policy, state_env, cfg.eval, progress=progress, camera=camera)
        table = policy_table({("", s): r.states() for s, r in results.items()})  # one set of states
        out.mkdir(parents=True, exist_ok=True)
        plots = [
            evaluate.plot_success(results, env_name, out / "zero_shot_success.png"),
            evaluate.plot_paths(results, state_env, out / "zero_shot_paths.png"),
        ]
        replays = evaluate.replays(results)
        return ZeroShot(table.metrics(), evaluate.summary(results, env_name), table, plots, replays)

    def render_replay(self, env: str, replay: Replay, size: int = 128, every: int = 1) -> np.ndarray:
        from app.tasks.maze.video import render_path

        return render_path(env, replay.path, replay.goal, size=size, every=every)
