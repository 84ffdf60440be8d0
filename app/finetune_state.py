"""What a fine-tuning checkpoint holds, how it reaches the disk, and how a resumed run reads it back.

A checkpoint is a pair under ``<output_dir>/<run_id>/``: the agent file (``checkpoints/agent_last.pt`` or
``agent_final.pt``, a plain versioned dict loaded with ``weights_only=True``) and the local replay dump
``replay/``, whose size the agent file records. Both are written beside their target and swapped in
(``os.replace`` for the file, a rename for the dump), so a kill at any moment leaves a whole old or a
whole new file and dump, never a torn one; a kill between the two swaps leaves a dump of another size than
the agent file records, which ``load_replay`` detects (the run then goes on with an empty buffer).

A resumed run goes on as the run would have (counters, the UTD debt, sigma history, torch and numpy
RNGs), except for the episodes in progress: its envs start fresh episodes, on a seed derived from
(seed, env steps) by ``resume_seed`` so that it does not replay the episodes the run began with. What a
killed process logged to MLflow after its last checkpoint stays there (MLflow deletes no metric points):
the resumed run logs those env steps again, later in time.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchrl.data import ReplayBuffer

from modules.rng import rng_states, set_rng_states
from modules.tmrl.loss import TMRLLoss

AGENT_FORMAT = "tmrl-agent"
AGENT_VERSION = 2  # 1 (no format field): loss, optimizers and counters only; not resumable by this code
COUNTERS = ("env_steps", "chunks", "updates", "successes")


@dataclass
class LoopState:
    """What ``run_loop`` carries from one batch to the next, all of which a checkpoint keeps."""

    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    owed: float = 0.0  # updates a fractional UTD ratio owes, carried to the next batch
    sigma_history: list[tuple[int, list[float]]] = field(default_factory=list)  # (env step, quantiles)


STOP = threading.Event()  # set by ``request_stop``: the loop stops at the end of the batch in progress


def request_stop(signum: int, frame) -> None:
    """The fine-tuning CLI's SIGTERM and SIGINT handler: ask the loop to stop at the end of its batch (it
    then saves and the run ends KILLED); a second Ctrl-C stops at once. A KeyboardInterrupt raised in the
    middle of an update could leave the target critic's weights swapped into the critic."""
    if STOP.is_set() and signum == signal.SIGINT:
        raise KeyboardInterrupt
    STOP.set()
    name = signal.Signals(signum).name
    print(f"[tmrl] {name}: stopping at the end of this batch (Ctrl-C again: at once)", file=sys.stderr)


def check_stop() -> None:
    """Raise KeyboardInterrupt if a stop was requested (called by the loop between batches)."""
    if STOP.is_set():
        STOP.clear()
        raise KeyboardInterrupt("stop requested")


def resume_seed(seed: int, env_steps: int) -> int:
    """The envs' seed for a run resumed at ``env_steps``: fresh episodes, still a function of ``seed``."""
    return int(np.random.SeedSequence([seed, env_steps]).generate_state(1)[0])


def save_checkpoint(
    path: Path, replay: Path, loss: TMRLLoss, optimizers: dict, buffer: ReplayBuffer, state: LoopState
) -> Path:
    """Write the agent file ``path`` (actor, critics, targets and temperatures, the optimizers, ``state``,
    the RNGs and the replay size) and the dump ``replay`` of ``buffer``, each swapped in whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {
        "format": AGENT_FORMAT,
        "version": AGENT_VERSION,
        "loss": loss.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
        "counters": dict(state.counters),
        "owed": state.owed,
        "sigma_history": list(state.sigma_history),
        "rng": rng_states(),
        "replay_size": len(buffer),
        "replay_capacity": buffer.storage.max_size,  # a resumed run's buffer must be of this size to load it
    }
    tmp = path.with_name(f"{path.name}.tmp")
    torch.save(ckpt, tmp)
    for stale in replay.parent.glob(f"{replay.name}.tmp-*"):  # left by a run killed mid-dump
        shutil.rmtree(stale)
    fresh = replay.with_name(f"{replay.name}.tmp-{state.counters['env_steps']}")
    buffer.dumps(fresh)  # the slow part, done before either swap
    old = fresh.with_name(f"{fresh.name}-old")
    if replay.exists():
        replay.rename(old)
    fresh.rename(replay)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def read_agent(path: Path) -> dict:
    """The agent checkpoint at ``path``; ValueError naming it if it is unreadable or of another version."""
    try:
        ckpt = torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"{path} is not a readable agent checkpoint: {err}") from err
    ckpt = ckpt if isinstance(ckpt, dict) else {}
    if (ckpt.get("format"), ckpt.get("version")) != (AGENT_FORMAT, AGENT_VERSION):
        got = ckpt.get("version", 1 if "counters" in ckpt else "unknown")
        raise ValueError(
            f"{path} is agent checkpoint version {got}; this code resumes version {AGENT_VERSION} only "
            "(start a new run)"
        )
    return ckpt


def _shape_diff(saved: dict, own: dict) -> list[str]:
    """One line per tensor whose shape (or presence) differs between a saved state_dict and ``own``."""
    there, here = ({k: tuple(v.shape) for k, v in sd.items()} for sd in (saved, own))
    return [f"{k}: {there.get(k, 'absent')} in the file, {here.get(k, 'absent')} in this agent"
            for k in sorted(there.keys() | here.keys()) if there.get(k) != here.get(k)]  # fmt: skip


def restore(
    path: Path, ckpt: dict, loss: TMRLLoss, optimizers: dict, buffer: ReplayBuffer, replay: Path
) -> LoopState:
    """Load ``ckpt`` (read from ``path``) into ``loss`` and ``optimizers`` and the dump ``replay`` into
    ``buffer`` (``load_replay``), set the RNGs, and return the loop's state; ValueError naming the file
    and the tensors that differ if it holds another agent."""
    diff = _shape_diff(ckpt["loss"], loss.state_dict())
    if diff:
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        raise ValueError(
            f"{path} holds an agent of other dimensions than this config's (agent.*, chunk.*, method): "
            + "; ".join(diff[:3])
            + more
        )
    loss.load_state_dict(ckpt["loss"])
    for name, opt in optimizers.items():
        opt.load_state_dict(ckpt["optimizers"][name])
    set_rng_states(ckpt["rng"])
    state = LoopState(dict(ckpt["counters"]), ckpt["owed"], [(s, list(q)) for s, q in ckpt["sigma_history"]])
    load_replay(buffer, replay, ckpt["replay_size"])
    print(f"[tmrl] resumed from {path} at {state.counters['env_steps']} env steps, replay buffer of "
          f"{len(buffer)} chunks")  # fmt: skip
    return state


def load_replay(buffer: ReplayBuffer, replay: Path, size: int) -> None:
    """Refill ``buffer`` from the dump ``replay`` if it holds the ``size`` chunks the checkpoint records;
    otherwise say why and leave it empty."""
    if not replay.exists():
        print(f"[tmrl] no replay buffer at {replay}: continuing with an empty one")
        return
    buffer.loads(replay)
    if len(buffer) != size:
        print(
            f"[tmrl] the replay buffer at {replay} holds {len(buffer)} chunks, the checkpoint was saved with "
            f"{size}: continuing with an empty one"
        )
        buffer.empty()
