"""N OGBench maze environments stepped together at the numpy level (no torch).

The fine-tuning target is a :class:`TaskConfig`: one of OGBench's five evaluation tasks (start and goal
cells), optionally with the start or goal cell overridden (e.g. a goal the demonstrations never reached).
Every reset puts OGBench's own jitter on the start and the goal (uniform +-1 per axis around the cell
centre), drawn from the GLOBAL ``np.random``: :class:`BatchedMaze` seeds it from its own generator for the
duration of each reset, so runs are reproducible from ``seed``.

The wrapped gymnasium env is bypassed (``env.unwrapped`` is stepped): its TimeLimit would cut episodes at
OGBench's 1000 steps whatever ``max_episode_steps`` says, and the time limit is kept here per sub-env instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from app.tasks.base import SubEnvBatch
from app.tasks.maze.camera import MazeCamera, MazeCameraConfig
from app.tasks.maze.env import GOAL_INDICES, make_maze_env, resolve_maze, seeded_global_numpy
from modules.nets.keys import GOAL, IMAGE, OBS

if TYPE_CHECKING:
    from app.tasks.registry import TaskConfig

NUM_TASKS = 5  # OGBench's evaluation tasks per maze


def _check_cell(name: str, cell: Any) -> None:
    ok = isinstance(cell, list | tuple) and len(cell) == 2
    if not ok or any(isinstance(v, bool) or not isinstance(v, int | np.integer) for v in cell):
        raise ValueError(f"TaskConfig.{name}={cell!r}; expected a cell [i, j] of two integers or None")


def check_maze_target(target: TaskConfig) -> None:
    """Refuse maze target settings that cannot be honoured (an unknown maze, a bad task id or cell)."""
    resolve_maze(target.env)  # raises, listing the known names
    tid = target.task_id
    bad_id = isinstance(tid, bool) or not isinstance(tid, int) or not 1 <= tid <= NUM_TASKS
    if tid is not None and bad_id:
        raise ValueError(f"TaskConfig.task_id={tid!r}; expected an integer in 1..{NUM_TASKS} or None")
    for name in ("init_ij", "goal_ij"):
        value = getattr(target, name)
        if value is not None:
            _check_cell(name, value)
    if tid is None and (target.init_ij is None or target.goal_ij is None):
        raise ValueError(
            f"TaskConfig.task_id=None needs both init_ij and goal_ij; got init_ij={target.init_ij!r}, "
            f"goal_ij={target.goal_ij!r}"
        )


def target_cells(target: TaskConfig, maze: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """(start cell, goal cell) on ``maze`` (an OGBench maze env, unwrapped), checked to be free cells.

    Raises:
        ValueError: a cell outside the map or on a wall, naming the cell and the maze size.
    """
    init_ij = goal_ij = None
    if target.task_id is not None:
        info = maze.task_infos[target.task_id - 1]
        init_ij, goal_ij = info["init_ij"], info["goal_ij"]
    init_ij = tuple(int(v) for v in (target.init_ij if target.init_ij is not None else init_ij))
    goal_ij = tuple(int(v) for v in (target.goal_ij if target.goal_ij is not None else goal_ij))
    grid = np.asarray(maze.maze_map)
    for name, (i, j) in (("init_ij", init_ij), ("goal_ij", goal_ij)):
        inside = 0 <= i < grid.shape[0] and 0 <= j < grid.shape[1]
        if not inside or grid[i, j] != 0:
            where = "a wall" if inside else "outside the map"
            raise ValueError(
                f"TaskConfig.{name}=[{i}, {j}] is {where} of {target.env} (maze_map {grid.shape[0]}x"
                f"{grid.shape[1]}); expected a free cell (maze_map == 0)"
            )
    return init_ij, goal_ij


def maze_dims(env: str) -> tuple[int, int]:
    """(obs_dim, action_dim) of maze ``env`` (builds one environment, ~15 ms after the first)."""
    probe = make_maze_env(env)
    dims = (int(probe.observation_space.shape[0]), int(probe.action_space.shape[0]))
    probe.close()
    return dims


class BatchedMaze(SubEnvBatch):
    """N OGBench maze envs stepped together; start/goal from the TaskConfig with OGBench's own jitter.

    State arrays (one row per sub-env) hold each sub-env's latest values; ``step`` and ``reset`` update only
    the rows their mask selects, so a row that is not stepped keeps its last observation and flags.

    With a ``camera`` (the visual maze task) the goal is seen only in the frames: ``goal_dim`` is 0 and
    ``observe`` renders IMAGE (N, C, H, W, 3) uint8 with the goal marker at each row's goal instead of
    handing out GOAL. A row's frames are rendered when ``observe`` asks for a row whose state changed.

    Attributes:
        obs_dim, action_dim: sizes of one observation and one low-level action.
        goal_dim: size of the goal the policy is given: 2 (the xy position, GOAL_INDICES); 0 with a camera.
        goal_pos: (N, 2) float32 every row's goal xy (with or without a camera).
        step_count: (N,) int64 environment steps since each sub-env's last reset.
    """

    def __init__(
        self, task: TaskConfig, num_envs: int, seed: int = 0, camera: MazeCameraConfig | None = None
    ) -> None:
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"BatchedMaze num_envs={num_envs!r}; expected an integer >= 1")
        self.task, self.num_envs = task, num_envs
        self._envs = [make_maze_env(task.env) for _ in range(num_envs)]
        self._mazes = [env.unwrapped for env in self._envs]
        maze = self._mazes[0]
        init_ij, goal_ij = target_cells(task, maze)
        self._task_info = dict(
            task_name="tmrl",
            init_ij=init_ij,
            init_xy=maze.ij_to_xy(init_ij),
            goal_ij=goal_ij,
            goal_xy=maze.ij_to_xy(goal_ij),
        )
        self.init_ij, self.goal_ij = init_ij, goal_ij
        self.goal_xy = np.asarray(maze.ij_to_xy(goal_ij), dtype=np.float32)  # the goal cell's centre
        self.goal_tol = float(maze._goal_tol)  # the env's own success radius
        self.obs_dim = int(self._envs[0].observation_space.shape[0])
        self.action_dim = int(self._envs[0].action_space.shape[0])
        self.goal_dim = 0 if camera is not None else len(GOAL_INDICES)
        self._low = np.asarray(self._envs[0].action_space.low, dtype=np.float64)
        self._high = np.asarray(self._envs[0].action_space.high, dtype=np.float64)
        # The teleport maze draws teleport destinations from the global np.random inside step().
        self._step_uses_global_rng = getattr(maze, "_teleport_info", None) is not None

        n = num_envs
        self.observation = np.zeros((n, self.obs_dim), np.float32)
        self.goal = np.zeros((n, self.goal_dim), np.float32)
        self.goal_pos = np.zeros((n, len(GOAL_INDICES)), np.float32)
        self._camera = None if camera is None else MazeCamera(maze, camera)
        self.image = None if camera is None else np.zeros((n, *camera.frame_shape), np.uint8)
        self._stale = np.ones(n, bool)  # rows whose frames predate their state
        self.reward = np.zeros(n, np.float32)
        self.terminated = np.zeros(n, bool)
        self.truncated = np.zeros(n, bool)
        self.success = np.zeros(n, bool)
        self.step_count = np.zeros(n, np.int64)
        self._was_reset = np.zeros(n, bool)
        self.seed(seed)

    def seed(self, seed: int | None) -> None:
        """Re-seed the generator behind every later reset (and the teleports); None draws fresh entropy."""
        self._rng = np.random.default_rng(seed)
        for env in self._envs:
            # OGBench's reset takes a few random warm-up actions from the action space's own generator.
            env.action_space.seed(int(self._rng.integers(2**31)))

    def reset(
        self,
        mask: np.ndarray | None = None,
        seeds: Sequence[int] | None = None,
        task_ids: Sequence[int] | None = None,
    ) -> None:
        """Reset the sub-envs where ``mask`` (N,) is True (all if None).

        ``seeds`` (one per reset row, in row order) fix their episodes: the start/goal jitter is drawn from
        the global ``np.random`` seeded with the row's seed, as ``np.random.seed(s); env.reset(seed=s)``
        would (the zero-shot evaluation's fixed episodes); else the draws come from this batch's generator.
        ``task_ids`` (one per reset row) put OGBench evaluation task ``id``'s cells on those rows instead of
        the target's.
        """
        idx = np.flatnonzero(self._mask(mask, "reset"))
        for name, values in (("seeds", seeds), ("task_ids", task_ids)):
            if values is not None and len(values) != len(idx):
                raise ValueError(f"BatchedMaze.reset: {len(values)} {name} for {len(idx)} sub-envs to reset")
        infos = [
            self._task_info if task_ids is None else self._mazes[k].task_infos[int(task_ids[i]) - 1]
            for i, k in enumerate(idx)
        ]
        if seeds is None:  # one seeding of the global generator for the whole reset
            with seeded_global_numpy(self._rng):
                for k, info in zip(idx, infos, strict=True):
                    self._reset_row(k, int(self._rng.integers(2**31)), info)
        else:
            for k, info, seed in zip(idx, infos, seeds, strict=True):
                with seeded_global_numpy(None, seed=int(seed)):
                    self._reset_row(k, int(seed), info)
        self.reward[idx] = 0.0
        self.terminated[idx] = self.truncated[idx] = self.success[idx] = False
        self.step_count[idx] = 0
        self._was_reset[idx] = True
        self._stale[idx] = True

    def _reset_row(self, k: int, seed: int, task_info: dict) -> None:
        ob, info = self._mazes[k].reset(seed=seed, options=dict(task_info=task_info, render_goal=False))
        self.observation[k] = ob
        self.goal_pos[k] = np.asarray(info["goal"])[list(GOAL_INDICES)]
        if self._camera is None:
            self.goal[k] = self.goal_pos[k]

    def observe(self, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Copies of every row's OBS (N, d_o) float32 and GOAL (N, 2) float32, or with a camera IMAGE
        (N, C, H, W, 3) uint8 (the stale frames of ``rows``, all rows if None, rendered first; other rows'
        frames may be stale)."""
        if self._camera is None:
            return {OBS: self.observation.copy(), GOAL: self.goal.copy()}
        mask = self._mask(rows, "observe")
        for k in np.flatnonzero(mask & self._stale):
            self._camera.render(self._mazes[k].data, self.goal_pos[k], out=self.image[k])
            self._stale[k] = False
        return {OBS: self.observation.copy(), IMAGE: self.image.copy()}

    def step(self, actions: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """Step the sub-envs where ``mask`` (N,) is True with ``actions`` (N, d_a) (other rows are ignored).

        Actions are clipped to the action space: the point mass adds 0.2 * action to its position without
        clipping, so an out-of-range action would move it further than any legal one.

        Returns:
            copies of ``observation`` (N, d_o) float32, ``reward`` (N,) float32 (OGBench's: 1.0 on success,
            else 0.0), ``terminated`` (N,) bool (= success: OGBench terminates at the goal), ``truncated``
            (N,) bool (the step count reached ``max_episode_steps`` without success) and ``success``
            (N,) bool.
            Rows not stepped keep their last values.

        Raises:
            ValueError: bad shapes. RuntimeError: stepping a sub-env that was never reset or is done.
        """
        idx, actions = self._rows_to_step(actions, mask)
        actions = np.clip(actions, self._low, self._high)
        if self._step_uses_global_rng:
            with seeded_global_numpy(self._rng):
                self._step_rows(idx, actions)
        else:
            self._step_rows(idx, actions)
        return {
            "observation": self.observation.copy(),
            "reward": self.reward.copy(),
            "terminated": self.terminated.copy(),
            "truncated": self.truncated.copy(),
            "success": self.success.copy(),
        }

    def _step_rows(self, idx: np.ndarray, actions: np.ndarray) -> None:
        """The hot loop: one OGBench step per selected row, written into the state arrays."""
        mazes, obs, success = self._mazes, self.observation, self.success
        for k in idx:
            ob, _, _, _, info = mazes[k].step(actions[k])
            obs[k] = ob
            success[k] = info["success"] > 0
        self.step_count[idx] += 1
        self._stale[idx] = True
        self.reward[idx] = success[idx]
        self.terminated[idx] = success[idx]
        # A time limit reached on the very step that succeeds is a success, not a truncation.
        self.truncated[idx] = (self.step_count[idx] >= self.task.max_episode_steps) & ~success[idx]

    def close(self) -> None:
        """Close the underlying environments (and the camera's renderer)."""
        if self._camera is not None:
            self._camera.close()
        for env in self._envs:
            env.close()
