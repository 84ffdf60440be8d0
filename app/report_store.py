"""A report's evidence store: a copy of a sqlite MLflow store slimmed to what `tmrl report` reads.

The runs behind ``docs/RESULTS.md`` live in a store on the machine that made them; a copy of it committed
beside the report (``docs/evidence/mlflow.db``) lets anyone regenerate the report from a clean checkout
(``tmrl report --uri sqlite:///docs/evidence/mlflow.db --check``). The copy keeps every run, param, tag,
dataset input and run time, and of the metrics only the ones the report's blocks read (``KEEP``): the
per-update training losses and Q statistics, most of a store's rows, are dropped. The training series kept
(``train/...``: TMRL's sigma quantiles, the exploration successes) are thinned to ``TRAIN_POINTS`` evenly
spaced steps per run (the first and last among them: ``thin``), the very points the report's blocks read
from any store, so the copy gives the same report; evaluations are kept whole. Artifacts are not copied
(the runs' artifact URIs still name the original location).

The copy is taken with SQLite's online backup (consistent while runs still write to the source), slimmed
and vacuumed in a temporary file, then moved over ``dst`` in one step: a failed export leaves ``dst`` as it
was.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# metric keys (SQL LIKE patterns) `tmrl report` reads: evaluations, TMRL's sigma quantiles, exploration
KEEP = ("eval/%", "train/sigma_p%", "train/successes")
TRAIN = "train/"  # series under this prefix are read (and kept) at TRAIN_POINTS steps at most
TRAIN_POINTS = 60
SQLITE = "sqlite:///"


def thin(n: int, most: int = TRAIN_POINTS) -> np.ndarray:
    """The indices of ``most`` evenly spaced points of a series of ``n``, its first and last among them (all
    ``n`` when ``n <= most``); thinning a thinned series keeps it whole."""
    if n <= most:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, most)).astype(int))


@dataclass
class Export:
    """What ``export_store`` wrote: the file, its runs, the metric rows kept of those in the source, and its
    size in bytes before (the source) and after."""

    path: Path
    runs: int
    rows_kept: int
    rows_total: int
    size_before: int
    size_after: int


def sqlite_path(uri: str) -> Path:
    """The file of a ``sqlite:///`` tracking URI; ValueError for any other URI or a missing file."""
    if not uri.startswith(SQLITE):
        raise ValueError(f"--export copies a sqlite store; the tracking URI is {uri!r}")
    path = Path(uri[len(SQLITE) :])
    if not path.is_file():
        raise FileNotFoundError(f"no tracking store at {uri}")
    return path


def _thin_training_series(db: sqlite3.Connection) -> None:
    """Keep, of each run's ``train/...`` series, the last row logged at each of its ``thin`` steps."""
    rows = db.execute(
        "SELECT rowid, run_uuid, key, step FROM metrics WHERE key LIKE ? ORDER BY run_uuid, key, step, "
        "timestamp, value",
        (TRAIN + "%",),
    ).fetchall()
    series: dict[tuple[str, str], dict[int, int]] = {}
    for rowid, run, key, step in rows:
        series.setdefault((run, key), {})[step] = rowid  # the last row of a step wins, as the report reads it
    keep = set()
    for last in series.values():
        ids = list(last.values())
        keep.update(ids[i] for i in thin(len(ids)))
    db.execute("CREATE TEMP TABLE kept (id INTEGER PRIMARY KEY)")
    db.executemany("INSERT INTO kept VALUES (?)", [(r,) for r in keep])
    db.execute("DELETE FROM metrics WHERE key LIKE ? AND rowid NOT IN (SELECT id FROM kept)", (TRAIN + "%",))
    db.execute("DROP TABLE kept")


def export_store(src_uri: str, dst: str | Path) -> Export:
    """Write the slimmed copy of store ``src_uri`` (sqlite) to ``dst`` (module docstring)."""
    src, dst = sqlite_path(src_uri), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"--export {dst} is the source store itself; name another file")
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".export-", suffix=".db", dir=dst.parent)
    os.close(fd)
    try:
        with sqlite3.connect(f"file:{src}?mode=ro", uri=True) as source, sqlite3.connect(tmp) as copy:
            source.backup(copy)
        with sqlite3.connect(tmp) as db:
            keep = " OR ".join("key LIKE ?" for _ in KEEP)
            total = db.execute("SELECT count(*) FROM metrics").fetchone()[0]
            for table in ("metrics", "latest_metrics"):
                db.execute(f"DELETE FROM {table} WHERE NOT ({keep})", KEEP)
            _thin_training_series(db)
            kept = db.execute("SELECT count(*) FROM metrics").fetchone()[0]
            runs = db.execute("SELECT count(*) FROM runs WHERE lifecycle_stage = 'active'").fetchone()[0]
        db = sqlite3.connect(tmp)
        try:
            db.execute("VACUUM")  # outside a transaction
        finally:
            db.close()
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Export(dst, runs, kept, total, src.stat().st_size, dst.stat().st_size)
