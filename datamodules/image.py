"""Camera demonstrations as training windows for CSP pre-training, read lazily from an episode store.

A window is (proprioceptive observation at t, camera frames at t, hindsight goal, actions t .. t+L-1), all
from ONE episode. The store holds per-step ``image`` frames (C, H, W, 3) uint8: C cameras, RGB, HWC. With
``frame_stack`` k > 1 an item carries the frames t-k+1 .. t of the same episode (clamped at its first
frame), concatenated along the view axis, oldest first::

    views: [ f(t-k+1) cam 0 .. cam C-1 | ... | f(t) cam 0 .. cam C-1 ]     -> (k * C, H, W, 3)

Goals: a store whose attrs name a ``goal_key`` array gets hindsight goals from it, drawn as in
datamodules/pointcloud.py. A store without one has its goal drawn into the picture (a maze with its goal
marker rendered): its items carry no goal (goal_dim 0) and ``goal_sampling`` does not apply.

Memory: the frames (>99% of the bytes) stay on disk; each DataLoader process opens the zarr array itself
and reads the rows a batch needs, stacked history included, in ONE read (``__getitems__``). The
low-dimensional arrays are loaded whole. ``load_to_memory=true`` loads the frames too.

Augmentation (training split only, inside the dataset, so in the DataLoader workers): the DrQ /
diffusion-policy random shift, see :class:`ImageAugment`. Each item draws its shift and goal from the
generator of its sampler key (datamodules/state.py), so workers and resumed fits see the same items.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset

from datamodules.episodes import EpisodeStore, StoreRows
from datamodules.pointcloud import DatasetMismatchError, episode_rows
from datamodules.state import (
    SEGMENT_KEY,
    StateDataConfig,
    WindowDataModule,
    sample_goal_index,
    split_key,
    split_windows,
)
from modules.nets.keys import ACTION, GOAL, IMAGE, OBS


@dataclass
class ImageDataConfig(StateDataConfig):
    """The state data settings (path, split, batch, workers, goal sampling), plus what the camera store
    must look like, how frames are stacked and how training frames are augmented."""

    env: str | None = None  # the store's attrs "env" must equal this (e.g. pointmaze-large); None: unchecked
    image_size: list[int] = field(default_factory=lambda: [64, 64])  # [H, W] every stored frame must have
    cameras: int = 1  # C, camera views every stored step must have
    frame_stack: int = 1  # k: an item holds frames t-k+1 .. t (same episode, clamped at its first frame)
    shift_pad: int = 4  # random-shift augmentation of training frames, pixels; 0 = off
    load_to_memory: bool = False  # True: read every frame into memory at setup (small stores only)
    stats_frames: int = 256  # training frames sampled for the per-channel pixel mean and std

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.env is not None and (not isinstance(self.env, str) or not self.env):
            raise ValueError(f"data.env must be a non-empty env name or None, got {self.env!r}")
        size = self.image_size
        if (
            not isinstance(size, (list, tuple))
            or len(size) != 2
            or not all(isinstance(v, int) and v >= 1 for v in size)
        ):
            raise ValueError(f"data.image_size must be [H, W], two integers >= 1, got {size!r}")
        self.image_size = [int(size[0]), int(size[1])]
        if self.cameras < 1:
            raise ValueError(f"data.cameras must be >= 1 (camera views per step), got {self.cameras}")
        if self.frame_stack < 1:
            raise ValueError(f"data.frame_stack must be >= 1 (frames per item), got {self.frame_stack}")
        if not 0 <= self.shift_pad < min(self.image_size):
            raise ValueError(
                f"data.shift_pad must be in [0, {min(self.image_size)}) pixels (below the smaller side of "
                f"data.image_size={self.image_size}; 0 = off), got {self.shift_pad}"
            )
        if not isinstance(self.load_to_memory, bool):
            raise ValueError(f"data.load_to_memory must be true or false, got {self.load_to_memory!r}")
        if self.stats_frames < 1:
            raise ValueError(f"data.stats_frames must be >= 1, got {self.stats_frames}")

    @property
    def views(self) -> int:
        """V = cameras * frame_stack, the view axis of an item's images."""
        return self.cameras * self.frame_stack


