"""ImageDataModule: random-shift augmentation, windows and frame stacks, lazy reads, store checks, stats."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from datamodules.episodes import EpisodeStore, write_episodes
from datamodules.image import (
    DatasetMismatchError,
    ImageAugment,
    ImageDataConfig,
    ImageDataModule,
    image_statistics,
)
from datamodules.state import split_episodes
from modules.nets.keys import ACTION, GOAL, IMAGE, OBS

SIZE = 16  # pixels per side of a synthetic frame
LENGTHS = [14, 22, 9, 30]
ATTRS = {
    "env": "pointmaze-large",
    "cameras": ["front"],
    "image_size": [SIZE, SIZE],
    "goal_key": "achieved_goal",
}


def make_image_episodes(
    lengths: list[int], cameras: int = 1, size: int = SIZE, goal: bool = True, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """Camera episodes whose values encode (episode e, step t, camera c).

    observation[:, :2] = (e, t); action[:, :2] = (e / 10, t); achieved_goal = (e, t, 1000 + e);
    expert_goal changes every 5 steps; every pixel of frame (t, c) has R = 40 e + c and G = t (a random
    shift keeps them), B is noise (so a shift shows, and the pixel statistics are not trivial).
    """
    rng = np.random.default_rng(seed)
    episodes = []
    for e, n in enumerate(lengths):
        t = np.arange(n, dtype=np.float32)
        obs = rng.normal(size=(n, 4)).astype(np.float32)
        obs[:, 0], obs[:, 1] = e, t
        act = rng.uniform(-1, 1, size=(n, 2)).astype(np.float32)
        act[:, 0], act[:, 1] = e / 10.0, t
        image = np.zeros((n, cameras, size, size, 3), dtype=np.uint8)
        image[..., 0] = (40 * e + np.arange(cameras))[None, :, None, None]
        image[..., 1] = np.arange(n)[:, None, None, None]
        image[..., 2] = rng.integers(0, 256, size=(n, cameras, size, size))
        episode = {"observation": obs, "action": act, "image": image}
        if goal:
            goal_rows = np.stack([np.full(n, e), t, np.full(n, 1000.0 + e)], 1)
            episode["achieved_goal"] = goal_rows.astype(np.float32)
            episode["expert_goal"] = np.repeat(np.arange(n) // 5, 2).reshape(n, 2).astype(np.float32)
        episodes.append(episode)
    return episodes


@pytest.fixture
def img_store(tmp_path) -> EpisodeStore:
    return write_episodes(tmp_path / "img.zarr", make_image_episodes(LENGTHS), ATTRS, chunk_rows=16)


@pytest.fixture
def stereo_store(tmp_path) -> EpisodeStore:
    attrs = {**ATTRS, "cameras": ["front", "side"]}
    episodes = make_image_episodes(LENGTHS, cameras=2)
    return write_episodes(tmp_path / "two.zarr", episodes, attrs, chunk_rows=16)


def make_dm(store, chunk_len: int = 4, **kw) -> ImageDataModule:
    kw = {"image_size": [SIZE, SIZE], "batch_size": 4, "shift_pad": 0, **kw}
    dm = ImageDataModule(ImageDataConfig(path=str(store.path), **kw), chunk_len=chunk_len, seed=0)
    dm.setup("fit")
    return dm


def episode_begin(store: EpisodeStore, row: int) -> int:
    return int(store.episode_starts[np.searchsorted(store.episode_ends, row, side="right")])


# ------------------------------------------------------------------------------------------ augmentation
def crop_offsets(view: torch.Tensor, out: torch.Tensor, pad: int) -> list[tuple[int, int]]:
    """Every (dy, dx) at which ``out`` (H, W, 3) is a crop of ``view`` replicate-padded by ``pad``."""
    h, w, _ = view.shape
    padded = F.pad(view.permute(2, 0, 1)[None].float(), (pad,) * 4, mode="replicate")[0].permute(1, 2, 0)
    return [
        (dy, dx)
        for dy in range(2 * pad + 1)
        for dx in range(2 * pad + 1)
        if torch.equal(padded[dy : dy + h, dx : dx + w], out.float())
    ]


def test_shift_keeps_shape_and_dtype_differs_across_calls_and_repeats_under_a_seed():
    images = torch.randint(0, 256, (3, 20, 24, 3), dtype=torch.uint8)
    shift = ImageAugment(pad=4)
    out = shift(images)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert not torch.equal(shift(images), shift(images))  # fresh offsets every call
    torch.manual_seed(7)
    first = shift(images)
    torch.manual_seed(7)
    assert torch.equal(shift(images), first)  # the global RNG under a fixed seed
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(shift(images, g1), shift(images, g2))  # the same generator seed
    assert torch.equal(ImageAugment(pad=0)(images), images)  # pad 0: the identity
    assert torch.equal(images, images.clone())  # the input is left alone


def test_a_shifted_view_is_a_crop_of_the_replicate_padded_view():
    pad = 3
    images = torch.randint(0, 256, (2, 12, 12, 3), dtype=torch.uint8)
    seen = set()
    for _ in range(20):
        out = ImageAugment(pad)(images)
        for v in range(2):
            offsets = crop_offsets(images[v], out[v], pad)
            assert len(offsets) == 1  # exactly one crop window, inside [0, 2 * pad] per axis
            seen.add(offsets[0])
    assert len(seen) > 5  # the offsets vary


def test_stacked_frames_of_one_camera_share_their_shift_and_items_do_not():
    pad = 3
    images = torch.randint(0, 256, (6, 4, 12, 12, 3), dtype=torch.uint8)  # (B, k * C, ...), k = C = 2
    torch.manual_seed(0)
    out = ImageAugment(pad, frame_stack=2)(images)
    assert out.shape == images.shape
    offsets = [[crop_offsets(images[b, v], out[b, v], pad)[0] for v in range(4)] for b in range(6)]
    for per_view in offsets:  # views (frame 0 cam 0, frame 0 cam 1, frame 1 cam 0, frame 1 cam 1)
        assert per_view[0] == per_view[2] and per_view[1] == per_view[3]
    assert len({tuple(per_view) for per_view in offsets}) > 1  # every item draws its own
    with pytest.raises(ValueError, match="frame_stack=2"):
        ImageAugment(pad, frame_stack=2)(images[:, :3])


# ------------------------------------------------------------------------------ windows and frame stacks
@pytest.mark.parametrize("goal_sampling", ["future", "segment"])
def test_windows_stay_inside_episodes_with_the_start_frame_and_a_later_goal(img_store, goal_sampling):
    dm = make_dm(img_store, chunk_len=4, val_fraction=0.0, goal_sampling=goal_sampling)
    frames = img_store.load(IMAGE)
    torch.manual_seed(0)
    assert len(dm.train_set) == sum(n - 4 + 1 for n in LENGTHS)
    for i in range(len(dm.train_set)):
        item = dm.train_set[i]
        start = int(dm.train_set.windows[i, 0])
        e, t = int(item[OBS][0]), int(item[OBS][1])
        assert set(item) == {OBS, IMAGE, ACTION, GOAL}
        assert torch.allclose(item[ACTION][:, 0], torch.full((4,), e / 10.0))  # every action from episode e
        assert torch.equal(item[ACTION][:, 1], torch.arange(t, t + 4, dtype=torch.float32))
        assert item[IMAGE].shape == (1, SIZE, SIZE, 3) and item[IMAGE].dtype == torch.uint8
        assert torch.equal(item[IMAGE], torch.from_numpy(frames[start]))  # the frame at the window's start
        assert item[IMAGE][0, 0, 0, 0] == 40 * e and item[IMAGE][0, 0, 0, 1] == t
        goal = item[GOAL].tolist()  # (e, t_goal, 1000 + e): same episode, t_goal >= t
        assert goal[0] == e and goal[2] == 1000 + e and t <= goal[1] < LENGTHS[e]
        if goal_sampling == "segment":
            assert goal[1] // 5 == t // 5  # inside the expert's current segment


def test_frame_stack_holds_the_previous_frames_of_the_same_episode(stereo_store):
    dm = make_dm(stereo_store, chunk_len=4, val_fraction=0.0, cameras=2, frame_stack=3)
    frames = stereo_store.load(IMAGE)  # (S, 2, H, W, 3)
    ds = dm.train_set
    for i in range(len(ds)):
        image = ds[i][IMAGE]  # (k * C, H, W, 3), frame-major, oldest first
        assert image.shape == (6, SIZE, SIZE, 3)
        start = int(ds.windows[i, 0])
        begin = episode_begin(stereo_store, start)
        e, t = int(ds.observations[start, 0]), start - begin
        for f in range(3):
            row = max(start - 2 + f, begin)  # clamped at the episode's first frame
            for c in range(2):
                view = image[2 * f + c]
                assert torch.equal(view, torch.from_numpy(frames[row, c]))
                assert view[0, 0, 0] == 40 * e + c and view[0, 0, 1] == max(t - 2 + f, 0)
    assert any(ds.windows[i, 0] == episode_begin(stereo_store, int(ds.windows[i, 0])) for i in range(len(ds)))


# ------------------------------------------------------------------------------------ reads and workers
def test_lazy_and_in_memory_reads_give_identical_items(img_store, monkeypatch):
    loaded = []
    original = EpisodeStore.load
    monkeypatch.setattr(EpisodeStore, "load", lambda self, key: loaded.append(key) or original(self, key))
    kw = dict(frame_stack=2, goal_sampling="segment", val_fraction=0.25)
    lazy = make_dm(img_store, **kw)
    assert IMAGE not in loaded and {OBS, ACTION, "achieved_goal"} <= set(loaded)
    memory = make_dm(img_store, load_to_memory=True, **kw)
    assert isinstance(lazy.train_set.frames, zarr.Array) and isinstance(memory.train_set.frames, np.ndarray)
    for name in ("train_set", "val_set"):
        a, b = getattr(lazy, name), getattr(memory, name)
        for indices in ([0, 1, 2, 3], [5, 5, 0, 3], list(range(len(a)))[::-1]):
            torch.manual_seed(1)
            items_a = a.__getitems__(indices)
            torch.manual_seed(1)
            items_b = b.__getitems__(indices)
            for x, y in zip(items_a, items_b, strict=True):
                assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    for key in lazy.stats:
        np.testing.assert_array_equal(lazy.stats[key], memory.stats[key])


def test_a_batch_reads_its_frames_in_one_read_of_unique_sorted_rows(img_store):
    class Recording:  # zarr-like: records every read through oindex
        def __init__(self, array):
            self.array, self.reads = array, []

        @property
        def oindex(self):
            return self

        def __getitem__(self, rows):
            self.reads.append(np.asarray(rows).tolist())
            return self.array.oindex[rows]

    ds = make_dm(img_store, frame_stack=3, val_fraction=0.0).train_set
    ds.source._lazy, ds.source._pid = Recording(img_store.array(IMAGE)), os.getpid()
    indices = [9, 0, 9, 30, 1]
    ds.__getitems__(indices)
    assert len(ds.source._lazy.reads) == 1
    assert ds.source._lazy.reads[0] == sorted(set(ds.history[indices].ravel().tolist()))


def test_loader_with_two_workers_yields_batches_of_the_right_shapes_and_the_dataset_pickles(img_store):
    dm = make_dm(img_store, num_workers=2, val_fraction=0.25, frame_stack=2, shift_pad=2)
    assert (dm.obs_dim, dm.action_dim, dm.goal_dim, dm.image_shape) == (4, 2, 3, (2, SIZE, SIZE, 3))
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        assert loader.num_workers == 2
        for k, batch in zip(range(2), loader, strict=False):
            b = batch[OBS].shape[0]
            assert set(batch) == {OBS, IMAGE, ACTION, GOAL} and (b == 4 or (k > 0 and b <= 4))
            assert batch[IMAGE].shape == (b, 2, SIZE, SIZE, 3) and batch[IMAGE].dtype == torch.uint8
            assert batch[OBS].shape == (b, 4) and batch[GOAL].shape == (b, 3)
            assert batch[ACTION].shape == (b, 4, 2)
            assert batch[OBS].dtype == batch[ACTION].dtype == batch[GOAL].dtype == torch.float32
    val = dm.val_set
    before = val[0]  # opens this process's handle, which must not travel
    copy = pickle.loads(pickle.dumps(val))
    assert copy.source._lazy is None
    assert torch.equal(copy[0][IMAGE], before[IMAGE]) and torch.equal(copy[0][OBS], before[OBS])


def test_augmentation_only_on_the_training_split(img_store):
    dm = make_dm(img_store, val_fraction=0.5, shift_pad=3)
    frames = torch.from_numpy(img_store.load(IMAGE))
    torch.manual_seed(0)
    assert len(dm.val_set) > 0
    for i in range(len(dm.val_set)):
        assert torch.equal(dm.val_set[i][IMAGE], frames[int(dm.val_set.windows[i, 0])])
    shifted = 0
    for i in range(len(dm.train_set)):
        image, stored = dm.train_set[i][IMAGE], frames[int(dm.train_set.windows[i, 0])]
        assert torch.equal(image[..., :2], stored[..., :2])  # still the same frame (R, G are constant)
        shifted += not torch.equal(image, stored)
    assert shifted > 0.8 * len(dm.train_set)


# ---------------------------------------------------------------------------------------- store checks
def _rewrite(tmp_path, name, attrs=ATTRS, drop=(), cameras=1, size=SIZE, image=None):
    episodes = make_image_episodes([12, 12], cameras=cameras, size=size)
    for episode in episodes:
        if image is not None:
            episode["image"] = image(episode["image"])
        for key in drop:
            del episode[key]
    return write_episodes(tmp_path / name, episodes, attrs)


@pytest.mark.parametrize(
    "store_kw, cfg_kw, expected",
    [
        ({"size": 24}, {}, ["'image'", "24x24", f"[{SIZE}, {SIZE}]", "data.image_size=[24, 24]"]),
        ({"cameras": 2}, {}, ["'image'", "has 2 camera views", "data.cameras is 1"]),
        ({"image": lambda x: x.astype(np.float32) / 255}, {}, ["'image'", "float32", "uint8"]),
        ({"image": lambda x: x[:, 0]}, {}, ["'image'", f"({SIZE}, {SIZE}, 3)", f"(1, {SIZE}, {SIZE}, 3)"]),
        ({"drop": ("image",)}, {}, ["'image'", "missing", "'observation'"]),
        ({"drop": ("achieved_goal",)}, {}, ["'achieved_goal'", "missing", "goal_key"]),
        ({"drop": ("expert_goal",)}, {"goal_sampling": "segment"}, ["'expert_goal'", "missing"]),
        ({"attrs": {**ATTRS, "env": "cube-single"}}, {}, ["'env'", "cube-single", "pointmaze-large"]),
        ({"attrs": {**ATTRS, "cameras": ["a", "b"]}}, {}, ["'cameras'", "['a', 'b']", "1 view(s)"]),
    ],
)
def test_mismatched_stores_are_refused_with_a_clear_message(tmp_path, store_kw, cfg_kw, expected):
    store = _rewrite(tmp_path, "bad.zarr", **store_kw)
    cfg = ImageDataConfig(path=str(store.path), image_size=[SIZE, SIZE], env="pointmaze-large", **cfg_kw)
    dm = ImageDataModule(cfg, chunk_len=4)
    with pytest.raises(DatasetMismatchError) as info:
        dm.setup("fit")
    message = str(info.value)
    for text in [str(store.path), *expected]:
        assert text in message, f"{text!r} not in {message!r}"
    assert dm.train_set is None


def test_a_store_without_goal_key_gives_goal_free_items(tmp_path):
    episodes = make_image_episodes(LENGTHS, goal=False)
    attrs = {k: v for k, v in ATTRS.items() if k != "goal_key"}
    store = write_episodes(tmp_path / "maze.zarr", episodes, attrs, chunk_rows=16)
    dm = make_dm(store, goal_sampling="segment", env="pointmaze-large")  # no goals: goal_sampling unused
    assert dm.goal_dim == 0 and dm.cameras == ["front"] and dm.image_shape == (1, SIZE, SIZE, 3)
    assert not any(key.startswith(GOAL) for key in dm.stats)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {OBS, IMAGE, ACTION} and batch[IMAGE].shape == (4, 1, SIZE, SIZE, 3)


def test_properties_and_idempotent_setup(stereo_store):
    dm = make_dm(stereo_store, cameras=2, frame_stack=3, env="pointmaze-large")
    train_set = dm.train_set
    dm.setup("fit")
    assert dm.train_set is train_set
    assert dm.image_shape == (6, SIZE, SIZE, 3) and dm.cfg.views == 6
    assert dm.cameras == ["front", "side"] and (dm.obs_dim, dm.action_dim, dm.goal_dim) == (4, 2, 3)


@pytest.mark.parametrize(
    "field, value",
    [
        ("image_size", [SIZE]),
        ("image_size", [0, SIZE]),
        ("cameras", 0),
        ("frame_stack", 0),
        ("shift_pad", -1),
        ("shift_pad", SIZE),
        ("stats_frames", 0),
        ("load_to_memory", "yes"),
        ("env", ""),
    ],
)
def test_bad_config_values_are_refused_naming_the_field_and_value(field, value):
    with pytest.raises(ValueError) as info:
        ImageDataConfig(path="x.zarr", **{"image_size": [SIZE, SIZE], field: value})
    assert f"data.{field}" in str(info.value) and repr(value) in str(info.value)


# ------------------------------------------------------------------------------------------- statistics
def pixel_stats(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = frames.reshape(-1, 3).astype(np.float64) / 255.0
    return x.mean(0), x.std(0)


def test_statistics_come_from_training_episodes_only(tmp_path):
    episodes = make_image_episodes(LENGTHS)
    train, val = split_episodes(len(LENGTHS), 0.25, seed=0)
    for e in val:  # validation episodes far off in every array: a leak shows in every statistic
        for key in ("observation", "action", "achieved_goal"):
            episodes[e][key] = episodes[e][key] + 500.0
        episodes[e]["image"][:] = 255
    store = write_episodes(tmp_path / "s.zarr", episodes, ATTRS, chunk_rows=16)
    dm = make_dm(store, val_fraction=0.25, stats_frames=10_000)  # every training frame
    cat = {k: np.concatenate([episodes[e][k] for e in train]) for k in episodes[0]}
    np.testing.assert_allclose(dm.stats[f"{OBS}_mean"], cat["observation"].mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dm.stats[f"{OBS}_std"], cat["observation"].std(0), rtol=1e-4)
    np.testing.assert_allclose(dm.stats[f"{GOAL}_mean"], cat["achieved_goal"].mean(0), rtol=1e-5)
    np.testing.assert_allclose(dm.stats[f"{GOAL}_std"], cat["achieved_goal"].std(0), rtol=1e-5)
    np.testing.assert_allclose(dm.stats[f"{ACTION}_max"], cat["action"].max(0))
    np.testing.assert_allclose(dm.stats[f"{ACTION}_min"], cat["action"].min(0))
    mean, std = pixel_stats(cat["image"])
    assert dm.stats[f"{IMAGE}_mean"].shape == (3,) and dm.stats[f"{IMAGE}_mean"].dtype == np.float32
    np.testing.assert_allclose(dm.stats[f"{IMAGE}_mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(dm.stats[f"{IMAGE}_std"], std, rtol=1e-5)
    assert np.all(dm.stats[f"{IMAGE}_mean"] < 0.9)  # the all-white validation frames stayed out


def test_image_statistics_of_a_seeded_sample_of_the_training_frames(img_store):
    dm = make_dm(img_store, val_fraction=0.25, stats_frames=5)
    train, _ = split_episodes(len(LENGTHS), 0.25, seed=0)
    starts, ends = img_store.episode_starts, img_store.episode_ends
    rows = np.concatenate([np.arange(starts[e], ends[e]) for e in train])
    sample = np.random.default_rng(0).choice(rows, 5, replace=False)
    mean, std = pixel_stats(img_store.load(IMAGE)[sample])
    np.testing.assert_allclose(dm.stats[f"{IMAGE}_mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(dm.stats[f"{IMAGE}_std"], std, rtol=1e-5)


def test_image_statistics_read_a_bounded_sample_of_the_given_rows():
    class Recording:  # zarr-like: records the rows read through oindex
        def __init__(self, data):
            self.data, self.read = data, []

        @property
        def oindex(self):
            return self

        def __getitem__(self, rows):
            self.read.extend(np.asarray(rows).tolist())
            return self.data[rows]

    frames = Recording(np.random.default_rng(0).integers(0, 256, size=(300, 2, 8, 8, 3), dtype=np.uint8))
    rows = np.arange(50, 250)
    stats = image_statistics(frames, rows, max_frames=40, seed=0, block=16)
    assert len(frames.read) == len(set(frames.read)) == 40 and set(frames.read) <= set(rows.tolist())
    mean, std = pixel_stats(frames.data[frames.read])
    np.testing.assert_allclose(stats[f"{IMAGE}_mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(stats[f"{IMAGE}_std"], std, rtol=1e-5)
