"""`tmrl fit` that records, per process, the training windows it loads and trains on.

``python tests/app/fit_trace.py fit ...`` with ``TMRL_TRACE_DIR`` set writes ``<dir>/rank<R>.jsonl``: one
line per loaded window (its epoch and index), in loading order, and one per training step (its epoch and
batch size). A DDP strategy relaunches this script for its other ranks, so they record too. Used by
tests/app/test_ddp.py to see which windows each rank trains on."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning.pytorch.utilities import rank_zero_only  # noqa: E402

from app.cli import main  # noqa: E402
from datamodules import state  # noqa: E402
from modules.csp import CSPModule  # noqa: E402

epoch = {"train": None}
sampler_iter, getitem = state.WindowSampler.__iter__, state.WindowDataset.__getitem__
training_step = CSPModule.training_step


def record(row: dict) -> None:
    path = Path(os.environ["TMRL_TRACE_DIR"]) / f"rank{int(rank_zero_only.rank or 0)}.jsonl"
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def traced_iter(self):
    if self.shuffle:  # the training loader's sampler (validation's does not shuffle)
        epoch["train"] = self.epoch
    return sampler_iter(self)


def traced_getitem(self, key):
    record({"epoch": epoch["train"], "index": state.split_key(key)[0]})
    return getitem(self, key)


def traced_step(self, batch, batch_idx):
    record({"epoch": self.current_epoch, "step_size": len(batch["action"])})
    return training_step(self, batch, batch_idx)


state.WindowSampler.__iter__ = traced_iter
state.WindowDataset.__getitem__ = traced_getitem
CSPModule.training_step = traced_step

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