def check_image_store(store: EpisodeStore, cfg: ImageDataConfig) -> str | None:
    """Refuse a store that does not match ``cfg``; return the name of its goal array, or None when the
    store has no ``goal_key`` attribute (the goal is drawn in the image).

    Raises:
        DatasetMismatchError: naming the file, the attribute or key, and the stored and expected values.
    """
    path, attrs = store.path, store.attrs
    if cfg.env is not None and attrs.get("env") != cfg.env:
        raise DatasetMismatchError(
            f"{path}: attrs 'env' is {attrs.get('env')!r}, but data.env is {cfg.env!r}; point data.path "
            f"at a {cfg.env} camera store or generate one with `tmrl demos --env {cfg.env}`"
        )
    goal_key = attrs.get("goal_key") or None
    needed = [OBS, ACTION, IMAGE]
    if goal_key is not None:
        needed += [goal_key] + ([SEGMENT_KEY] if cfg.goal_sampling == "segment" else [])
    for key in needed:
        if key not in store.keys:
            why = " (named by attrs 'goal_key')" if key == goal_key else ""
            raise DatasetMismatchError(
                f"{path}: key {key!r}{why} is missing (the store has {store.keys}); the image data config "
                f"with goal_sampling={cfg.goal_sampling!r} needs {needed}"
            )
    specs = attrs["keys"]
    for key in [OBS, ACTION] + ([goal_key] if goal_key else []):
        if len(specs[key]["shape"]) != 1:
            raise DatasetMismatchError(
                f"{path}: key {key!r} has per-step shape {tuple(specs[key]['shape'])}, expected (d,)"
            )
    dtype, shape = np.dtype(specs[IMAGE]["dtype"]), tuple(specs[IMAGE]["shape"])
    (h, w), c = cfg.image_size, cfg.cameras
    if dtype != np.uint8:
        raise DatasetMismatchError(f"{path}: key {IMAGE!r} has dtype {dtype}, expected uint8 RGB frames")
    if len(shape) != 4 or shape[3] != 3:
        raise DatasetMismatchError(
            f"{path}: key {IMAGE!r} has per-step shape {shape}, expected (C, H, W, 3) = ({c}, {h}, {w}, 3)"
        )
    if list(shape[1:3]) != cfg.image_size:
        raise DatasetMismatchError(
            f"{path}: key {IMAGE!r} has frames of {shape[1]}x{shape[2]} pixels, but data.image_size is "
            f"{cfg.image_size}; regenerate it at {h}x{w} or set data.image_size=[{shape[1]}, {shape[2]}]"
        )
    names = attrs.get("cameras")
    if shape[0] != c:
        raise DatasetMismatchError(
            f"{path}: key {IMAGE!r} has {shape[0]} camera views per step (attrs 'cameras' {names}), but "
            f"data.cameras is {c}; regenerate it with {c} camera(s) or set data.cameras={shape[0]}"
        )
    if names is not None and len(names) != shape[0]:
        raise DatasetMismatchError(
            f"{path}: attrs 'cameras' names {len(names)} cameras {names}, but key {IMAGE!r} has {shape[0]} "
            f"view(s) per step; the store is inconsistent, regenerate it"
        )
    return None if goal_key is None else str(goal_key)


