"""What every numpy-level batch of sub-envs (BatchedMaze, BatchedCube) shares: checking the row masks and
the actions a step is given, so both refuse bad input with the same messages."""

from __future__ import annotations

import numpy as np


class SubEnvBatch:
    """Mixin for N sub-envs with per-row state arrays ``terminated``, ``truncated`` and ``_was_reset``."""

    num_envs: int
    action_dim: int
    terminated: np.ndarray
    truncated: np.ndarray
    _was_reset: np.ndarray

    def _mask(self, mask: np.ndarray | None, what: str) -> np.ndarray:
        """``mask`` as (N,) bool (all True if None), or a ValueError naming the method and the shape."""
        if mask is None:
            return np.ones(self.num_envs, bool)
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.shape != (self.num_envs,):
            raise ValueError(
                f"{type(self).__name__}.{what}: mask has dtype {mask.dtype} and shape {mask.shape}; "
                f"expected bool of shape ({self.num_envs},)"
            )
        return mask

    def _rows_to_step(self, actions: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row indices to step, actions as an array) after checking the shapes and that every selected
        row was reset and is not done."""
        mask = self._mask(mask, "step")
        actions = np.asarray(actions)
        name = type(self).__name__
        want = (self.num_envs, self.action_dim)
        if actions.shape != want:
            raise ValueError(f"{name}.step: actions have shape {actions.shape}; expected {want}")
        idx = np.flatnonzero(mask)
        bad = idx[~self._was_reset[idx] | self.terminated[idx] | self.truncated[idx]]
        if len(bad):
            raise RuntimeError(
                f"{name}.step: sub-envs {bad.tolist()} were never reset or are done; reset them first"
            )
        return idx, actions
