"""StateDataModule: windows, hindsight goals, splits and normalization statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.episodes import write_episodes
from datamodules.state import (
    StateDataConfig,
    StateDataModule,
    segment_ends,
    split_episodes,
    window_starts,
)
from modules.nets.keys import ACTION, GOAL, OBS
from tests.conftest import make_episodes


def make_dm(store, chunk_len=8, **kw) -> StateDataModule:
    cfg = StateDataConfig(path=str(store.path) if hasattr(store, "path") else store, batch_size=16, **kw)
    dm = StateDataModule(cfg, chunk_len=chunk_len, seed=0)
    dm.setup("fit")
    return dm


def test_window_starts_stay_inside_their_episode():
    ends = np.array([10, 13, 30])
    w = window_starts(ends, np.array([0, 1, 2]), chunk_len=4)
    begins = np.array([0, 10, 13])
    for start, end in w:
        e = np.searchsorted(ends, start, side="right")
        assert begins[e] <= start and start + 4 <= end == ends[e]
    # episode 1 has 3 steps: no window of 4 fits; episodes 0 and 2 give 7 and 14
    assert len(w) == 7 + 14


@pytest.mark.parametrize("chunk_len", [1, 8, 12])
def test_windows_never_cross_episodes_and_goals_come_from_the_same_future(synthetic_store, chunk_len):
    dm = make_dm(synthetic_store, chunk_len=chunk_len, val_fraction=0.0)
    torch.manual_seed(0)
    for i in range(len(dm.train_set)):
        item = dm.train_set[i]
        episode = item[OBS][0].item()
        step = item[OBS][1].item()
        # every action of the window comes from the observation's episode
        assert torch.allclose(item[ACTION][:, 0], torch.full((chunk_len,), episode / 10.0))
        assert item[ACTION].shape == (chunk_len, 2)
        # the goal is the goal-space projection (dims 0, 1) of a FUTURE observation of the same episode
        assert item[GOAL].shape == (2,)
        assert item[GOAL][0].item() == episode
        assert item[GOAL][1].item() >= step


def test_geometric_goals_are_near(synthetic_store):
    dm = make_dm(
        synthetic_store, chunk_len=4, val_fraction=0.0, goal_sampling="geometric", goal_geometric_p=0.5
    )
    torch.manual_seed(0)
    offsets = [
        dm.train_set[i][GOAL][1].item() - dm.train_set[i][OBS][1].item() for i in range(len(dm.train_set))
    ]
    assert min(offsets) >= 0 and np.mean(offsets) < 3  # mean offset of Geometric(0.5) - 1 is 1


def test_segment_ends_split_at_goal_changes_and_episode_ends():
    key = np.array([[0, 0], [0, 0], [1, 1], [1, 1], [1, 1], [2, 2], [2, 2]], dtype=np.float32)
    # two episodes: steps 0..3 and 4..6; the goal (1, 1) spans the episode boundary but segments do not
    np.testing.assert_array_equal(segment_ends(np.array([4, 7]), key), [2, 2, 4, 4, 5, 7, 7])


def test_segment_goals_stay_inside_the_current_segment(tmp_path):
    from datamodules.episodes import write_episodes

    episodes = make_episodes([30, 20], obs_dim=2)
    for ep in episodes:  # the expert switches goal every 7 steps
        ep["expert_goal"] = np.repeat(np.arange(len(ep["action"])) // 7, 2).reshape(-1, 2).astype(np.float32)
    store = write_episodes(tmp_path / "seg.zarr", episodes, {"goal_indices": [0, 1]})
    dm = make_dm(store, chunk_len=4, val_fraction=0.0, goal_sampling="segment")
    torch.manual_seed(0)
    for _ in range(3):
        for i in range(len(dm.train_set)):
            item = dm.train_set[i]
            step, goal_step = item[OBS][1].item(), item[GOAL][1].item()
            assert item[GOAL][0] == item[OBS][0] and step // 7 == goal_step // 7 and goal_step >= step


def test_goal_end_p_one_always_picks_the_segments_last_state(tmp_path):
    from datamodules.episodes import write_episodes

    episodes = make_episodes([30, 20], obs_dim=2)
    for ep in episodes:  # the expert switches goal every 7 steps
        ep["expert_goal"] = np.repeat(np.arange(len(ep["action"])) // 7, 2).reshape(-1, 2).astype(np.float32)
    store = write_episodes(tmp_path / "seg.zarr", episodes, {"goal_indices": [0, 1]})
    dm = make_dm(store, chunk_len=4, val_fraction=0.0, goal_sampling="segment", goal_end_p=1.0)
    for i in range(len(dm.train_set)):
        item = dm.train_set[i]
        step, length = int(item[OBS][1]), 30 if item[OBS][0] == 0 else 20
        assert item[GOAL][1] == min(step // 7 * 7 + 6, length - 1)  # last step of the segment


def test_segment_sampling_without_expert_goals_is_refused(synthetic_store):
    with pytest.raises(ValueError, match="expert_goal"):
        make_dm(synthetic_store, goal_sampling="segment")


def test_split_is_by_episode_and_disjoint(synthetic_store):
    train, val = split_episodes(6, 0.34, seed=0)
    assert len(val) == 2 and set(train).isdisjoint(val) and len(train) + len(val) == 6
    dm = make_dm(synthetic_store, chunk_len=4, val_fraction=0.34)
    train_eps = {dm.train_set[i][OBS][0].item() for i in range(len(dm.train_set))}
    val_eps = {dm.val_set[i][OBS][0].item() for i in range(len(dm.val_set))}
    assert train_eps.isdisjoint(val_eps) and len(val_eps) == 2


def test_statistics_come_from_training_episodes_only(synthetic_store):
    dm = make_dm(synthetic_store, chunk_len=4, val_fraction=0.34)
    train, _ = split_episodes(synthetic_store.num_episodes, 0.34, seed=0)
    obs = np.concatenate([synthetic_store.episode(int(e))["observation"] for e in train])
    act = np.concatenate([synthetic_store.episode(int(e))["action"] for e in train])
    np.testing.assert_allclose(dm.stats["observation_mean"], obs.mean(0), rtol=1e-5)
    np.testing.assert_allclose(dm.stats["observation_std"], obs.std(0), rtol=1e-5)
    np.testing.assert_allclose(dm.stats["goal_mean"], obs[:, :2].mean(0), rtol=1e-5)
    np.testing.assert_allclose(dm.stats["action_min"], act.min(0))
    np.testing.assert_allclose(dm.stats["action_max"], act.max(0))


def test_normalization_round_trip_through_the_policy(synthetic_store):
    from modules.nets.policy import CSPPolicy, PolicyConfig

    dm = make_dm(synthetic_store, chunk_len=4)
    policy = CSPPolicy(
        PolicyConfig(chunk_len=4, width=32, depth=1, heads=2), dm.obs_dim, dm.action_dim, dm.goal_dim
    )
    policy.set_normalization(dm.stats)
    batch = next(iter(dm.train_dataloader()))
    a_n = policy.action_norm.normalize(batch[ACTION])
    assert a_n.min() >= -1 - 1e-6 and a_n.max() <= 1 + 1e-6
    torch.testing.assert_close(policy.action_norm.unnormalize(a_n), batch[ACTION])
    # the statistics are buffers: they are in the state dict that checkpoints carry
    assert any("action" in k for k in policy.state_dict())


def test_worker_processes_deliver_batches(synthetic_store):
    dm = make_dm(synthetic_store, chunk_len=4, num_workers=1)
    batch = next(iter(dm.train_dataloader()))
    assert batch[OBS].shape == (16, 3) and batch[GOAL].shape == (16, 2) and batch[ACTION].shape == (16, 4, 2)


def test_chunk_longer_than_every_episode_is_refused(synthetic_store):
    with pytest.raises(ValueError, match="chunk_len"):
        make_dm(synthetic_store, chunk_len=1000)


def test_bad_config_values_are_refused():
    with pytest.raises(ValueError, match="goal_sampling"):
        StateDataConfig(path="x", goal_sampling="random")
    with pytest.raises(ValueError, match="val_fraction"):
        StateDataConfig(path="x", val_fraction=1.5)


def test_episodes_shorter_than_a_window_are_left_out_with_one_warning(tmp_path, capsys):
    store = write_episodes(tmp_path / "s.zarr", make_episodes([40, 3, 25, 2, 3]), {"goal_indices": [0, 1]})
    dm = make_dm(store, chunk_len=4, val_fraction=0.0)
    assert len(dm.train_set) == (40 - 3) + (25 - 3)
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        f"[tmrl] warning: {store.path}: 3 of 5 episodes left out: their lengths [2, 3] are shorter than a "
        "window of policy.chunk_len=4 actions"
    )
    make_dm(store, chunk_len=2, val_fraction=0.0)
    assert capsys.readouterr().err == ""  # every episode holds a window of 2
