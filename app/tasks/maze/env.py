"""OGBench pointmaze environments and a scripted noisy waypoint expert for demonstrations.

The pointmaze observation is the 2-d xy position of the point mass (float64) and the action is a 2-d
displacement command in [-1, 1] (the simulator moves the point by 0.2 * action per step). The goal an
evaluation task hands out (``info["goal"]`` after ``reset``) lives in the same xy space, so the goal space
of the observation is ``obs[GOAL_INDICES]`` = ``obs[0:2]``.

The expert mirrors how OGBench's own "navigate" datasets were made: pick a random free cell as the goal,
follow the shortest path over the maze grid cell by cell (a waypoint controller heading for the centre of
the next cell), add Gaussian action noise, and pick a new goal whenever the current one is reached.

OGBench's maze draws its start/goal jitter (``add_noise``) and the teleport destinations from the GLOBAL
``np.random``. :func:`rollout_expert` and :func:`run_expert_task` therefore seed the global generator from
the caller's ``rng`` for the duration of the episode and restore its previous state afterwards, so episodes
are reproducible without leaking state into the caller's process.
"""

from __future__ import annotations

import contextlib
import difflib
import math
from collections import deque
from collections.abc import Iterator
from typing import Any

import gymnasium
import numpy as np

from app.tasks.maze.camera import MazeCamera
from app.tasks.maze.config import ExpertConfig
from modules.nets.keys import IMAGE

# Short name -> OGBench id. The "navigate" dataset id is what ogbench.make_env_and_datasets expects; with
# env_only=True it only builds the environment (no download).
MAZES: dict[str, str] = {
    "pointmaze-medium": "pointmaze-medium-navigate-v0",
    "pointmaze-large": "pointmaze-large-navigate-v0",
    "pointmaze-giant": "pointmaze-giant-navigate-v0",
    "pointmaze-teleport": "pointmaze-teleport-navigate-v0",
}

# Observation dims that form the goal space: the pointmaze observation IS the xy position, and the goal
# the environment hands out at test time is an xy position too.
GOAL_INDICES: tuple[int, ...] = (0, 1)

# Neighbour offsets on the (i, j) grid; i indexes y (rows of maze_map), j indexes x (columns).
_NEIGHBOURS = ((-1, 0), (0, -1), (1, 0), (0, 1))


def resolve_maze(name: str) -> tuple[str, str]:
    """Map a short name ("pointmaze-large") or a full id ("pointmaze-large-navigate-v0") to (short, id).

    Raises:
        ValueError: unknown name; the message lists the known names and suggests the closest one.
    """
    if name in MAZES:
        return name, MAZES[name]
    for short, env_id in MAZES.items():
        if name == env_id:
            return short, env_id
    known = sorted(MAZES) + sorted(MAZES.values())
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown maze environment {name!r}; expected one of {known}.{hint}")


def make_maze_env(name: str, **env_kwargs: Any) -> gymnasium.Env:
    """Build an OGBench pointmaze environment by short name or full id (no dataset download).

    ``env_kwargs`` go to the OGBench environment (e.g. ``terminate_at_goal=False``).
    """
    import ogbench  # local import: pulling in ogbench registers all its environments (slow-ish)

    _, env_id = resolve_maze(name)
    return ogbench.make_env_and_datasets(env_id, env_only=True, **env_kwargs)


def goal_indices(name: str) -> list[int]:
    """Observation dims that form the goal space of maze ``name`` (validated against :data:`MAZES`)."""
    resolve_maze(name)
    return list(GOAL_INDICES)


