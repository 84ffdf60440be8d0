"""The contracts every task implements: a numpy-level ``Backend`` of N sub-envs, and the ``Task`` that owns
its config types, its backend, its demonstration generator and its zero-shot evaluation.

A task lives in its own folder (``app/tasks/<name>/``) and is made known by ONE line in
``app/tasks/registry.py``; nothing outside the folder branches on which task it is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

if TYPE_CHECKING:  # type names only: importing a task's contract builds no environment
    from app.evaluation import EvalTable
    from app.schema import DemoConfig, FitConfig
    from app.tasks.registry import TaskConfig
    from datamodules.episodes import EpisodeStore
    from datamodules.state import WindowDataModule
    from modules.nets.policy import CSPPolicy


class Backend(Protocol):
    """N sub-envs stepped together at the numpy level (no torch), rows selected by (N,) bool masks.

    Per-row state arrays hold each sub-env's latest values; rows a mask leaves out keep theirs. Rewards are
    1.0 on success, else 0.0; ``terminated`` = success; ``truncated`` = the time limit reached without it.
    """

    num_envs: int
    obs_dim: int
    goal_dim: int
    action_dim: int
    observation: np.ndarray  # (N, d_o) float32
    goal: np.ndarray  # (N, d_g) float32
    reward: np.ndarray  # (N,) float32
    terminated: np.ndarray  # (N,) bool
    truncated: np.ndarray  # (N,) bool
    success: np.ndarray  # (N,) bool
    step_count: np.ndarray  # (N,) int64

    def reset(self, mask: np.ndarray | None = None, seeds: Sequence[int] | None = None) -> None:
        """Reset the rows of ``mask`` (all if None); ``seeds``, one per reset row, fix their episodes."""

    def step(self, actions: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """Step the rows of ``mask`` with ``actions`` (N, d_a); copies of reward, terminated, truncated,
        success."""

    def observe(self, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """What a policy reads, every row: OBS, GOAL and any sensor key (rendered for ``rows`` if needed)."""

    def seed(self, seed: int | None) -> None: ...

    def close(self) -> None: ...


@dataclass
class Replay:
    """One recorded evaluation episode, as the task's renderer replays it into a video
    (:meth:`Task.render_replay`).

    ``path`` is what the task records per step: (T, 2) xy positions on the maze, (T, nq) simulator ``qpos`` on
    the cube; ``goal`` where the goal marker goes ((2,) xy, (3,) cube centre). ``sigma`` (T,): the context
    noise level of each step's action when a fine-tuned agent chose it (drawn under the frames), else None.
    """

    label: str  # file stem and caption, e.g. "sigma_0.5_state_3_rollout_0_success"
    success: bool
    path: np.ndarray
    goal: np.ndarray
    sigma: np.ndarray | None = None
    group: str = ""  # what it is one of, e.g. "sigma_0.5" or "deterministic": videos are chosen per group
    title: str = ""  # the caption (about 20 characters fit a frame), e.g. "sigma 0.5 s3 r0 ok"; "": the label


def pick_replays(replays: Sequence[Replay], per_outcome: int) -> list[Replay]:
    """The first ``per_outcome`` successes and failures of each group, in the order given."""
    kept, seen = [], {}
    for r in replays:
        key = (r.group, r.success)
        if seen.get(key, 0) < per_outcome:
            seen[key] = seen.get(key, 0) + 1
            kept.append(r)
    return kept


@dataclass
class ZeroShot:
    """A zero-shot evaluation's outcome: MLflow metrics, printable lines, the plots written, the table
    of estimates (success rate and Success@k with their intervals) the metrics come from, and episodes
    a video can be made of (a few successes and failures per sigma where the task records them)."""

    metrics: dict[str, float]
    lines: list[str]
    table: EvalTable
    plots: list[Path] = field(default_factory=list)
    replays: list[Replay] = field(default_factory=list)


class Task(ABC):
    """One kind of environment: what pre-training, fine-tuning and the CLI need to know about it."""

    name: ClassVar[str]  # the registry key
    env_names: ClassVar[tuple[str, ...]]  # short names ``--env`` / ``demos.env`` / ``task.env`` take
    context_modes: ClassVar[tuple[str, ...]]  # the policy contexts its observations feed
    demo_length: ClassVar[int]  # default steps per demonstration episode
    offline_demos: ClassVar[bool]  # its demonstrations can be mixed into replay (method=rlpd)

    @abstractmethod
    def canonical(self, env: str) -> str | None:
        """The short name of ``env`` (a short name or an OGBench id) if this task owns it, else None."""

    @abstractmethod
    def fit_schema(self) -> type[FitConfig]:
        """The ``tmrl fit`` config class of runs on this task."""

    @abstractmethod
    def datamodule(self, cfg: FitConfig) -> WindowDataModule:
        """The Lightning DataModule that serves ``cfg.data``'s demonstrations as training windows."""

    @abstractmethod
    def check_target(self, target: TaskConfig) -> None:
        """Refuse (ValueError naming the key) fine-tuning target settings this task cannot honour."""

    @abstractmethod
    def dims(self, env: str) -> tuple[int, int, int]:
        """(obs_dim, action_dim, goal_dim) of ``env``."""

    @abstractmethod
    def make_backend(
        self, target: TaskConfig, num_envs: int, seed: int, sensor: Mapping[str, Any]
    ) -> Backend:
        """The batched backend of fine-tuning target ``target``; ``sensor``: ``policy.sensor``."""

    def sensor(self, cfg: FitConfig) -> dict[str, Any]:
        """What a fit run's policy must carry of its sensor (cameras, cloud size, ...); none by default."""
        return {}

    def legacy_sensor(self, run_config: Mapping[str, Any], policy: CSPPolicy, who: str) -> dict[str, Any]:
        """The sensor of a policy saved before policies carried one, from its fit run's config.yaml."""
        return {}

    def upgrade_run_config(self, data: dict[str, Any]) -> dict[str, Any]:
        """A fit run's stored config, with keys older versions wrote and this one refuses dropped."""
        return data

    @abstractmethod
    def demo_config(
        self, env: str, episodes: int, length: int | None, seed: int, noise_std: float | None,
        options: Mapping[str, Any],
    ) -> DemoConfig:  # fmt: skip
        """The demonstrations ``tmrl demos`` asks for (``options``: the task's own CLI flags)."""

    @abstractmethod
    def generate_demos(
        self, demos: DemoConfig, out: str | Path, progress: bool = True, overwrite: bool = False
    ) -> EpisodeStore:
        """Roll out the scripted expert as ``demos`` says and write the episode store at ``out``."""

    @abstractmethod
    def zero_shot(
        self, policy: CSPPolicy, cfg: FitConfig, env: str | None, out: Path, progress: bool = True
    ) -> ZeroShot:
        """Evaluate ``policy`` zero-shot as ``cfg.eval`` says (``env``: the demonstrations' env, if known),
        writing its plots under ``out``."""

    def render_replay(self, env: str, replay: Replay, size: int = 128, every: int = 1) -> np.ndarray:
        """(T', size, size, 3) uint8 frames of ``replay`` (steps ``::every``) in ``env``; a task without a
        renderer raises NotImplementedError (``tmrl eval`` then writes no videos and says so)."""
        raise NotImplementedError(f"the {self.name} task has no replay renderer")

    def target_dims(self, target: TaskConfig) -> tuple[int, int, int]:
        """(obs_dim, action_dim, goal_dim) of fine-tuning target ``target``: its env's (``dims``) unless the
        task learns them otherwise (a remote robot: from its server)."""
        return self.dims(target.env)

    def check_policy(self, policy: CSPPolicy, target: TaskConfig, who: str) -> None:
        """Refuse a policy whose context or sizes do not fit fine-tuning target ``target`` (``who`` names
        the policy in the message)."""
        env = target.env
        mode = policy.cfg.context_mode
        if mode not in self.context_modes:
            from app.tasks.registry import task_of_context  # the registry imports this module

            raise ValueError(
                f"{who} has context_mode={mode!r}, which does not fit {env!r} (the {self.name} task takes "
                f"{list(self.context_modes)}): fine-tune it on {list(task_of_context(mode).env_names)}"
            )
        obs_dim, action_dim, goal_dim = self.target_dims(target)
        want = {"obs_dim": obs_dim, "action_dim": action_dim, "goal_dim": goal_dim}
        have = {"obs_dim": policy.obs_dim, "action_dim": policy.action_dim, "goal_dim": policy.goal_dim}
        bad = [f"{k}: policy {have[k]} vs env {want[k]}" for k in want if have[k] != want[k]]
        if bad:
            raise ValueError(
                f"{who} does not fit {env!r} ({'; '.join(bad)}); "
                f"pre-train on an environment with the same observation and action spaces"
            )


