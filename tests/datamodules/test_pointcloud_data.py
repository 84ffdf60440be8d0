"""PointCloudDataModule: windows, hindsight goals, statistics, lazy reads, augmentation, store checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from datamodules.episodes import EpisodeStore, write_episodes
from datamodules.pointcloud import (
    CloudAugment,
    DatasetMismatchError,
    PointCloudDataConfig,
    PointCloudDataModule,
    cloud_statistics,
)
from datamodules.state import split_episodes
from modules.nets.keys import ACTION, GOAL, OBS, POINTCLOUD

N = 16  # points per synthetic cloud
LENGTHS = [40, 25, 60, 12, 33, 50]


def make_pc_episodes(lengths: list[int], num_points: int = N, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Cube-like episodes whose values encode (episode e, step t).

    observation[:, :2] = (e, t); action[:, :2] = (e / 10, t); achieved_goal = (e, t, 1000 + e) (NOT part of
    the observation); expert_goal changes every 7 steps; every point of cloud t has z = 1000 e + t.
    """
    rng = np.random.default_rng(seed)
    episodes = []
    for e, n in enumerate(lengths):
        t = np.arange(n, dtype=np.float32)
        obs = rng.normal(size=(n, 19)).astype(np.float32)
        obs[:, 0], obs[:, 1] = e, t
        act = rng.uniform(-1, 1, size=(n, 5)).astype(np.float32)
        act[:, 0], act[:, 1] = e / 10.0, t
        cloud = rng.uniform(0.2, 0.6, size=(n, num_points, 3)).astype(np.float32)
        cloud[:, :, 2] = 1000.0 * e + t[:, None]
        episodes.append(
            {
                "observation": obs,
                "action": act,
                "pointcloud": cloud,
                "achieved_goal": np.stack([np.full(n, e), t, np.full(n, 1000.0 + e)], 1).astype(np.float32),
                "expert_goal": np.repeat(np.arange(n) // 7, 3).reshape(n, 3).astype(np.float32),
            }
        )
    return episodes


ATTRS = {
    "env": "cube-single",
    "goal_key": "achieved_goal",
    "crop_low": [0.2, -0.4, 0.0],
    "crop_high": [0.6, 0.4, 0.5],
}


@pytest.fixture
def pc_store(tmp_path) -> EpisodeStore:
    return write_episodes(tmp_path / "pc.zarr", make_pc_episodes(LENGTHS), ATTRS, chunk_rows=16)


def make_dm(store, chunk_len: int = 8, **kw) -> PointCloudDataModule:
    kw = {"num_points": N, "batch_size": 8, "jitter_std": 0.0, "rotate_deg": 0.0, **kw}
    dm = PointCloudDataModule(PointCloudDataConfig(path=str(store.path), **kw), chunk_len=chunk_len, seed=0)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("goal_sampling", ["future", "segment"])
def test_windows_stay_inside_episodes_and_goals_come_from_a_later_step(pc_store, goal_sampling):
    dm = make_dm(pc_store, chunk_len=8, val_fraction=0.0, goal_sampling=goal_sampling)
    torch.manual_seed(0)
    assert len(dm.train_set) == sum(n - 8 + 1 for n in LENGTHS)
    for i in range(len(dm.train_set)):
        item = dm.train_set[i]
        e, t = item[OBS][0].item(), item[OBS][1].item()
        assert item[ACTION].shape == (8, 5)
        assert torch.allclose(item[ACTION][:, 0], torch.full((8,), e / 10.0))  # every action from episode e
        assert torch.equal(item[ACTION][:, 1], torch.arange(t, t + 8, dtype=torch.float32))
        assert torch.all(item[POINTCLOUD][:, 2] == 1000 * e + t)  # the cloud of the observation's step
        goal = item[GOAL].tolist()  # (e, t_goal, 1000 + e): from achieved_goal, same episode, t_goal >= t
        assert goal[0] == e and goal[2] == 1000 + e and t <= goal[1] < LENGTHS[int(e)]
        if goal_sampling == "segment":
            assert goal[1] // 7 == t // 7  # inside the expert's current segment


def test_statistics_come_from_training_episodes_only(tmp_path):
    episodes = make_pc_episodes(LENGTHS)
    train, val = split_episodes(len(LENGTHS), 0.34, seed=0)
    for e in val:  # validation episodes far off in every array: any leak shows in every statistic
        for key in ("observation", "action", "achieved_goal", "pointcloud"):
            episodes[e][key] = episodes[e][key] + 500.0
    store = write_episodes(tmp_path / "s.zarr", episodes, ATTRS)
    dm = make_dm(store, val_fraction=0.34, stats_frames=10_000)  # every training frame
    cat = {
        k: np.concatenate([episodes[e][k] for e in train]) for k in ("observation", "action", "achieved_goal")
    }
    np.testing.assert_allclose(dm.stats[f"{OBS}_mean"], cat["observation"].mean(0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dm.stats[f"{OBS}_std"], cat["observation"].std(0), rtol=1e-4)
    np.testing.assert_allclose(dm.stats[f"{GOAL}_mean"], cat["achieved_goal"].mean(0), rtol=1e-5)
    np.testing.assert_allclose(dm.stats[f"{ACTION}_max"], cat["action"].max(0))
    np.testing.assert_allclose(dm.stats[f"{ACTION}_min"], cat["action"].min(0))
    points = np.concatenate([episodes[e]["pointcloud"] for e in train]).reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(dm.stats[f"{POINTCLOUD}_center"], points.mean(0), rtol=1e-5)
    scale = np.sqrt(np.mean((points - points.mean(0)) ** 2))
    np.testing.assert_allclose(dm.stats[f"{POINTCLOUD}_scale"], [scale] * 3, rtol=1e-5)  # isotropic


def test_cloud_statistics_read_a_bounded_sample_of_the_given_rows():
    class Recording:  # zarr-like: records the rows read through oindex
        def __init__(self, data):
            self.data, self.read = data, []

        @property
        def oindex(self):
            return self

        def __getitem__(self, rows):
            self.read.extend(np.asarray(rows).tolist())
            return self.data[rows]

    clouds = Recording(np.random.default_rng(0).normal(size=(500, N, 3)).astype(np.float32))
    rows = np.arange(100, 400)
    stats = cloud_statistics(clouds, rows, max_frames=20, seed=0)
    assert len(clouds.read) == 20 and set(clouds.read) <= set(rows.tolist())
    assert np.all(np.isfinite(stats[f"{POINTCLOUD}_center"])) and stats[f"{POINTCLOUD}_scale"][0] > 0


def test_clouds_are_read_lazily_not_loaded(pc_store, monkeypatch):
    loaded = []
    original = EpisodeStore.load
    monkeypatch.setattr(EpisodeStore, "load", lambda self, key: loaded.append(key) or original(self, key))
    dm = make_dm(pc_store)
    assert POINTCLOUD not in loaded and {OBS, ACTION, "achieved_goal"} <= set(loaded)
    assert isinstance(dm.train_set.clouds, zarr.Array) and isinstance(dm.val_set.clouds, zarr.Array)
    assert dm.train_set[0][POINTCLOUD].shape == (N, 3)
    # the opt-in: load_to_memory reads them once into a numpy array
    assert isinstance(make_dm(pc_store, load_to_memory=True).train_set.clouds, np.ndarray)


def test_rotation_preserves_pairwise_distances_and_height():
    cloud = torch.rand(200, 3)
    torch.manual_seed(0)
    out = CloudAugment(jitter_std=0.0, rotate_deg=30.0, center_xy=(0.4, 0.0))(cloud)
    assert not torch.allclose(out, cloud)  # it did rotate

    def distances(x):  # (N, N) exact pairwise distances (cdist's matmul shortcut is off by ~1e-3)
        return (x[:, None] - x[None]).norm(dim=-1)

    torch.testing.assert_close(distances(out), distances(cloud), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 2], cloud[:, 2])  # about the vertical axis: z unchanged
    on_axis = torch.tensor([[0.4, 0.0, 0.3]])
    torch.testing.assert_close(CloudAugment(0.0, 30.0, (0.4, 0.0))(on_axis), on_axis)  # through the centre
    angles = []
    for _ in range(50):
        xy = CloudAugment(0.0, 10.0, (0.0, 0.0))(torch.tensor([[1.0, 0.0, 0.0]]))[0]
        angles.append(float(torch.rad2deg(torch.atan2(xy[1], xy[0]))))
    assert max(np.abs(angles)) <= 10.0 + 1e-4 and np.std(angles) > 2.0  # uniform in [-10, 10] degrees


def test_jitter_has_the_configured_std():
    cloud = torch.rand(20_000, 3)
    torch.manual_seed(0)
    noise = CloudAugment(jitter_std=0.01, rotate_deg=0.0, center_xy=(0.0, 0.0))(cloud) - cloud
    assert abs(noise.std().item() - 0.01) < 0.0003 and abs(noise.mean().item()) < 0.0003


def test_augmentation_only_on_the_training_split(pc_store):
    dm = make_dm(pc_store, val_fraction=0.5, jitter_std=0.01, rotate_deg=5.0)
    store_clouds = pc_store.load(POINTCLOUD)
    torch.manual_seed(0)
    for dataset, augmented in ((dm.val_set, False), (dm.train_set, True)):
        assert len(dataset) > 0
        for i in range(0, len(dataset), 7):
            start = int(dataset.windows[i, 0])
            same = torch.equal(dataset[i][POINTCLOUD], torch.from_numpy(store_clouds[start]))
            assert same != augmented


def _rewrite(tmp_path, name, attrs=ATTRS, drop=(), num_points=N):
    episodes = [
        {k: v for k, v in ep.items() if k not in drop} for ep in make_pc_episodes([20, 20], num_points)
    ]
    return write_episodes(tmp_path / name, episodes, attrs)


@pytest.mark.parametrize(
    "store_kw, cfg_kw, expected",
    [
        ({"num_points": 24}, {}, ["pointcloud", "24", f"{N}"]),
        ({"drop": ("pointcloud",)}, {}, ["'pointcloud'", "missing", "achieved_goal"]),
        ({"drop": ("achieved_goal",)}, {}, ["'achieved_goal'", "missing"]),
        ({"drop": ("expert_goal",)}, {"goal_sampling": "segment"}, ["'expert_goal'", "missing"]),
        (
            {"attrs": {**ATTRS, "env": "pointmaze-large"}},
            {"env": "cube-single"},
            ["'env'", "pointmaze-large", "cube-single"],
        ),
        ({"attrs": {"env": "cube-single"}}, {}, ["'goal_key'", "missing"]),
        (  # drawn by the robot's collision shapes before the arena's walls were hidden: the cube unseen
            {"attrs": {**ATTRS, "robot_geometry": "collision"}},
            {},
            ["'arena_walls'", "None", "'hidden'", "hid the table and the cube", "regenerate"],
        ),
    ],
)
def test_mismatched_stores_are_refused_with_a_clear_message(tmp_path, store_kw, cfg_kw, expected):
    store = _rewrite(tmp_path, "bad.zarr", **store_kw)
    dm = PointCloudDataModule(PointCloudDataConfig(path=str(store.path), num_points=N, **cfg_kw), chunk_len=4)
    with pytest.raises(DatasetMismatchError) as info:
        dm.setup("fit")
    message = str(info.value)
    for text in [str(store.path), *expected]:
        assert text in message, f"{text!r} not in {message!r}"
    assert dm.train_set is None


def test_matching_env_is_accepted(pc_store):
    assert make_dm(pc_store, env="cube-single").goal_dim == 3


def test_loader_with_a_worker_process_yields_batches_of_the_right_shapes(pc_store):
    dm = make_dm(pc_store, chunk_len=4, num_workers=1, val_fraction=0.2, jitter_std=0.002, rotate_deg=5.0)
    assert (dm.obs_dim, dm.action_dim, dm.goal_dim, dm.num_points) == (19, 5, 3, N)
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        assert loader.num_workers == 1
        for k, batch in zip(range(2), loader, strict=False):
            assert set(batch) == {OBS, GOAL, POINTCLOUD, ACTION}
            b = batch[OBS].shape[0]
            assert b == 8 or (k > 0 and b <= 8)
            assert batch[OBS].shape == (b, 19) and batch[GOAL].shape == (b, 3)
            assert batch[POINTCLOUD].shape == (b, N, 3) and batch[ACTION].shape == (b, 4, 5)
            assert batch[POINTCLOUD].dtype == torch.float32


def test_tmrl_demos_cube_smoke(tmp_path):
    """The real renderer: 2 episodes x 30 steps through the `tmrl demos` entry point, then loaded."""
    from app.cli import main

    out = tmp_path / "cube.zarr"
    argv = ["demos", "--env", "cube-single", "--episodes", "2", "--episode-length", "30", "--out", str(out)]
    assert main([*argv, "--robot-geometry", "none", "--num-points", "64", "--seed", "3"]) == 0
    store = EpisodeStore.open(out)
    attrs = store.attrs
    assert (store.num_episodes, store.num_steps) == (2, 60)
    assert (
        attrs["env"] == "cube-single" and attrs["goal_key"] == "achieved_goal" and attrs["num_points"] == 64
    )
    assert (attrs["obs_dim"], attrs["action_dim"], attrs["chunk_rows"]) == (19, 5, 64)
    assert attrs["cameras"] and attrs["variation"] == "train" and attrs["crop_low"] == [0.225, -0.375, 0.005]
    assert attrs["arena_walls"] == "hidden"  # the sensor does not draw the arena's collision walls
    assert store.array(POINTCLOUD).shape == (60, 64, 3)
    dm = make_dm(store, chunk_len=4, num_points=64, env="cube-single", val_fraction=0.5)
    item = dm.val_set[0]
    start = int(dm.val_set.windows[0, 0])
    assert item[POINTCLOUD].shape == (64, 3) and torch.equal(
        item[OBS], torch.from_numpy(store.load(OBS)[start])
    )
    clouds = store.load(POINTCLOUD)  # inside the crop box
    assert np.all(clouds >= np.array(attrs["crop_low"]) - 1e-6) and np.all(
        clouds <= np.array(attrs["crop_high"]) + 1e-6
    )


def test_stats_and_batches_fit_the_pointcloud_policy(pc_store):
    """The policy carries the datamodule's statistics and takes its batches (keys, shapes, dtypes)."""
    from modules.nets.policy import CSPPolicy, PolicyConfig

    dm = make_dm(pc_store, chunk_len=4, jitter_std=0.002, rotate_deg=5.0)
    cfg = PolicyConfig(
        context_mode="pointcloud", chunk_len=4, width=32, depth=1, heads=2, num_points=N, pointnet_widths=[16]
    )
    policy = CSPPolicy(cfg, obs_dim=dm.obs_dim, action_dim=dm.action_dim, goal_dim=dm.goal_dim)
    policy.set_normalization(dm.stats)
    center = torch.from_numpy(dm.stats[f"{POINTCLOUD}_center"])
    torch.testing.assert_close(policy.context.cloud_norm.center, center)
    batch = next(iter(dm.train_dataloader()))
    loss = policy.loss(batch, sigma=torch.rand(8))
    assert loss.ndim == 0 and torch.isfinite(loss)
