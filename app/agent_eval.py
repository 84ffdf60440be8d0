"""A fine-tuning run's agent rebuilt from its artifacts, evaluated on the run's own fixed, seeded episodes,
with what a video of each episode needs (``EpisodeTrace``; nothing is rendered here).

The evaluation is the run's: ``app.finetune_eval.evaluate`` on an eval ``ChunkEnv`` built as
``app.finetune.build_pipeline`` builds it (``eval.episodes`` sub-envs on ``eval.seed``), so with the run's
own settings the stochastic agent's success is what the run logged last as ``eval/success_rate`` (when it
sampled, ``eval.deterministic=false``). To record every low-level step without a hook in ``ChunkEnv``, the
env's backend is seen through a ``_Recorder`` for the evaluation's duration.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tensordict.nn import TensorDictModule

from app.base_run import load_base_policy
from app.envs.torchrl_envs import ChunkEnv, make_chunk_env
from app.finetune import chunk_env_kwargs, make_actor
from app.finetune_config import FinetuneConfig
from app.finetune_eval import evaluate
from app.finetune_state import read_agent
from app.methods import METHODS

MODES = ("deterministic", "stochastic")  # tanh(mean) actions, sampled actions


@dataclass
class EpisodeTrace:
    """One evaluation episode, as a video of it needs it.

    T is the episode's real env steps (it ends at success or at ``task.max_episode_steps``), C = ceil(T / H)
    its chunks of H = ``chunk.exec_horizon`` actions (the last may be cut short by the episode's end).
    """

    episode: int  # index of the fixed evaluation episode (its sub-env): same start and goal in every mode
    mode: str  # "deterministic" or "stochastic"
    observations: np.ndarray  # (T + 1, d_o) float32: o_0 (the reset) .. o_T, the low-level observations
    goal: np.ndarray  # (2,) the maze goal's xy; (d_g,) the goal given to the policy on other tasks (cube)
    success: bool
    chunk_starts: np.ndarray  # (C,) int64: the env step at which each chunk began (0, H, 2H, ...)
    sigma_per_chunk: np.ndarray | None  # (C,) float32: the sigma the agent chose (tmrl); None: no choice
    # (T + 1, nq) the simulator state per step where the backend gives it (``scene(k)``: the cube's qpos)
    scene: np.ndarray | None = None

    @property
    def steps(self) -> int:
        """T, the real env steps of the episode."""
        return len(self.observations) - 1

    @property
    def xy(self) -> np.ndarray:
        """(T + 1, 2): the first two observation dims, the point's position in the maze."""
        return self.observations[:, :2]

    @property
    def sigma_per_step(self) -> np.ndarray | None:
        """(T,) float32: the sigma of the chunk that took each env step's action; None without a choice."""
        if self.sigma_per_chunk is None:
            return None
        lengths = np.diff(np.append(self.chunk_starts, self.steps))
        return np.repeat(self.sigma_per_chunk, lengths)


@dataclass
class AgentEval:
    """One mode's evaluation: success per episode (N,) bool and the N episodes' traces."""

    mode: str
    success: np.ndarray
    traces: list[EpisodeTrace]


class _Recorder:
    """A backend seen through: every row's observations from the first full reset until the end of its
    first episode (the later episodes ``evaluate`` steps on are ignored, as it ignores them)."""

    def __init__(self, backend) -> None:
        self.inner = backend
        n = backend.num_envs
        self.paths: list[list[np.ndarray]] = [[] for _ in range(n)]
        self.goals: np.ndarray | None = None  # (N, d) each row's goal at the first full reset
        # per row, the simulator state per step, where the backend can say it (a video replays it)
        self.scenes: list[list[np.ndarray]] | None = (
            [[] for _ in range(n)] if hasattr(backend, "scene") else None
        )
        self.live, self.success = np.zeros(n, bool), np.zeros(n, bool)

    def __getattr__(self, name: str):  # every attribute and method but the two below: the backend's
        return getattr(self.inner, name)

    def reset(self, mask: np.ndarray | None = None, *args, **kw) -> None:
        self.inner.reset(mask, *args, **kw)
        if mask is None:  # ``evaluate``'s reset: the fixed episodes begin
            self.paths = [[ob.copy()] for ob in self.inner.observation]
            if self.scenes is not None:
                self.scenes = [[self.inner.scene(k)] for k in range(len(self.paths))]
            # the maze keeps its goal's xy apart from the policy's goal input (empty on the visual maze)
            self.goals = getattr(self.inner, "goal_pos", self.inner.goal).copy()
            self.live[:], self.success[:] = True, False

    def step(self, actions: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        out = self.inner.step(actions, mask)
        for k in np.flatnonzero(mask & self.live):
            self.paths[k].append(self.inner.observation[k].copy())
            if self.scenes is not None:
                self.scenes[k].append(self.inner.scene(k))
            if out["terminated"][k] or out["truncated"][k]:
                self.live[k], self.success[k] = False, bool(out["success"][k])
        return out


@contextmanager
def recording(env: ChunkEnv) -> Iterator[_Recorder]:
    """``env`` with its backend seen through a ``_Recorder`` inside the block."""
    backend = env.backend
    env.backend = recorder = _Recorder(backend)
    try:
        yield recorder
    finally:
        env.backend = backend


@dataclass
class RebuiltAgent:
    """A fine-tuning run's actor, acting in an eval env of the run's settings."""

    cfg: FinetuneConfig
    env: ChunkEnv
    policy: TensorDictModule
    env_steps: int  # the fine-tuning env steps the checkpoint was saved at

    @property
    def max_chunks(self) -> int:
        """Chunks enough for every episode to end (as ``app.finetune.run_loop``)."""
        return math.ceil(self.cfg.task.max_episode_steps / self.cfg.chunk.exec_horizon) + 1


def rebuild_agent(cfg: FinetuneConfig, from_run: str, agent_file: Path, tmp: str) -> RebuiltAgent:
    """The agent saved in ``agent_file`` (a fine-tuning checkpoint) with the base policy of its pre-training
    run ``from_run`` and an eval env as the run built them; ValueError naming the file if it holds another
    agent than ``cfg`` makes."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    base = load_base_policy(cfg, from_run, tmp)
    policy = None if METHODS[cfg.method] is None else base.policy
    env = make_chunk_env(
        num_envs=cfg.eval.episodes, seed=cfg.eval.seed, **chunk_env_kwargs(cfg, policy, base.sensor)
    )
    loss, policy = make_actor(env, cfg)
    ckpt = read_agent(agent_file)
    try:
        loss.load_state_dict(ckpt["loss"])
    except RuntimeError as err:
        raise ValueError(f"{agent_file} holds another agent than its run's config.yaml makes: {err}") from err
    return RebuiltAgent(cfg, env, policy, int(ckpt["counters"]["env_steps"]))


def evaluate_agent(agent: RebuiltAgent, mode: str) -> AgentEval:
    """The agent in ``mode`` (``MODES``) on the run's fixed evaluation episodes, each traced."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; expected one of {MODES}")
    chunks: list = []  # per chunk: (env step (N,), sigma (N,), live (N,)), when the agent chooses sigma
    with recording(agent.env) as rec:
        evaluate(agent.env, agent.policy, agent.max_chunks, agent.cfg.eval.seed, chunks, mode == MODES[0])
    h = agent.cfg.chunk.exec_horizon
    traces = []
    for k, path in enumerate(rec.paths):
        observations = np.stack(path)
        starts = np.arange(0, len(observations) - 1, h, dtype=np.int64)
        sigma = None
        if chunks:
            sigma = np.array([float(s[k]) for _, s, live in chunks if live[k]], np.float32)  # (C,)
        scene = None if rec.scenes is None else np.stack(rec.scenes[k])
        trace = EpisodeTrace(k, mode, observations, rec.goals[k], bool(rec.success[k]), starts, sigma, scene)
        traces.append(trace)
    return AgentEval(mode, rec.success.copy(), traces)