class SubEnvBatch:
    """Mixin for N sub-envs with per-row state arrays ``terminated``, ``truncated`` and ``_was_reset``."""

    num_envs: int
    action_dim: int
    terminated: np.ndarray
    truncated: np.ndarray
    _was_reset: np.ndarray

    def _mask(self, mask: np.ndarray | None, what: str) -> np.ndarray:
        """``mask`` as (N,) bool (all True if None), or a ValueError naming the method and the shape."""
        if mask is None:
            return np.ones(self.num_envs, bool)
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.shape != (self.num_envs,):
            raise ValueError(
                f"{type(self).__name__}.{what}: mask has dtype {mask.dtype} and shape {mask.shape}; "
                f"expected bool of shape ({self.num_envs},)"
            )
        return mask

    def _rows_to_step(self, actions: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row indices to step, actions as an array) after checking the shapes and that every selected
        row was reset and is not done."""
        mask = self._mask(mask, "step")
        actions = np.asarray(actions)
        name = type(self).__name__
        want = (self.num_envs, self.action_dim)
        if actions.shape != want:
            raise ValueError(f"{name}.step: actions have shape {actions.shape}; expected {want}")
        idx = np.flatnonzero(mask)
        bad = idx[~self._was_reset[idx] | self.terminated[idx] | self.truncated[idx]]
        if len(bad):
            raise RuntimeError(
                f"{name}.step: sub-envs {bad.tolist()} were never reset or are done; reset them first"
            )
        return idx, actions
