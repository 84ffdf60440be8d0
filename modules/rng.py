"""The global random generators' states (torch CPU and CUDA, numpy, Python), saved in both stages'
checkpoints so that a resumed run draws what the uninterrupted one would have."""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_states() -> dict:
    """The states of torch's (CPU and CUDA), numpy's and Python's global generators, in types
    ``torch.load(weights_only=True)`` reads (the bare policy class loads Lightning checkpoints so)."""
    name, keys, *rest = np.random.get_state()  # ("MT19937", keys (624,) uint32, pos, has_gauss, gauss)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(keys), *rest],
        "python": random.getstate(),
    }


def set_rng_states(states: dict) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
