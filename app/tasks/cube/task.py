"""The cube task: OGBench cube-single seen through depth cameras as a point cloud, its noisy scripted oracle
and its Success@K evaluation. MuJoCo is imported only by the methods that build environments.

The visual cube task (app/tasks/cube/visual.py) is this one with RGB frames in place of the cloud: other
names, context mode, demonstration and fit schemas, and data module; the same scenes, oracle, backend and
evaluation."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from app.tasks.base import Backend, Replay, Task, ZeroShot
from app.tasks.cube.config import (
    ACTION_DIM,
    CUBE_ENVS,
    GOAL_DIM,
    PROPRIO_DIM,
    VARIATIONS,
    CubeConfig,
    CubeEvalConfig,
    OracleConfig,
    PointCloudDemoConfig,
    PointCloudFitConfig,
    resolve_cube,
)

if TYPE_CHECKING:
    import numpy as np

    from app.schema import FitConfig
    from app.tasks.registry import TaskConfig
    from datamodules.episodes import EpisodeStore
    from datamodules.state import WindowDataModule
    from modules.nets.policy import CSPPolicy


def sensor_config(sensor: Mapping[str, Any], who: str) -> CubeConfig:
    """The ``CubeConfig`` a policy's ``sensor`` dict describes (cameras, cloud, crop, scene settings)."""
    if not sensor:
        raise ValueError(
            f"{who} carries no sensor settings (cameras, point cloud); a cube policy needs the "
            "pre-training run's demos.cube"
        )
    known = {f.name for f in dataclasses.fields(CubeConfig)}
    if unknown := sorted(set(sensor) - known):
        raise ValueError(f"{who}: unknown cube sensor settings {unknown}; expected keys of {sorted(known)}")
    return CubeConfig(**sensor)


def _plain(cube: CubeConfig) -> dict[str, Any]:
    """``cube`` as the plain dict a policy checkpoint carries (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cube)))


class CubeTask(Task):
    name = "cube"
    env_names = CUBE_ENVS
    context_modes = ("pointcloud",)
    demo_length = 200
    offline_demos = False  # RLPD mixes the maze demonstrations' goal-relabelled chunks only
    demo_schema: ClassVar[type[PointCloudDemoConfig]] = PointCloudDemoConfig  # its default sensor too

    def canonical(self, env: str) -> str | None:
        try:
            return resolve_cube(env, self.env_names)[0]
        except ValueError:
            return None

    def fit_schema(self) -> type[FitConfig]:
        return PointCloudFitConfig

    def datamodule(self, cfg: FitConfig) -> WindowDataModule:
        from datamodules.pointcloud import PointCloudDataModule

        return PointCloudDataModule(cfg.data, chunk_len=cfg.policy.chunk_len, seed=cfg.seed)

    def check_target(self, target: TaskConfig) -> None:
        if target.variation not in VARIATIONS:
            raise ValueError(f"TaskConfig.variation={target.variation!r}; expected one of {list(VARIATIONS)}")
        if target.init_ij is not None or target.goal_ij is not None:
            raise ValueError(
                f"TaskConfig.init_ij/goal_ij are maze cells; task.env={target.env!r} takes task.variation"
            )

    def dims(self, env: str) -> tuple[int, int, int]:
        return PROPRIO_DIM, ACTION_DIM, GOAL_DIM

    def make_backend(
        self, target: TaskConfig, num_envs: int, seed: int, sensor: Mapping[str, Any]
    ) -> Backend:
        from app.tasks.cube.backend import BatchedCube

        cube = sensor_config(sensor, f"the policy fine-tuned on task.env={target.env!r}")
        cube = dataclasses.replace(
            cube, variation=target.variation, max_episode_steps=target.max_episode_steps
        )
        return BatchedCube(cube, num_envs, seed)

    def sensor(self, cfg: FitConfig) -> dict[str, Any]:
        return _plain(cfg.demos.cube)

    def legacy_sensor(self, run_config: Mapping[str, Any], policy: CSPPolicy, who: str) -> dict[str, Any]:
        cube = CubeConfig(**((run_config.get("demos") or {}).get("cube") or {}))
        if cube.num_points != policy.cfg.num_points:
            raise ValueError(
                f"{who}: demos.cube.num_points={cube.num_points} but its policy takes "
                f"{policy.cfg.num_points} points"
            )
        return _plain(cube)

    def upgrade_run_config(self, data: dict[str, Any]) -> dict[str, Any]:
        # runs fitted before the cube evaluation existed stored the maze's eval section (env,
        # episodes_per_task), and before the rename eval.max_steps: keep what CubeEvalConfig knows
        section = data.get("eval")
        if isinstance(section, dict):
            if "max_steps" in section:
                section["max_episode_steps"] = section.pop("max_steps")
            known = {f.name for f in dataclasses.fields(CubeEvalConfig)}
            data["eval"] = {key: value for key, value in section.items() if key in known}
        return data

    def demo_config(
        self, env: str, episodes: int, length: int | None, seed: int, noise_std: float | None,
        options: Mapping[str, Any],
    ) -> PointCloudDemoConfig:  # fmt: skip
        short, _ = resolve_cube(env, self.env_names)
        cube = dataclasses.replace(self.demo_schema().cube, **options)  # the CLI's flags on the default
        oracle = OracleConfig() if noise_std is None else OracleConfig(noise=noise_std)
        length = length or self.demo_length
        return self.demo_schema(
            env=short, episodes=episodes, episode_length=length, seed=seed, cube=cube, oracle=oracle
        )

    def generate_demos(
        self, demos: PointCloudDemoConfig, out: str | Path, progress: bool = True, overwrite: bool = False
    ) -> EpisodeStore:
        from app.tasks.cube.demos import generate_cube_demos

        return generate_cube_demos(
            env=demos.env,
            episodes=demos.episodes,
            out=out,
            episode_length=demos.episode_length,
            seed=demos.seed,
            cube=demos.cube,
            oracle=demos.oracle,
            progress=progress,
            overwrite=overwrite,
        )

    def zero_shot(
        self, policy: CSPPolicy, cfg: FitConfig, env: str | None, out: Path, progress: bool = True
    ) -> ZeroShot:
        from app.evaluation import policy_table
        from app.tasks.cube import evaluate

        replays: list[Replay] = []  # per (variation, sigma), a few successes and failures to film
        results = evaluate.evaluate_cube(policy, cfg.demos.cube, cfg.eval, progress=progress, replays=replays)
        out.mkdir(parents=True, exist_ok=True)
        plot = evaluate.plot_success_at_k(results, out / "zero_shot_success_at_k.png", cfg.demos.env)
        table = policy_table(results)  # the variations are the splits
        return ZeroShot(table.metrics(), evaluate.summary(results), table, [plot], replays)

    def render_replay(self, env: str, replay: Replay, size: int = 128, every: int = 1) -> np.ndarray:
        from app.tasks.cube.video import render_qpos

        return render_qpos(replay.path, replay.goal, size=size, every=every)
