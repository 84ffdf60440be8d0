"""Tests for modules/tmrl/offline.py (demonstrations as ChunkEnv-like transitions, and RLPD batch mixing)
and app/offline_data.py (reading them from an episode store)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torchrl.data import LazyTensorStorage, ReplayBuffer

from app.envs.decoders import RawDecoder
from app.offline_data import read_demo_arrays
from datamodules.episodes import EpisodeStore, write_episodes
from modules.tmrl.actor import ChunkActor, HeadSpec
from modules.tmrl.critic import CriticEnsemble
from modules.tmrl.loss import TMRLLoss, make_optimizers, update
from modules.tmrl.offline import demo_chunks, mixed_sample

H = 4
GOAL_XY = np.array([6.0, 0.0], np.float32)
TOL = 0.5
LENGTHS = [
    12,
    9,
    8,
]  # episode 0 passes the goal mid-window, 1 never gets near, 2 reaches it in its last window


def line_episodes() -> list[dict]:
    """Straight-line episodes: obs = [x, y, episode id, global row], action = (row, -row) / 100.

    Episode 0: x = t, reaches x = 6 (the goal) at row 6. Episode 1: x = 100 + t, far away.
    Episode 2: x = t, 8 steps, so its second window (rows 4..7) is the episode's last and succeeds at row 6.
    """
    episodes, row = [], 0
    for e, n in enumerate(LENGTHS):
        t = np.arange(n, dtype=np.float32)
        x = t + (100.0 if e == 1 else 0.0)
        rows = np.arange(row, row + n, dtype=np.float32)
        obs = np.stack([x, np.zeros(n, np.float32), np.full(n, e, np.float32), rows], axis=1)
        act = np.stack([rows / 100, -rows / 100], axis=1).astype(np.float32)
        episodes.append({"observation": obs, "action": act})
        row += n
    episodes[1]["action"][0] = [1.5, -2.0]  # out of the box: must come back clipped
    return episodes


@pytest.fixture
def line_store(tmp_path):
    return write_episodes(tmp_path / "line.zarr", line_episodes(), {"goal_indices": [0, 1]})


def store_chunks(store: EpisodeStore, *args, **kwargs) -> TensorDict:
    """``demo_chunks`` of ``store``'s demonstrations, read as ``build_pipeline`` reads them."""
    return demo_chunks(*read_demo_arrays(store), *args, source=f"episode store {store.path}", **kwargs)


@pytest.fixture
def chunks(line_store) -> TensorDict:
    return store_chunks(line_store, GOAL_XY, TOL, H, success_reward=2.5)


def by_start(td: TensorDict) -> dict[int, int]:
    """Global row of each transition's first step -> its index in ``td``."""
    return {int(r): i for i, r in enumerate(td["observation"][:, 3].tolist())}


def test_keys_dtypes_and_shapes_match_chunk_env(chunks):
    m = chunks.batch_size[0]
    assert chunks["observation"].shape == (m, 4) and chunks["observation"].dtype == torch.float32
    assert chunks["goal"].shape == (m, 2) and chunks["goal"].dtype == torch.float32
    assert chunks["action"].shape == (m, H * 2) and chunks["action"].dtype == torch.float32
    nxt = chunks["next"]
    assert set(nxt.keys()) == {
        "observation",
        "goal",
        "reward",
        "terminated",
        "truncated",
        "done",
        "success",
        "env_steps",
    }
    assert nxt["reward"].shape == (m, 1) and nxt["reward"].dtype == torch.float32
    for flag in ("terminated", "truncated", "done", "success"):
        assert nxt[flag].shape == (m, 1) and nxt[flag].dtype == torch.bool
    assert nxt["env_steps"].shape == (m, 1) and nxt["env_steps"].dtype == torch.int64
    # the target goal everywhere, not the demo's own
    assert torch.equal(chunks["goal"], torch.tensor(GOAL_XY).expand(m, 2))
    assert torch.equal(nxt["goal"], chunks["goal"])


def test_windows_are_non_overlapping_and_drop_the_unfinishable_last_one(chunks):
    # ep0 rows 0..11: windows 0, 4 (8 ends at the episode end, no success: dropped);
    # ep1 rows 12..20: windows 12, 16 (20 does not fit); ep2 rows 21..28: windows 21, 25 (25 kept: success)
    assert sorted(by_start(chunks)) == [0, 4, 12, 16, 21, 25]