@dataclass(frozen=True)
class ImageAugment:
    """Random shift (DrQ; diffusion policy's crop): replicate-pad every view by ``pad`` pixels on each side
    and crop an H x W window at a random integer offset in [0, 2 * pad] per axis.

    One offset (dy, dx) is drawn per camera view. With ``frame_stack`` k > 1 the views are read as the
    dataset lays them out (k frames x C cameras, frame-major) and a camera's k stacked frames share one
    offset, as DrQ shifts a whole stack: differences between stacked frames then show the scene's motion,
    not the augmentation's. Padding replicates the border pixels, so no black bands appear.
    """

    pad: int  # pixels; 0: the identity
    frame_stack: int = 1  # k: views come in k frame-major groups that share their cameras' offsets

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(..., V, H, W, 3) uint8 -> a new tensor of the same shape and dtype (the input itself if pad is 0);
        leading dims are independent items. Draws from ``generator``, else torch's global RNG (which the
        DataLoader seeds per worker, so workers draw different shifts)."""
        if self.pad == 0:
            return images
        *_, v, h, w, ch = images.shape
        k = self.frame_stack
        if v % k:
            raise ValueError(f"ImageAugment: {v} views do not split into frame_stack={k} equal groups")
        if images.numel() == 0:
            return images.clone()
        n, p = math.prod(images.shape[:-4]), self.pad  # N items
        offset = torch.randint(0, 2 * p + 1, (n, 1, v // k, 2), generator=generator)  # (N, 1, C, 2)
        shift = (offset - p).expand(n, k, v // k, 2).reshape(n * v, 2)  # (N * V, 2) in [-pad, pad]
        # a crop of the replicate-padded frame at `offset` is the frame at clamped, shifted indices
        rows = (torch.arange(h) + shift[:, :1]).clamp_(0, h - 1)  # (N * V, H)
        cols = (torch.arange(w) + shift[:, 1:]).clamp_(0, w - 1)  # (N * V, W)
        # two contiguous index_selects per view: ~4x faster than one broadcast advanced index on CPU
        flat = images.reshape(n * v, h, w, ch)
        views = zip(flat, rows, cols, strict=True)
        out = torch.stack([x.index_select(0, r).index_select(1, c) for x, r, c in views])
        return out.reshape(images.shape)


class ImageWindowDataset(Dataset):
    """Windows (observation, stacked camera frames, hindsight goal, action chunk); frames read on demand."""

    def __init__(
        self,
        path: str,
        observations: np.ndarray,  # (S, d_o) all episodes concatenated, S = store steps
        actions: np.ndarray,  # (S, d_a)
        goals: np.ndarray | None,  # (S, d_g) the store's goal_key array, or None: no goal in the items
        windows: np.ndarray,  # (W, 2) (start, goal_end) from window_starts
        episode_ends: np.ndarray,  # (E,) exclusive end row of each episode: where frame history stops
        chunk_len: int,
        frame_stack: int = 1,
        goal_sampling: str = "future",
        goal_geometric_p: float = 0.01,
        goal_end_p: float = 0.0,
        frames: np.ndarray | None = None,  # (S, C, H, W, 3) uint8 in memory, or None: read from ``path``
        augment: ImageAugment | None = None,
    ) -> None:
        self.path = path
        self.observations, self.actions, self.goals = observations, actions, goals
        self.windows = windows
        self.chunk_len = chunk_len
        self.goal_args = (goal_sampling, goal_geometric_p, goal_end_p)
        self.augment = augment
        self.history = self._history_rows(windows[:, 0], episode_ends, frame_stack)  # (W, k)
        self.source = StoreRows(path, IMAGE, frames)

    @staticmethod
    def _history_rows(starts: np.ndarray, episode_ends: np.ndarray, k: int) -> np.ndarray:
        """(W, k) store rows t-k+1 .. t of every window start t, clamped at its episode's first row."""
        begins = np.concatenate([[0], episode_ends[:-1]]).astype(np.int64)
        first = begins[np.searchsorted(episode_ends, starts, side="right")]  # (W,)
        rows = starts[:, None] - np.arange(k - 1, -1, -1, dtype=np.int64)[None, :]
        return np.maximum(rows, first[:, None])

    @property
    def frames(self) -> zarr.Array | np.ndarray:
        """(S, C, H, W, 3) frames: the in-memory array, or the zarr array opened by THIS process."""
        return self.source.array

    def __len__(self) -> int:
        return len(self.windows)

    def _read_frames(self, rows: np.ndarray) -> np.ndarray:
        """(R, C, H, W, 3) uint8 frames at the sorted, unique store rows ``rows``, in one read."""
        return self.source.read(rows)

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """The items of a whole batch, with ONE read of the frames they need (the DataLoader calls this);
        ``keys`` as :func:`datamodules.state.split_key` reads them."""
        indices, generators = zip(*map(split_key, keys), strict=True) if keys else ((), ())
        idx = np.asarray(indices, dtype=np.int64)
        windows, history = self.windows[idx], self.history[idx]  # (B, 2), (B, k)
        rows, inverse = np.unique(history, return_inverse=True)
        block = self._read_frames(rows)  # (R, C, H, W, 3)
        images = torch.from_numpy(block[inverse.reshape(history.shape)]).flatten(1, 2)  # (B, k * C, H, W, 3)
        if self.augment is not None:  # (V, H, W, 3) per item: each with its own generator
            images = [self.augment(image, g) for image, g in zip(images, generators, strict=True)]
        items = []
        for (start, end), image, g in zip(windows.tolist(), images, generators, strict=True):
            item = {
                OBS: torch.from_numpy(self.observations[start]),  # (d_o,)
                IMAGE: image,  # (k * C, H, W, 3) uint8
                ACTION: torch.from_numpy(self.actions[start : start + self.chunk_len]),  # (L, d_a)
            }
            if self.goals is not None:
                item[GOAL] = torch.from_numpy(self.goals[sample_goal_index(start, end, *self.goal_args, g)])
            items.append(item)
        return items

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        return self.__getitems__([key])[0]


