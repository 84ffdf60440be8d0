"""TMRL fine-tuning pieces: the high-level chunk actor, the critic ensemble and the per-head SAC loss.

Unlike ``modules.nets`` this package may import TorchRL and tensordict.
"""

from modules.tmrl.actor import ChunkActor, HeadSpec, head_slices, split_heads
from modules.tmrl.critic import CriticEnsemble
from modules.tmrl.loss import TMRLLoss, make_optimizers, state_of, update

__all__ = [
    "ChunkActor",
    "CriticEnsemble",
    "HeadSpec",
    "TMRLLoss",
    "head_slices",
    "make_optimizers",
    "split_heads",
    "state_of",
    "update",
]
