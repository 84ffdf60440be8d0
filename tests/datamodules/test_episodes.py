"""Tests for the on-disk episode store (datamodules/episodes.py) and the OGBench .npz reader."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from datamodules.episodes import CorruptStoreError, EpisodeStore, StoreRows, write_episodes
from datamodules.ogbench_npz import import_ogbench_npz, read_ogbench_npz


def make_episodes(lengths: list[int], seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Episodes with distinct, checkable values: observation (T, 3) float32, action (T, 2) float32."""
    rng = np.random.default_rng(seed)
    return [
        {
            "observation": rng.normal(size=(n, 3)).astype(np.float32),
            "action": rng.uniform(-1, 1, size=(n, 2)).astype(np.float32),
        }
        for n in lengths
    ]


def leftovers(directory: Path) -> list[str]:
    """Hidden temporary/backup siblings a write may have left behind."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_round_trip_values_ends_keys_attrs(tmp_path: Path) -> None:
    episodes = make_episodes([5, 1, 7, 3])
    store = write_episodes(
        tmp_path / "d.zarr", episodes, {"env": "toy", "goal_indices": [0, 1]}, chunk_rows=4
    )

    reopened = EpisodeStore.open(tmp_path / "d.zarr")
    assert sorted(reopened.keys) == ["action", "observation"]
    np.testing.assert_array_equal(reopened.episode_ends, [5, 6, 13, 16])
    np.testing.assert_array_equal(reopened.episode_starts, [0, 5, 6, 13])
    assert (reopened.num_episodes, reopened.num_steps, len(reopened)) == (4, 16, 4)
    assert reopened.attrs["env"] == "toy" and reopened.attrs["goal_indices"] == [0, 1]
    assert reopened.attrs["keys"]["observation"] == {"dtype": "<f4", "shape": [3]}
    assert reopened.fingerprint == store.fingerprint and len(store.fingerprint) == 64
    for i, episode in enumerate(episodes):
        got = reopened.episode(i)
        for key in episode:
            np.testing.assert_array_equal(got[key], episode[key])
            assert got[key].dtype == np.float32
    np.testing.assert_array_equal(reopened.episode(-1)["action"], episodes[-1]["action"])
    full = np.concatenate([e["observation"] for e in episodes])
    np.testing.assert_array_equal(reopened.load("observation"), full)
    lazy = reopened.array("observation")
    assert isinstance(lazy, zarr.Array) and lazy.shape == (16, 3) and lazy.chunks == (4, 3)
    np.testing.assert_array_equal(lazy[6:9], full[6:9])
    assert reopened.verify()


def test_episode_index_and_key_errors(tmp_path: Path) -> None:
    store = write_episodes(tmp_path / "d.zarr", make_episodes([2, 2]))
    with pytest.raises(IndexError, match="episode index 2"):
        store.episode(2)
    with pytest.raises(KeyError, match="'reward'"):
        store.array("reward")


def test_fingerprint_stable_content_only_and_sensitive(tmp_path: Path) -> None:
    episodes = make_episodes([6, 9, 2])
    a = write_episodes(tmp_path / "a.zarr", episodes, {"note": "a"})
    b = write_episodes(tmp_path / "b.zarr", episodes, {"note": "b"}, chunk_rows=3)
    assert a.fingerprint == b.fingerprint  # independent of chunking, path and user attrs

    changed = [{k: v.copy() for k, v in e.items()} for e in episodes]
    changed[1]["action"][4, 1] += 1e-3
    c = write_episodes(tmp_path / "c.zarr", changed)
    assert c.fingerprint != a.fingerprint

    # Same rows, different episode split: the fingerprint covers episode_ends too.
    merged = [
        {k: np.concatenate([episodes[0][k], episodes[1][k]]) for k in episodes[0]},
        episodes[2],
    ]
    d = write_episodes(tmp_path / "d.zarr", merged)
    assert d.fingerprint != a.fingerprint


def test_verify_detects_tampering(tmp_path: Path) -> None:
    store = write_episodes(tmp_path / "d.zarr", make_episodes([10, 10]), chunk_rows=8)
    assert store.verify()
    writable = zarr.open_group(str(tmp_path / "d.zarr"), mode="r+")
    writable["data/observation"][13, 2] = 123.0
    assert not EpisodeStore.open(tmp_path / "d.zarr").verify()


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "d.zarr"
    first = write_episodes(path, make_episodes([3]))
    with pytest.raises(FileExistsError, match="d.zarr"):
        write_episodes(path, make_episodes([4], seed=1))
    assert EpisodeStore.open(path).fingerprint == first.fingerprint

    second = write_episodes(path, make_episodes([4], seed=1), overwrite=True)
    assert second.num_steps == 4 and second.fingerprint != first.fingerprint
    assert leftovers(tmp_path) == []


def test_overwrite_refuses_a_directory_that_is_not_a_store(tmp_path: Path) -> None:
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a tmrl episode store"):
        write_episodes(other, make_episodes([3]), overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"


def failing_stream(episodes: list[dict[str, np.ndarray]], fail_at: int):
    for i, episode in enumerate(episodes):
        if i == fail_at:
            raise RuntimeError("simulated crash")
        yield episode


def test_failed_write_leaves_no_store(tmp_path: Path) -> None:
    path = tmp_path / "d.zarr"
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_episodes(path, failing_stream(make_episodes([9, 9, 9, 9]), 3), chunk_rows=4)
    assert not path.exists()
    assert leftovers(tmp_path) == []


def test_failed_overwrite_keeps_existing_store_intact(tmp_path: Path) -> None:
    path = tmp_path / "d.zarr"
    old = write_episodes(path, make_episodes([5, 5]))
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_episodes(
            path, failing_stream(make_episodes([9, 9, 9], seed=3), 2), overwrite=True, chunk_rows=4
        )
    reopened = EpisodeStore.open(path)
    assert reopened.fingerprint == old.fingerprint and reopened.verify()
    assert leftovers(tmp_path) == []


def test_bad_episode_errors_name_the_episode_and_key(tmp_path: Path) -> None:
    good = make_episodes([4, 4])
    bad_keys = [good[0], {"observation": good[1]["observation"]}]
    with pytest.raises(ValueError, match=r"episode 1: keys \['observation'\] differ"):
        write_episodes(tmp_path / "a.zarr", bad_keys)

    bad_shape = [good[0], {"observation": np.zeros((4, 5), np.float32), "action": good[1]["action"]}]
    with pytest.raises(ValueError, match=r"episode 1: key 'observation' has per-step shape \(5,\)"):
        write_episodes(tmp_path / "b.zarr", bad_shape)

    bad_dtype = [
        good[0],
        {"observation": good[1]["observation"].astype(np.float64), "action": good[1]["action"]},
    ]
    with pytest.raises(ValueError, match="episode 1: key 'observation' has dtype float64"):
        write_episodes(tmp_path / "c.zarr", bad_dtype)

    ragged = [good[0], {"observation": good[1]["observation"], "action": good[1]["action"][:3]}]
    with pytest.raises(ValueError, match="episode 1: every key needs the same number"):
        write_episodes(tmp_path / "d.zarr", ragged)

    empty = [{"observation": np.zeros((0, 3), np.float32), "action": np.zeros((0, 2), np.float32)}]
    with pytest.raises(ValueError, match="episode 0"):
        write_episodes(tmp_path / "e.zarr", empty)

    with pytest.raises(ValueError, match="no episodes"):
        write_episodes(tmp_path / "f.zarr", [])
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, nothing left over


def test_bad_attrs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        write_episodes(tmp_path / "a.zarr", make_episodes([2]), {"fingerprint": "x"})
    with pytest.raises(ValueError, match=r"attrs\['bad'\] = .* is not JSON-serializable"):
        write_episodes(tmp_path / "b.zarr", make_episodes([2]), {"bad": object()})


def test_open_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.zarr"):
        EpisodeStore.open(tmp_path / "missing.zarr")

    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="plain is not a tmrl episode store"):
        EpisodeStore.open(tmp_path / "plain")

    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["format"] = "something-else"
    with pytest.raises(ValueError, match="other.zarr is not a tmrl episode store.*'something-else'"):
        EpisodeStore.open(tmp_path / "other.zarr")

    write_episodes(tmp_path / "v.zarr", make_episodes([2]))
    zarr.open_group(str(tmp_path / "v.zarr"), mode="r+").attrs["version"] = 99
    with pytest.raises(ValueError, match="v.zarr: episode store version 99"):
        EpisodeStore.open(tmp_path / "v.zarr")

    write_episodes(tmp_path / "e.zarr", make_episodes([2]))
    shutil.rmtree(tmp_path / "e.zarr" / "meta" / "episode_ends")
    with pytest.raises(ValueError, match="e.zarr: episode store has no 'meta/episode_ends'"):
        EpisodeStore.open(tmp_path / "e.zarr")


def write_ogbench_npz(path: Path, lengths: list[int], compact: bool = False) -> dict[str, np.ndarray]:
    """A synthetic OGBench raw-layout dataset: trajectories concatenated, terminals=1 on each last step."""
    n = sum(lengths)
    terminals = np.zeros(n, np.float32)
    terminals[np.cumsum(lengths) - 1] = 1.0
    data = {
        "observations": np.arange(n * 2, dtype=np.float32).reshape(n, 2),
        "actions": -np.arange(n * 2, dtype=np.float32).reshape(n, 2),
        "qpos": np.arange(n, dtype=np.float64).reshape(n, 1),
        "terminals": terminals,
    }
    if compact:
        # OGBench's compact layout: valids=0 on the last step, terminals also flag the step before it.
        data["valids"] = 1.0 - terminals
        data["terminals"] = np.minimum(terminals + np.concatenate([terminals[1:], [1.0]]), 1.0)
    np.savez(path, **data)
    return data


@pytest.mark.parametrize("compact", [False, True])
def test_read_ogbench_npz_splits_episodes(tmp_path: Path, compact: bool) -> None:
    data = write_ogbench_npz(tmp_path / "ds.npz", [4, 2, 5], compact=compact)
    episodes = read_ogbench_npz(tmp_path / "ds.npz", extra_keys=["qpos"])
    assert [len(e["observation"]) for e in episodes] == [4, 2, 5]
    assert sorted(episodes[0]) == ["action", "observation", "qpos"]
    np.testing.assert_array_equal(episodes[1]["observation"], data["observations"][4:6])
    np.testing.assert_array_equal(episodes[2]["action"], data["actions"][6:11])
    np.testing.assert_array_equal(episodes[2]["qpos"][:, 0], [6, 7, 8, 9, 10])


def test_read_ogbench_npz_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        read_ogbench_npz(tmp_path / "nope.npz")

    np.savez(tmp_path / "partial.npz", observations=np.zeros((3, 2)), terminals=np.array([0, 0, 1]))
    with pytest.raises(KeyError, match=r"partial.npz: missing keys \['actions'\]"):
        read_ogbench_npz(tmp_path / "partial.npz")

    write_ogbench_npz(tmp_path / "ds.npz", [3])
    with pytest.raises(KeyError, match=r"missing keys \['qvel'\]"):
        read_ogbench_npz(tmp_path / "ds.npz", extra_keys=["qvel"])

    np.savez(
        tmp_path / "open.npz",
        observations=np.zeros((3, 2)),
        actions=np.zeros((3, 2)),
        terminals=np.array([0, 1, 0]),
    )
    with pytest.raises(ValueError, match="open.npz: the last trajectory has no end marker"):
        read_ogbench_npz(tmp_path / "open.npz")


def test_import_ogbench_npz(tmp_path: Path) -> None:
    data = write_ogbench_npz(tmp_path / "ds.npz", [3, 4])
    store = import_ogbench_npz(tmp_path / "ds.npz", tmp_path / "ds.zarr", {"env": "pointmaze-large"})
    np.testing.assert_array_equal(store.episode_ends, [3, 7])
    np.testing.assert_array_equal(store.load("observation"), data["observations"])
    assert store.attrs["env"] == "pointmaze-large" and store.attrs["generator"] == "ogbench_npz"
    assert store.verify()


def test_large_steps_get_small_chunks_of_whole_divisors(tmp_path):
    from datamodules.episodes import CHUNK_BYTES, key_chunk_rows

    assert key_chunk_rows(8192, 8) == 8192  # low-dimensional keys keep the time chunk
    assert key_chunk_rows(8192, 64 * 64 * 3) == 16  # a 64x64 frame: 16 rows of 12 KB
    assert key_chunk_rows(6, 10**6) == 3  # halving stops at an odd divisor
    rng = np.random.default_rng(0)
    episodes = [
        {
            "observation": rng.normal(size=(40, 2)).astype(np.float32),
            "frame": rng.integers(0, 255, (40, 32, 32, 3), dtype=np.uint8),
        }  # fmt: skip
        for _ in range(3)
    ]
    store = write_episodes(tmp_path / "f.zarr", episodes, chunk_rows=64)
    rows = CHUNK_BYTES // (32 * 32 * 3)
    assert store.array("frame").chunks[0] <= rows and 64 % store.array("frame").chunks[0] == 0
    assert store.array("observation").chunks[0] == 64
    np.testing.assert_array_equal(store.load("frame"), np.concatenate([e["frame"] for e in episodes]))
    assert store.verify()


def test_load_refuses_nan_or_inf_even_where_check_does_not_read(tmp_path: Path) -> None:
    episodes = [{"observation": np.zeros((n, 2), np.float32), "step": np.arange(n)} for n in (5, 4, 6)]
    episodes[2]["observation"][3, 1] = np.inf
    store = write_episodes(tmp_path / "d.zarr", episodes)
    assert store.load("step").dtype.kind == "i"  # integer arrays cannot hold NaN: not checked
    assert store.check(max_bytes=0) is store  # too large to read at open: left to the reads
    message = r"'observation' holds NaN or Inf, first in episode 2 \(row 12\)"
    with pytest.raises(CorruptStoreError, match=message):
        store.load("observation")
    with pytest.raises(CorruptStoreError, match="first in episode 2"):
        store.check()


def test_a_damaged_chunk_is_named_by_every_read(tmp_path: Path) -> None:
    store = write_episodes(tmp_path / "d.zarr", [{"observation": np.ones((8, 2), np.float32)}])
    (tmp_path / "d.zarr" / "data" / "observation" / "c" / "0" / "0").write_bytes(b"garbage")
    for read in (lambda: store.load("observation"), lambda: store.episode(0), store.verify):
        with pytest.raises(CorruptStoreError, match=f"store {tmp_path / 'd.zarr'}: cannot read its array"):
            read()
    rows = StoreRows(str(store.path), "observation")
    with pytest.raises(CorruptStoreError, match="'observation'"):
        rows.read(np.array([0, 1]))
