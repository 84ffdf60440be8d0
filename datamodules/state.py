"""State demonstrations as training windows for CSP pre-training.

A window is (observation at t, hindsight goal, actions t .. t+L-1), all from ONE episode: windows never
cross an episode boundary. Goals are relabelled from a future observation of the same episode, projected
onto the environment's goal dimensions (the store's ``goal_indices`` attribute), so a relabelled goal lives
in the same space and units as the goal the environment hands out at test time.

With ``goal_sampling="segment"`` the future state is drawn from the rest of the expert's current
segment (the steps it spent heading for one goal): noisy-expert "navigate" data wander between goals, and
a goal from a later segment labels the current action with a detour.

Randomness: the loaders read windows through a :class:`WindowSampler`, whose keys ``(index, seed)`` fix
both the order and every item's random draws (its hindsight goal, its augmentation) as functions of the
fit's seed and the epoch. A fit therefore sees the same items whatever its number of DataLoader workers,
and a resumed fit sees exactly the items the uninterrupted one would have: the sampler starts part-way
through the epoch, where the restored loop counters say training stopped.

Several processes (a DDP strategy): ``data.batch_size`` is the global batch. Rank r of N reads every N-th
key of the same permutation, batch_size / N per step, so the N processes' step-k batches together are
exactly the single-process step-k batch: the same windows per epoch, none twice, whatever N.

Normalization statistics are computed once, from the training episodes, and handed to the policy, which
keeps them as buffers (they travel with its checkpoint). Episodes, not windows, are split into train and
validation so no validation window shares an episode with a training one.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.episodes import EpisodeStore
from modules.nets.keys import ACTION, GOAL, OBS

GOAL_SAMPLING = ("future", "geometric", "segment")
SEGMENT_KEY = "expert_goal"  # per-step goal of the scripted expert; marks the episode's segments
REQUIRED = "???"  # the config loader refuses a run that leaves this value unset


@dataclass
class StateDataConfig:
    """Where the demonstrations are and how windows are drawn from them."""

    path: str = REQUIRED  # episode store (see datamodules/episodes.py), e.g. data/pointmaze-large.zarr
    val_fraction: float = 0.05  # fraction of EPISODES held out for val/loss
    # the GLOBAL batch: under a multi-process strategy each of the N processes takes batch_size / N of it,
    # so a fit on N processes trains on the same batches, step for step, as on one (raise it to fill more
    # or bigger devices)
    batch_size: int = 256
    num_workers: int = 0  # DataLoader worker processes (0 = load in the training process)
    # "future": uniform over the rest of the episode; "geometric": near states first; "segment": uniform
    # over the rest of the expert's current segment (needs the store's expert_goal key), where every
    # later state lies on a shortest path from the current one, so the demonstrated action fits the goal
    goal_sampling: str = "future"
    goal_geometric_p: float = 0.01  # success probability of the geometric offset (mean offset 1/p steps)
    # probability that the goal is the LAST state of the goal range (for "segment": where the expert reached
    # its goal), so far-away goals are seen from every point of the way, not only nearby ones
    goal_end_p: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.goal_sampling not in GOAL_SAMPLING:
            raise ValueError(f"data.goal_sampling must be one of {GOAL_SAMPLING}, got {self.goal_sampling!r}")
        if not 0.0 < self.goal_geometric_p <= 1.0:
            raise ValueError(f"data.goal_geometric_p must be in (0, 1], got {self.goal_geometric_p}")
        if not 0.0 <= self.goal_end_p <= 1.0:
            raise ValueError(f"data.goal_end_p must be in [0, 1], got {self.goal_end_p}")


def window_starts(episode_ends: np.ndarray, episodes: np.ndarray, chunk_len: int) -> np.ndarray:
    """Global start indices of every length-``chunk_len`` window inside the given episodes.

    Returns an (N, 2) int64 array of (start, goal_end), goal_end = episode end (exclusive): the range
    hindsight goals are drawn from; start + chunk_len <= episode end always.
    """
    begins = np.concatenate([[0], episode_ends[:-1]])
    rows = []
    for e in episodes:
        b, end = int(begins[e]), int(episode_ends[e])
        starts = np.arange(b, end - chunk_len + 1, dtype=np.int64)
        rows.append(np.stack([starts, np.full_like(starts, end)], axis=1))
    if not rows:
        return np.zeros((0, 2), dtype=np.int64)
    return np.concatenate(rows)


def split_key(key: int | tuple[int, int]) -> tuple[int, torch.Generator | None]:
    """(window index, generator) of a dataset key: a plain index draws from torch's global RNG (which the
    DataLoader seeds per worker), a :class:`WindowSampler` key ``(index, seed)`` from a generator seeded
    with ``seed``."""
    if isinstance(key, tuple):
        index, seed = key
        return int(index), torch.Generator().manual_seed(int(seed))
    return int(key), None


def sample_goal_index(
    start: int,
    end: int,
    sampling: str,
    geometric_p: float,
    end_p: float,
    generator: torch.Generator | None = None,
) -> int:
    """A goal row in [start, end) for the window starting at ``start`` (StateDataConfig's goal_sampling),
    drawn from ``generator`` (None: torch's global RNG)."""

    def uniform() -> float:
        return torch.rand((), generator=generator).item()

    if end_p and uniform() < end_p:
        return end - 1
    if sampling in ("future", "segment"):  # uniform over [start, end)
        return int(torch.randint(start, end, (), generator=generator).item())
    offset = int(np.floor(np.log1p(-uniform()) / np.log1p(-geometric_p)))
    return min(start + offset, end - 1)


class WindowSampler(Sampler):
    """The keys ``(index, seed)`` a loader reads windows by: a permutation of the windows (0 .. n-1 in
    order when not ``shuffle``) and a seed per key, both functions of (seed, epoch) alone (the epoch only
    when shuffling: validation draws the same items every time).

    Distributed: rank ``rank`` of ``world`` reads every world-th key of the first ``len(self) * world``.
    ``skip``: the next iteration leaves out its first ``skip`` keys (those a resumed fit already trained
    on), then it is reset to 0.
    """

    def __init__(self, size: int, seed: int, shuffle: bool, rank: int = 0, world: int = 1) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world = rank, world
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at the start of every epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.world

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch if self.shuffle else 0])
        order = rng.permutation(self.size) if self.shuffle else np.arange(self.size)
        seeds = rng.integers(0, 2**63 - 1, size=self.size)
        mine = slice(self.rank, len(self) * self.world, self.world)
        skip, self.skip = self.skip, 0
        return itertools.islice(zip(order[mine].tolist(), seeds[mine].tolist(), strict=True), skip, None)


