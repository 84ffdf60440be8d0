"""OGBench's raw dataset files (``.npz``) as episodes, and their import into an episode store."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.episodes import EpisodeStore, write_episodes


def read_ogbench_npz(path: str | Path, extra_keys: Sequence[str] = ()) -> list[dict[str, np.ndarray]]:
    """Split an OGBench dataset ``.npz`` into episodes ``{"observation", "action", *extra_keys}``.

    OGBench's raw layout concatenates trajectories: ``observations`` (N, obs_dim), ``actions`` (N, a_dim),
    ``terminals`` (N,) with 1 on the LAST step of each trajectory (that step's action has no recorded
    next state but is still the action taken there), plus optional per-step ``qpos``, ``qvel``...
    (pass their names in ``extra_keys`` to keep them). A file saved in OGBench's "compact" layout carries
    ``valids`` (0 on each trajectory's last step; its ``terminals`` also flag the step before), so there
    the ends are read from ``valids``. dtypes are kept as stored.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"OGBench dataset {path} does not exist")
    with np.load(path) as npz:
        wanted = ["observations", "actions", "terminals", *extra_keys]
        missing = [key for key in wanted if key not in npz.files]
        if missing:
            raise KeyError(f"{path}: missing keys {missing} (the file has {sorted(npz.files)})")
        arrays = {key: npz[key] for key in wanted}
        valids = npz["valids"] if "valids" in npz.files else None
    n = len(arrays["observations"])
    bad = {key: len(arr) for key, arr in arrays.items() if len(arr) != n}
    if bad:
        raise ValueError(f"{path}: arrays must all have {n} rows (like 'observations'), got {bad}")
    ends = (np.asarray(valids) == 0) if valids is not None else (np.asarray(arrays["terminals"]) > 0)
    last = np.flatnonzero(ends.reshape(n))  # (num_episodes,) index of each trajectory's last step
    if n == 0 or len(last) == 0 or last[-1] != n - 1:
        raise ValueError(f"{path}: the last trajectory has no end marker ('terminals' == 1 on its last step)")
    names = {"observations": "observation", "actions": "action", **{key: key for key in extra_keys}}
    episodes = []
    for start, stop in zip(np.concatenate([[0], last[:-1] + 1]), last + 1, strict=True):
        episodes.append({names[key]: arrays[key][start:stop] for key in names})
    return episodes


def import_ogbench_npz(
    npz_path: str | Path,
    out_path: str | Path,
    attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    extra_keys: Sequence[str] = (),
) -> EpisodeStore:
    """Convert an OGBench dataset ``.npz`` to an episode store at ``out_path`` (see read_ogbench_npz)."""
    episodes = read_ogbench_npz(npz_path, extra_keys)
    meta = {"generator": "ogbench_npz", "source": Path(npz_path).name, **(attrs or {})}
    return write_episodes(out_path, episodes, meta, overwrite=overwrite)