def test_success_stops_the_transition_early(chunks):
    for start, success_row in ((4, 6), (25, 27)):  # window 25 = episode 2's last window, kept for success
        i = by_start(chunks)[start]
        nxt = chunks["next"][i]
        assert nxt["env_steps"].item() == success_row - start  # = k + 1 for success after action k = 1
        assert nxt["observation"][3].item() == success_row  # the state that reached the goal
        assert nxt["reward"].item() == 2.5
        assert nxt["terminated"].item() and nxt["done"].item() and nxt["success"].item()
        assert not nxt["truncated"].item()
        # the full chunk is kept, including the two actions that were never executed
        rows = torch.arange(start, start + H, dtype=torch.float32)
        assert torch.allclose(chunks["action"][i].reshape(H, 2)[:, 0], rows / 100)


def test_non_success_transitions_run_the_whole_chunk(chunks):
    for start in (0, 12, 16):
        i = by_start(chunks)[start]
        nxt = chunks["next"][i]
        assert nxt["env_steps"].item() == H
        assert nxt["observation"][3].item() == start + H
        assert nxt["reward"].item() == 0.0
        assert not (nxt["terminated"].item() or nxt["done"].item() or nxt["success"].item())
        assert not nxt["truncated"].item()


def test_raw_decoder_reads_back_the_demo_actions(chunks, line_store):
    act = torch.from_numpy(line_store.load("action")).clamp(-1, 1)  # (N, 2)
    decoded = RawDecoder(H, 2)(chunks["action"], {})  # (M, H, 2): the raw decoder reads no observation
    starts = chunks["observation"][:, 3].long()  # (M,)
    expected = act[starts[:, None] + torch.arange(H)]  # (M, H, 2)
    assert torch.equal(decoded, expected)
    assert torch.equal(decoded[by_start(chunks)[12], 0], torch.tensor([1.0, -1.0]))  # clipped


def test_stride_one_never_crosses_an_episode_end(line_store):
    td = store_chunks(line_store, GOAL_XY, TOL, H, stride=1)
    starts = td["observation"][:, 3].long()
    episode = td["observation"][:, 2]
    assert torch.equal(td["next", "observation"][:, 2], episode)  # the next state is in the same episode
    ends = torch.tensor(np.cumsum(LENGTHS))[episode.long()]
    assert bool((starts + H <= ends).all())  # every executed action is in the episode
    # ep0: starts 0..7 (8 has no next state and no success); ep1: 12..16; ep2: 21..24 plus 25 (success)
    assert sorted(starts.tolist()) == [*range(8), *range(12, 17), *range(21, 26)]
    # every stride-1 window of ep0 whose reached states include x = 6 succeeds at it
    success_starts = sorted(starts[td["next", "success"][:, 0]].tolist())
    assert success_starts == [2, 3, 4, 5, 23, 24, 25]


def test_errors_name_the_problem(tmp_path, line_store):
    episodes = line_episodes()
    no_action = write_episodes(tmp_path / "a.zarr", [{"observation": episodes[0]["observation"]}])
    with pytest.raises(KeyError, match=r"a\.zarr.*\['action'\]"):
        read_demo_arrays(no_action)
    no_goal_idx = write_episodes(tmp_path / "g.zarr", episodes)
    with pytest.raises(KeyError, match=r"g\.zarr.*goal_indices"):
        read_demo_arrays(no_goal_idx)
    with pytest.raises(ValueError, match=r"goal has shape \(3,\); expected \(2,\).*line\.zarr"):
        store_chunks(line_store, np.zeros(3), TOL, H)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="exec_horizon"):
            store_chunks(line_store, GOAL_XY, TOL, bad)
    with pytest.raises(ValueError, match="stride"):
        store_chunks(line_store, GOAL_XY, TOL, H, stride=0)
    with pytest.raises(ValueError, match="goal_tol"):
        store_chunks(line_store, GOAL_XY, -1.0, H)
    with pytest.raises(ValueError, match=r"no window.*3 episodes of episode store .*line\.zarr"):
        store_chunks(line_store, GOAL_XY, TOL, 13)  # longer than every episode