class WindowDataset(Dataset):
    """Windows (observation, hindsight goal, action chunk) over in-memory episode arrays."""

    def __init__(
        self,
        observations: np.ndarray,  # (N, d_o) all episodes concatenated
        actions: np.ndarray,  # (N, d_a)
        windows: np.ndarray,  # (W, 2) (start, goal_end) from window_starts
        chunk_len: int,
        goal_indices: list[int] | None,
        goal_sampling: str = "future",
        goal_geometric_p: float = 0.01,
        goal_end_p: float = 0.0,
    ) -> None:
        self.observations = observations
        self.actions = actions
        self.windows = windows
        self.chunk_len = chunk_len
        self.goal_indices = None if goal_indices is None else np.asarray(goal_indices)
        self.goal_args = (goal_sampling, goal_geometric_p, goal_end_p)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        i, generator = split_key(key)
        start, end = (int(v) for v in self.windows[i])
        item = {
            OBS: torch.from_numpy(self.observations[start]),
            ACTION: torch.from_numpy(self.actions[start : start + self.chunk_len]),  # (L, d_a)
        }
        if self.goal_indices is not None:
            g = sample_goal_index(start, end, *self.goal_args, generator)
            item[GOAL] = torch.from_numpy(self.observations[g, self.goal_indices])
        return item


def segment_ends(episode_ends: np.ndarray, segment_key: np.ndarray) -> np.ndarray:
    """(N,) exclusive end of the segment each step belongs to; a segment is a run of equal
    ``segment_key`` rows inside one episode."""
    n = len(segment_key)
    first = np.ones(n, dtype=bool)  # True at the first step of every segment
    first[1:] = np.any(segment_key[1:] != segment_key[:-1], axis=1)
    first[np.concatenate([[0], episode_ends[:-1]])] = True
    starts = np.flatnonzero(first)
    ends_of_segment = np.append(starts[1:], n)
    return ends_of_segment[np.cumsum(first) - 1]


