"""The registry of tasks: the one place that knows which tasks exist. Adding a task is its folder under
``app/tasks/`` plus ONE line in ``TASKS``.

Also the fine-tuning target (:class:`TaskConfig`), validated by the task that owns its ``env``, and the
choice of a ``tmrl fit`` schema from a config's ``policy.context_mode``.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from app.config import ConfigError, find_config_file
from app.tasks.base import Task
from app.tasks.cube.task import CubeTask
from app.tasks.cube.visual import VisualCubeTask
from app.tasks.maze.task import MazeTask
from app.tasks.maze.visual import VisualMazeTask
from app.tasks.remote.task import RemoteTask

TASKS: dict[str, Task] = {
    "maze": MazeTask(),
    "cube": CubeTask(),
    "visual-maze": VisualMazeTask(),
    "visual-cube": VisualCubeTask(),
    "remote": RemoteTask(),
}


def env_names() -> list[str]:
    """Every short env name some task owns, in registry order."""
    return [name for task in TASKS.values() for name in task.env_names]


def task_of_env(env: str) -> Task:
    """The task that owns environment ``env`` (a short name or an OGBench id)."""
    for task in TASKS.values():
        if task.canonical(env) is not None:
            return task
    close = difflib.get_close_matches(env, env_names(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown environment {env!r}; expected one of {env_names()}{hint}")


def task_of_context(mode: str) -> Task:
    """The task whose observations feed the policy context ``mode``."""
    for task in TASKS.values():
        if mode in task.context_modes:
            return task
    known = [m for task in TASKS.values() for m in task.context_modes]
    raise ValueError(f"no task feeds policy.context_mode={mode!r}; known modes: {known}")


def task_of_fit(mode: str, env: str | None = None) -> Task:
    """The task a fit pre-trains on: the one owning ``env`` (its ``demos.env``) if it feeds context ``mode``,
    else the first task that feeds ``mode`` (which then refuses a ``demos.env`` it does not own)."""
    if env:
        try:
            task = task_of_env(env)
        except ValueError:
            task = None
        if task is not None and mode in task.context_modes:
            return task
    return task_of_context(mode)


def fit_schema(path: str | Path | None, overrides: Sequence[str] = ()) -> type:
    """The schema a fit config is read with: that of ``task_of_fit`` for its ``policy.context_mode`` and
    ``demos.env`` (the file's, or ``policy.context_mode=`` / ``demos.env=`` overrides); the maze's when the
    mode is unset or unknown (the loader then names the bad value)."""
    mode = env = None
    try:
        found = find_config_file(path) if path is not None else None
    except ConfigError:  # a missing file: the loader reports it
        found = None
    if found is not None:
        data = yaml.safe_load(Path(found).read_text()) or {}
        policy = data.get("policy") if isinstance(data, dict) else None
        mode = policy.get("context_mode") if isinstance(policy, dict) else None
        demos = data.get("demos") if isinstance(data, dict) else None
        env = demos.get("env") if isinstance(demos, dict) else None
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "policy.context_mode":
            mode = value.strip()
        elif key.strip() == "demos.env":
            env = value.strip()
    try:
        return task_of_fit(str(mode), str(env) if env else None).fit_schema()
    except ValueError:
        return TASKS["maze"].fit_schema()


@dataclass
class TaskConfig:
    """The fine-tuning target task: a maze start/goal, or a variation of the point-cloud cube task.

    Attributes:
        env: an environment some task owns: a maze (short name, e.g. "pointmaze-large", or the full
            OGBench id), or "cube-single".
        task_id: OGBench evaluation task 1..5 (its start and goal cells), or None to give both cells.
            Mazes only, as are init_ij and goal_ij.
        init_ij: start cell [i, j] (row, column of ``maze_map``), overriding the task's; must be free.
        goal_ij: goal cell [i, j], overriding the task's; must be free.
        max_episode_steps: low-level time limit: an episode is truncated after this many environment steps.
        variation: cube only: "heldout" (targets in the goal region the demonstrations never used) or
            "train". The cameras and the cloud are the pre-trained policy's (its ``sensor``).
        address: env "remote" only: HOST:PORT of the `tmrl robot-server` driving the robot.
    """

    env: str = "pointmaze-large"
    task_id: int | None = 1
    init_ij: list[int] | None = None
    goal_ij: list[int] | None = None
    max_episode_steps: int = 1000
    variation: str = "heldout"
    address: str | None = None

    @property
    def task(self) -> Task:
        """The task that owns ``env``."""
        return task_of_env(self.env)

    def __post_init__(self) -> None:
        steps = self.max_episode_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"TaskConfig.max_episode_steps={steps!r}; expected an integer >= 1")
        self.task.check_target(self)