class MazeExpert:
    """Noisy waypoint controller over the maze grid's shortest paths.

    Usage: ``expert.reset(env, rng)`` picks a random goal (or ``expert.set_goal(xy)`` sets a fixed one),
    then ``expert.act(xy)`` returns the action at position ``xy``. For each goal cell a table of next
    waypoints (the centre of the next cell on a shortest path, for every cell) is computed once by BFS and
    cached, so a step is a table look-up plus scalar arithmetic. In the teleport maze the BFS avoids the
    inbound teleport cells where another path exists (a teleport throws the point to a random outlet).
    """

    _NOISE_BLOCK = 512  # noise is drawn in blocks: one rng call per block instead of one per step

    def __init__(self, config: ExpertConfig | None = None) -> None:
        self.config = config or ExpertConfig()
        self._maze: Any = None
        self._rng: np.random.Generator | None = None
        self._free_cells = np.zeros((0, 2), dtype=np.int64)
        self._tables: dict[tuple[int, int], np.ndarray] = {}
        self._noise = np.zeros((0, 2))
        self._noise_pos = 0
        self._fixed_goal = False
        self.goal_xy = np.zeros(2)
        self.goal_ij: tuple[int, int] = (0, 0)
        self.goals_reached = 0

    def reset(self, env: gymnasium.Env, rng: np.random.Generator) -> np.ndarray:
        """Bind to ``env``'s maze, use ``rng`` for goals and noise, draw a random goal; returns it (xy)."""
        maze = env.unwrapped
        if not hasattr(maze, "maze_map"):
            raise TypeError(f"MazeExpert needs an OGBench maze environment, got {type(maze).__name__}")
        if maze is not self._maze:
            self._maze = maze
            self._free_cells = np.argwhere(np.asarray(maze.maze_map) == 0)  # (n_free, 2) of (i, j)
            self._tables = {}
        self._rng = rng
        self._noise_pos = len(self._noise)  # forces a fresh block from the new rng
        self.goals_reached = 0
        self._fixed_goal = False
        self._sample_goal()
        return self.goal_xy.copy()

    def set_goal(self, goal_xy: np.ndarray) -> None:
        """Head for a fixed goal (e.g. an evaluation task's ``info["goal"]``); no resampling on arrival."""
        if self._maze is None:
            raise RuntimeError("MazeExpert.set_goal called before reset(env, rng)")
        self.goal_xy = np.asarray(goal_xy, dtype=np.float64)[: len(GOAL_INDICES)].copy()
        self.goal_ij = tuple(int(v) for v in self._maze.xy_to_ij(self.goal_xy))
        self._fixed_goal = True

    def act(self, xy: np.ndarray) -> np.ndarray:
        """Action (2,) in [-1, 1] at ``xy``; first draws a new goal if a random one was reached."""
        if self._maze is None or self._rng is None:
            raise RuntimeError("MazeExpert.act called before reset(env, rng)")
        x, y = float(xy[0]), float(xy[1])
        cfg = self.config
        if not self._fixed_goal and math.hypot(x - self.goal_xy[0], y - self.goal_xy[1]) <= cfg.goal_tol:
            self.goals_reached += 1
            self._sample_goal()
        tx, ty = self._waypoint(x, y)
        dx, dy = tx - x, ty - y
        norm = math.hypot(dx, dy)
        # Exactly on the waypoint: stand still (only noise moves the point) rather than divide by zero.
        scale = cfg.gain / norm if norm > 1e-8 else 0.0
        ax, ay = dx * scale, dy * scale
        if cfg.noise_std > 0:
            if self._noise_pos >= len(self._noise):
                self._noise = self._rng.normal(0.0, cfg.noise_std, size=(self._NOISE_BLOCK, 2))
                self._noise_pos = 0
            ax += self._noise[self._noise_pos, 0]
            ay += self._noise[self._noise_pos, 1]
            self._noise_pos += 1
        return np.array([min(max(ax, -1.0), 1.0), min(max(ay, -1.0), 1.0)])

    def _sample_goal(self) -> None:
        assert self._rng is not None
        cell = self._free_cells[self._rng.integers(len(self._free_cells))]
        centre = np.asarray(self._maze.ij_to_xy(cell), dtype=np.float64)
        jitter = self._rng.uniform(-self.config.goal_jitter, self.config.goal_jitter, size=2)
        self.goal_xy = centre + jitter
        self.goal_ij = (int(cell[0]), int(cell[1]))

    def _waypoint(self, x: float, y: float) -> tuple[float, float]:
        """Next target: the goal itself inside the goal cell, else the centre of the next cell on the path."""
        i, j = self._maze.xy_to_ij((x, y))
        table = self._table(self.goal_ij)  # (H, W, 2); NaN = no waypoint
        if (i, j) == self.goal_ij or not (0 <= i < table.shape[0] and 0 <= j < table.shape[1]):
            return float(self.goal_xy[0]), float(self.goal_xy[1])
        tx, ty = table[i, j]
        if math.isnan(tx):
            # Unreachable goal (or a cell the grid calls a wall): head straight for the goal.
            return float(self.goal_xy[0]), float(self.goal_xy[1])
        return float(tx), float(ty)

    def _table(self, goal_ij: tuple[int, int]) -> np.ndarray:
        """(H, W, 2) centre of the next cell on a shortest path to ``goal_ij`` per cell (NaN if none)."""
        if goal_ij in self._tables:
            return self._tables[goal_ij]
        walls = np.asarray(self._maze.maze_map) != 0
        dist = _bfs(walls, goal_ij)
        teleport = getattr(self._maze, "_teleport_info", None)
        if teleport is not None:
            blocked = walls.copy()
            for ti, tj in teleport["teleport_in_ijs"]:
                blocked[ti, tj] = (ti, tj) != goal_ij
            safe = _bfs(blocked, goal_ij)
            # Where a teleport-free path exists, follow it; elsewhere fall back to the plain shortest path.
            dist = np.where(safe >= 0, safe, np.where(dist >= 0, dist + dist.size, -1))
        table = np.full((*walls.shape, 2), np.nan)
        for i, j in zip(*np.nonzero(dist > 0), strict=True):
            best, best_d = None, dist[i, j]
            for di, dj in _NEIGHBOURS:
                ni, nj = i + di, j + dj
                if 0 <= ni < walls.shape[0] and 0 <= nj < walls.shape[1] and 0 <= dist[ni, nj] < best_d:
                    best, best_d = (ni, nj), dist[ni, nj]
            if best is not None:
                table[i, j] = self._maze.ij_to_xy(best)
        self._tables[goal_ij] = table
        return table