def image_statistics(
    frames: zarr.Array | np.ndarray, rows: np.ndarray, max_frames: int, seed: int, block: int = 64
) -> dict[str, np.ndarray]:
    """``image_mean`` (3,) and ``image_std`` (3,) float32 per RGB channel, in [0, 1] pixel units, over
    every camera view of the frames at store ``rows``.

    Reads a seeded sample of at most ``max_frames`` frames (the whole array never is), ``block`` frames at
    a time, and reduces them through per-channel histograms of the 256 pixel values: exact, and memory
    bounded by one block whatever the frame size.
    """
    if len(rows) > max_frames:
        rows = np.random.default_rng(seed).choice(rows, max_frames, replace=False)
    rows = np.unique(rows)
    counts = np.zeros((3, 256), dtype=np.int64)
    for i in range(0, len(rows), block):
        part = rows[i : i + block]
        x = np.asarray(frames[part] if isinstance(frames, np.ndarray) else frames.oindex[part])
        for c in range(3):
            counts[c] += np.bincount(x[..., c].ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    total = counts.sum(1)  # (3,)
    mean = counts @ values / total
    var = (counts * (values[None, :] - mean[:, None]) ** 2).sum(1) / total
    return {f"{IMAGE}_mean": mean.astype(np.float32), f"{IMAGE}_std": np.sqrt(var).astype(np.float32)}


class ImageDataModule(WindowDataModule):
    """Demonstration windows with camera frames from an episode store (module docstring)."""

    def setup(self, stage: str | None = None) -> None:
        """Check the store against the config, split episodes, compute statistics, build the datasets."""
        if self.train_set is not None:  # idempotent: the app calls it before Trainer.fit does
            return
        cfg = self.cfg
        store = EpisodeStore.open(cfg.path)
        goal_key = check_image_store(store, cfg)
        obs = store.load(OBS).astype(np.float32)
        act = store.load(ACTION).astype(np.float32)
        goal = store.load(goal_key).astype(np.float32) if goal_key else None
        # without a goal array there are no goal ranges to draw from, whatever goal_sampling says
        split_cfg = cfg if goal_key else dataclasses.replace(cfg, goal_sampling="future")
        train_w, val_w, train_eps = split_windows(store, split_cfg, self.chunk_len, self.seed)
        ends = store.episode_ends
        rows = episode_rows(ends, train_eps)
        frames = store.load(IMAGE) if cfg.load_to_memory else None
        self.stats = {
            f"{OBS}_mean": obs[rows].mean(0),
            f"{OBS}_std": obs[rows].std(0),
            f"{ACTION}_min": act[rows].min(0),
            f"{ACTION}_max": act[rows].max(0),
        }
        if goal is not None:
            self.stats[f"{GOAL}_mean"], self.stats[f"{GOAL}_std"] = goal[rows].mean(0), goal[rows].std(0)
        source = frames if frames is not None else store.array(IMAGE)
        self.stats.update(image_statistics(source, rows, cfg.stats_frames, self.seed))
        augment = ImageAugment(cfg.shift_pad, cfg.frame_stack) if cfg.shift_pad > 0 else None
        args = (str(cfg.path), obs, act, goal)
        kwargs = dict(
            episode_ends=ends,
            chunk_len=self.chunk_len,
            frame_stack=cfg.frame_stack,
            goal_sampling=cfg.goal_sampling,
            goal_geometric_p=cfg.goal_geometric_p,
            goal_end_p=cfg.goal_end_p,
            frames=frames,
        )
        self.train_set = ImageWindowDataset(*args, train_w, augment=augment, **kwargs)
        self.val_set = ImageWindowDataset(*args, val_w, augment=None, **kwargs)
        self.store = store

    @property
    def goal_dim(self) -> int:
        """d_g of the store's goal array; 0 when the goal is drawn in the image."""
        goals = self.train_set.goals
        return 0 if goals is None else int(goals.shape[1])

    @property
    def image_shape(self) -> tuple[int, int, int, int]:
        """(V, H, W, 3) of an item's images, V = cameras * frame_stack."""
        h, w = self.cfg.image_size
        return (self.cfg.views, h, w, 3)

    @property
    def cameras(self) -> list[str]:
        """The store's camera names (attrs 'cameras'), in view order; empty if the store names none."""
        return list(self.store.attrs.get("cameras", []))
