"""Shared fixtures: tiny synthetic episode stores, tiny configs, and an MLflow store in tmp_path."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ["HF_HUB_OFFLINE"] = "1"  # a mistaken download fails at once instead of hanging


def make_episodes(lengths: list[int], obs_dim: int = 2, action_dim: int = 2, seed: int = 0) -> list[dict]:
    """Episodes whose values encode (episode, step): obs[..., 0] = episode id, obs[..., 1] = step."""
    rng = np.random.default_rng(seed)
    episodes = []
    for e, n in enumerate(lengths):
        obs = rng.normal(size=(n, obs_dim)).astype(np.float32)
        obs[:, 0] = e
        obs[:, 1] = np.arange(n)
        act = rng.uniform(-1, 1, size=(n, action_dim)).astype(np.float32)
        act[:, 0] = e / 10.0  # identifies the episode an action came from
        episodes.append({"observation": obs, "action": act})
    return episodes


@pytest.fixture
def synthetic_store(tmp_path):
    """A small store of 6 episodes of varied length with goal_indices [0, 1]."""
    from datamodules.episodes import write_episodes

    episodes = make_episodes([40, 25, 60, 12, 33, 50], obs_dim=3)
    attrs = {"env": "synthetic", "goal_indices": [0, 1], "obs_dim": 3, "action_dim": 2}
    return write_episodes(tmp_path / "synthetic.zarr", episodes, attrs)


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("TMRL_RUN_ID", raising=False)
    return uri