def _bfs(walls: np.ndarray, goal_ij: tuple[int, int]) -> np.ndarray:
    """(H, W) BFS distance in cells from every cell to ``goal_ij``; -1 for walls and unreachable cells."""
    dist = np.full(walls.shape, -1, dtype=np.int64)
    dist[goal_ij] = 0
    queue = deque([goal_ij])
    while queue:
        i, j = queue.popleft()
        for di, dj in _NEIGHBOURS:
            ni, nj = i + di, j + dj
            inside = 0 <= ni < walls.shape[0] and 0 <= nj < walls.shape[1]
            if inside and not walls[ni, nj] and dist[ni, nj] < 0:
                dist[ni, nj] = dist[i, j] + 1
                queue.append((ni, nj))
    return dist


@contextlib.contextmanager
def seeded_global_numpy(rng: np.random.Generator | None, seed: int | None = None) -> Iterator[None]:
    """Seed the global ``np.random`` from ``rng`` (or with ``seed`` itself, if given) inside the block, then
    restore its previous state.

    OGBench's maze uses the global generator for start/goal jitter and teleports (see module docstring).
    """
    state = np.random.get_state()
    np.random.seed(seed if seed is not None else int(rng.integers(2**32)))
    try:
        yield
    finally:
        np.random.set_state(state)


def rollout_expert(
    env: gymnasium.Env,
    expert: MazeExpert,
    length: int,
    rng: np.random.Generator,
    camera: MazeCamera | None = None,
) -> dict[str, np.ndarray]:
    """Roll out one ``length``-step expert episode from a random free start cell.

    Success terminations and the env's time limit are ignored (OGBench navigate data are long episodes
    with a new goal every time one is reached); the env is reset only at the start.

    Returns:
        ``{"observation": (T, obs_dim) float32, "action": (T, 2) float32, "expert_goal": (T, 2) float32}``:
        the observation at which each action was taken, that action, and the goal the expert was heading
        for. The last marks the episode's segments (one per goal), within which every later state lies on
        a shortest path from every earlier one: what segment-limited hindsight relabelling relies on.
        With a ``camera`` also IMAGE (T, C, H, W, 3) uint8: the frames at each observation, the goal
        marker at that step's expert goal.
    """
    if length <= 0:
        raise ValueError(f"rollout_expert: length must be > 0, got {length}")
    maze = env.unwrapped
    with seeded_global_numpy(rng):
        expert.reset(env, rng)
        free = np.argwhere(np.asarray(maze.maze_map) == 0)
        init_ij = tuple(int(v) for v in free[rng.integers(len(free))])
        # The env's own task goal only positions the target marker; the expert picks its own goals.
        task_info = dict(
            task_name="expert",
            init_ij=init_ij,
            init_xy=maze.ij_to_xy(init_ij),
            goal_ij=expert.goal_ij,
            goal_xy=maze.ij_to_xy(expert.goal_ij),
        )
        ob, _ = env.reset(seed=int(rng.integers(2**31)), options=dict(task_info=task_info, render_goal=False))
        obs = np.empty((length, *np.shape(ob)), dtype=np.float32)  # (T, obs_dim)
        actions = np.empty((length, 2), dtype=np.float32)  # (T, 2)
        goals = np.empty((length, 2), dtype=np.float32)  # (T, 2)
        frames = None if camera is None else np.empty((length, *camera.cfg.frame_shape), np.uint8)
        for t in range(length):
            action = expert.act(ob[list(GOAL_INDICES)])
            obs[t], actions[t], goals[t] = ob, action, expert.goal_xy
            if frames is not None:  # the state at obs[t], the marker at the goal the expert heads for
                camera.render(maze.data, expert.goal_xy, out=frames[t])
            ob, *_ = env.step(action)
    episode = {"observation": obs, "action": actions, "expert_goal": goals}
    return episode if frames is None else {**episode, IMAGE: frames}


def run_expert_task(
    env: gymnasium.Env, expert: MazeExpert, task_id: int, rng: np.random.Generator, max_steps: int = 1000
) -> int | None:
    """Run the expert on evaluation task ``task_id`` towards the env's goal; steps to success, or None.

    Success is the environment's own ``info["success"]``; the episode stops there or after ``max_steps``.
    """
    with seeded_global_numpy(rng):
        ob, info = env.reset(seed=int(rng.integers(2**31)), options=dict(task_id=task_id, render_goal=False))
        expert.reset(env, rng)
        expert.set_goal(info["goal"])
        for t in range(max_steps):
            ob, _, _, _, info = env.step(expert.act(ob[list(GOAL_INDICES)]))
            if info["success"] > 0:
                return t + 1
    return None