def test_plain_array_inputs_are_checked(line_store):
    obs, act, ends, goal_indices = read_demo_arrays(line_store)
    with pytest.raises(ValueError, match=r"demos: expected flat per-step 'observation' and 'action'"):
        demo_chunks(obs[:, :, None], act, ends, goal_indices, GOAL_XY, TOL, H, source="demos")
    for bad_ends in (ends[:-1], ends[::-1], ends.astype(np.float64), ends[:0]):
        with pytest.raises(ValueError, match="episode_ends"):
            demo_chunks(obs, act, bad_ends, goal_indices, GOAL_XY, TOL, H)
    with pytest.raises(ValueError, match="episode_ends"):
        demo_chunks(obs, act[:-1], ends, goal_indices, GOAL_XY, TOL, H)  # one action row missing
    for bad_idx in ([], [0, 4], "01", [0.0, 1.0]):
        with pytest.raises(ValueError, match=r"goal_indices=.*observation dims in \[0, 4\)"):
            demo_chunks(obs, act, ends, bad_idx, GOAL_XY, TOL, H)


def online_buffer(n: int = 16, action_dim: int = H * 2) -> ReplayBuffer:
    """Fake ChunkEnv transitions (observation[:, 2] = -1 marks them) plus collector bookkeeping."""
    nxt = {
        "observation": torch.full((n, 4), -1.0),
        "goal": torch.zeros(n, 2),
        "reward": torch.zeros(n, 1),
        "terminated": torch.zeros(n, 1, dtype=torch.bool),
        "truncated": torch.zeros(n, 1, dtype=torch.bool),
        "done": torch.zeros(n, 1, dtype=torch.bool),
        "success": torch.zeros(n, 1, dtype=torch.bool),
        "env_steps": torch.full((n, 1), H, dtype=torch.int64),
    }
    td = TensorDict(
        {
            "observation": torch.full((n, 4), -1.0),
            "goal": torch.zeros(n, 2),
            "action": torch.zeros(n, action_dim),
            "done": torch.zeros(n, 1, dtype=torch.bool),
            "collector": {"traj_ids": torch.arange(n)},
            "next": nxt,
        },
        batch_size=[n],
    )
    buffer = ReplayBuffer(storage=LazyTensorStorage(64))
    buffer.extend(td)
    return buffer


@pytest.mark.parametrize(("batch", "fraction", "n_off"), [(8, 0.5, 4), (5, 0.5, 2), (6, 0.0, 0), (6, 1.0, 6)])
def test_mixed_sample_proportions_and_keys(chunks, batch, fraction, n_off):
    out = mixed_sample(online_buffer(), chunks, batch, fraction, generator=torch.Generator().manual_seed(0))
    assert out.batch_size == (batch,)
    from_offline = out["observation"][:, 2] >= 0
    assert int(from_offline.sum()) == n_off
    assert set(out.keys(True, True)) == set(chunks.keys(True, True))  # collector and root "done" dropped
    for obs, action in zip(out["observation"][from_offline], out["action"][from_offline], strict=True):
        i = by_start(chunks)[int(obs[3])]  # drawn from the demos, whole transitions
        assert torch.equal(action, chunks["action"][i])
    assert bool((out["next", "observation"][~from_offline] == -1).all())  # the rest is online


def test_mixed_sample_is_reproducible_and_checks_inputs(chunks):
    a = mixed_sample(online_buffer(), chunks, 8, generator=torch.Generator().manual_seed(3))
    b = mixed_sample(online_buffer(), chunks, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a["observation"][4:], b["observation"][4:])  # the offline half
    with pytest.raises(ValueError, match=r"key 'action' is \(3,\).*\(8,\)"):
        mixed_sample(online_buffer(action_dim=3), chunks, 8)  # a latent-action method's online data
    with pytest.raises(ValueError, match="online replay buffer is empty"):
        mixed_sample(ReplayBuffer(storage=LazyTensorStorage(8)), chunks, 8)
    with pytest.raises(ValueError, match="offline_fraction"):
        mixed_sample(online_buffer(), chunks, 8, offline_fraction=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        mixed_sample(online_buffer(), chunks, 0)


def test_mixed_batch_drives_a_raw_action_loss_update(chunks):
    """The mixed batch is what the SAC/RLPD learner consumes: one update runs and moves the critic."""
    torch.manual_seed(0)
    heads = [HeadSpec("action", H * 2)]
    state_dim = 4 + 2  # observation + goal
    loss = TMRLLoss(
        ChunkActor(state_dim, heads, hidden=16, layers=1),
        CriticEnsemble(state_dim, H * 2, num_critics=2, hidden=16),
        heads,
    )
    before = [p.detach().clone() for p in loss.critic_params.values(True, True)]
    out = update(loss, make_optimizers(loss), mixed_sample(online_buffer(), chunks, 8))
    assert torch.isfinite(out["loss_qvalue"])
    after = list(loss.critic_params.values(True, True))
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
