"""TMRL fine-tuning pieces: the high-level chunk actor, the critic ensemble, the per-head SAC loss, the
agent factories and the demonstrations as chunk transitions (RLPD).

Unlike ``modules.nets`` this package may import TorchRL and tensordict.
"""

from modules.tmrl.actor import ChunkActor, HeadSpec, head_slices, split_heads
from modules.tmrl.agent import ActorPolicy, AgentSettings, head_specs, make_agent, regularizer
from modules.tmrl.critic import CriticEnsemble
from modules.tmrl.loss import TMRLLoss, make_optimizers, state_of, update
from modules.tmrl.offline import demo_chunks, mixed_sample

__all__ = [
    "ActorPolicy",
    "AgentSettings",
    "ChunkActor",
    "CriticEnsemble",
    "HeadSpec",
    "TMRLLoss",
    "demo_chunks",
    "head_slices",
    "head_specs",
    "make_agent",
    "make_optimizers",
    "mixed_sample",
    "regularizer",
    "split_heads",
    "state_of",
    "update",
]