def split_episodes(num_episodes: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of episode indices into (train, val); val keeps at least one episode when asked for."""
    order = np.random.default_rng(seed).permutation(num_episodes)
    n_val = int(round(num_episodes * val_fraction))
    if val_fraction > 0 and n_val == 0 and num_episodes > 1:
        n_val = 1
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def split_windows(
    store: EpisodeStore, cfg, chunk_len: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train windows, val windows, train episodes) of ``store``: episodes split by ``cfg.val_fraction``,
    windows (start, end of the goal range) inside episodes, the end moved to the segment's end for
    ``cfg.goal_sampling == "segment"``. ``cfg`` is a state or point-cloud data config.

    Episodes shorter than ``chunk_len`` give no window; they are left out with one warning line on stderr.

    Raises:
        ValueError: segment goals without the segment key, or no window of ``chunk_len`` in any episode.
    """
    ends = store.episode_ends
    train_eps, val_eps = split_episodes(store.num_episodes, cfg.val_fraction, seed)
    train_w = window_starts(ends, train_eps, chunk_len)
    val_w = window_starts(ends, val_eps, chunk_len)
    if cfg.goal_sampling == "segment":
        if SEGMENT_KEY not in store.keys:
            raise ValueError(
                f"{cfg.path}: data.goal_sampling=segment needs the {SEGMENT_KEY!r} key, which "
                f"this store lacks (keys {store.keys}); regenerate it with `tmrl demos` or use "
                f"data.goal_sampling=future"
            )
        seg_end = segment_ends(ends, store.load(SEGMENT_KEY))
        train_w[:, 1], val_w[:, 1] = seg_end[train_w[:, 0]], seg_end[val_w[:, 0]]
    if len(train_w) == 0:
        raise ValueError(
            f"{cfg.path}: no training window of {chunk_len} steps fits in any episode; "
            f"shorten policy.chunk_len or generate longer episodes"
        )
    lengths = np.diff(ends, prepend=0)
    if (short := np.unique(lengths[lengths < chunk_len])).size:  # at most chunk_len - 1 distinct lengths
        print(f"[tmrl] warning: {cfg.path}: {np.sum(lengths < chunk_len)} of {len(ends)} episodes left out: "
              f"their lengths {short.tolist()} are shorter than a window of policy.chunk_len={chunk_len} "
              "actions", file=sys.stderr)  # fmt: skip
    return train_w, val_w, train_eps


class WindowDataModule(L.LightningDataModule):
    """What every demonstration data module shares: config, statistics, datasets and their loaders.

    Subclasses fill ``store``, ``stats``, ``train_set`` and ``val_set`` in ``setup``.
    """

    def __init__(self, cfg, chunk_len: int, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.chunk_len = chunk_len
        self.seed = seed
        self.store: EpisodeStore | None = None
        self.stats: dict[str, np.ndarray] = {}
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def obs_dim(self) -> int:
        return int(self.train_set.observations.shape[1])

    @property
    def action_dim(self) -> int:
        return int(self.train_set.actions.shape[1])

    @property
    def world(self) -> tuple[int, int]:
        """(global rank, number of processes) of the trainer this data module serves; (0, 1) without one."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    @property
    def rank_batch_size(self) -> int:
        """This process's share of the global ``data.batch_size``."""
        world = self.world[1]
        if self.cfg.batch_size % world:
            raise ValueError(
                f"data.batch_size={self.cfg.batch_size} is the global batch and must split evenly over the "
                f"{world} training processes (devices x num_nodes); use a multiple of {world}"
            )
        return self.cfg.batch_size // world

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        rank, world = self.world
        sampler = WindowSampler(len(dataset), self.seed, shuffle, rank, world)
        workers = self.cfg.num_workers
        return DataLoader(
            dataset,
            batch_size=self.rank_batch_size,
            sampler=sampler,
            drop_last=shuffle,
            num_workers=workers,
            persistent_workers=workers > 0,
            # its own generator: starting an iterator (every validation) then never draws from torch's
            # global RNG, whose state a resumed fit restores for the training step's noise
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled windows; a resumed fit (Lightning restores its loop counters before asking for this
        loader) starts after the batches of the current epoch it already trained on."""
        loader = self._loader(self.train_set, shuffle=True)
        if self.trainer is not None:
            done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
            # a checkpoint of the epoch's last batch: Lightning goes on with the next epoch, from its start
            loader.sampler.skip = done * self.rank_batch_size if done < len(loader) else 0
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


class StateDataModule(WindowDataModule):
    """Demonstration windows from an episode store of low-dimensional states."""

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:  # idempotent: the app calls it before Trainer.fit does
            return
        store = EpisodeStore.open(self.cfg.path)
        for key in (OBS, ACTION):
            if key not in store.keys:
                raise ValueError(f"{self.cfg.path}: episode store has no {key!r} array (has {store.keys})")
        obs = store.load(OBS).astype(np.float32)
        act = store.load(ACTION).astype(np.float32)
        goal_indices = store.attrs.get("goal_indices")
        train_w, val_w, train_eps = split_windows(store, self.cfg, self.chunk_len, self.seed)
        kwargs = dict(
            chunk_len=self.chunk_len,
            goal_indices=goal_indices,
            goal_sampling=self.cfg.goal_sampling,
            goal_geometric_p=self.cfg.goal_geometric_p,
            goal_end_p=self.cfg.goal_end_p,
        )
        self.train_set = WindowDataset(obs, act, train_w, **kwargs)
        self.val_set = WindowDataset(obs, act, val_w, **kwargs)
        self.store = store
        self.stats = self._statistics(obs, act, store.episode_ends, train_eps, goal_indices)

    @staticmethod
    def _statistics(obs, act, ends, train_eps, goal_indices) -> dict[str, np.ndarray]:
        begins = np.concatenate([[0], ends[:-1]])
        rows = np.concatenate([np.arange(begins[e], ends[e]) for e in train_eps])
        o, a = obs[rows], act[rows]
        stats = {
            f"{OBS}_mean": o.mean(0),
            f"{OBS}_std": o.std(0),
            f"{ACTION}_min": a.min(0),
            f"{ACTION}_max": a.max(0),
        }
        if goal_indices is not None:
            # goals are relabelled observations, so their statistics are those of the goal dimensions
            stats[f"{GOAL}_mean"] = o[:, goal_indices].mean(0)
            stats[f"{GOAL}_std"] = o[:, goal_indices].std(0)
        return stats

    @property
    def goal_dim(self) -> int:
        gi = self.train_set.goal_indices
        return 0 if gi is None else len(gi)
