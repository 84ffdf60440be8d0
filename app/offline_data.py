"""The demonstrations of an RLPD run, read from their episode store as the plain arrays that
``modules.tmrl.offline.demo_chunks`` turns into chunk transitions."""

from __future__ import annotations

from typing import Any

import numpy as np

from datamodules.episodes import EpisodeStore
from modules.nets.keys import ACTION, OBS


def read_demo_arrays(store: EpisodeStore) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any]:
    """``(observation (N, d_o), action (N, d_a), episode_ends (E,) int64, goal_indices)`` of ``store``,
    in ``demo_chunks``' argument order; ``goal_indices`` is the store's attribute as stored (``demo_chunks``
    checks it, and the arrays' shapes).

    Raises:
        KeyError: the store has no per-step ``observation``/``action``, or no ``goal_indices`` attribute
            (the observation dims compared with the goal).
    """
    missing = [key for key in (OBS, ACTION) if key not in store.keys]
    if missing:
        raise KeyError(f"episode store {store.path} has no {missing} (its keys are {store.keys})")
    goal_indices = store.attrs.get("goal_indices")
    if goal_indices is None:
        raise KeyError(
            f"episode store {store.path} has no 'goal_indices' attribute: success cannot be computed "
            "without knowing which observation dims are the position"
        )
    return store.load(OBS), store.load(ACTION), store.episode_ends, goal_indices
