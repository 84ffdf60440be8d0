"""`tmrl runs`: an experiment's pre-training runs, newest first, each with its fine-tuning runs beneath it.

One plain-text line per run: its id (to pass to `tmrl finetune --from-run`, `tmrl compare`), method, seed,
environment steps reached of its budget, last evaluation success, status, start time and name. A store
without the experiment is refused (``tracking.experiment_id`` names the experiments it holds); an
experiment without runs says so.
"""

from __future__ import annotations

import datetime
import time
from collections import defaultdict

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from app.tracking import PRETRAIN_TAG, STAGE_TAG

SUCCESS = "eval/success_rate"  # a fine-tuning run's success on its fixed evaluation episodes
ZERO_SHOT = "eval/success_sigma_0"  # a pre-training run's zero-shot success at sigma 0...
SPLITS = ("train", "heldout")  # ...or, for a task evaluated per split (cube): eval/<split>/success_sigma_0
PULSE = {"finetune": "train/successes", "pretrain": "train/loss"}  # logged every few batches while it runs
STALE_MIN = 60  # a RUNNING run that logged nothing this long is shown as RUNNING? (its process may be gone)
HEADER = ("run id", "method", "seed", "env steps", "success", "status", "started", "name")
WIDTHS = (36, 12, 6, 13, 11, 10, 18, 0)  # the name, last, takes what it needs


def all_runs(client: MlflowClient, exp_id: str) -> list[Run]:
    """Every active run of the experiment, newest first, page by page."""
    runs, token = [], None
    while True:
        page = client.search_runs(
            [exp_id], order_by=["attributes.start_time DESC"], max_results=1000, page_token=token
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _steps(client: MlflowClient, run: Run) -> str:
    """``reached/budget`` env steps: the step of the last evaluation, of the run's ``env_steps``."""
    history = client.get_metric_history(run.info.run_id, SUCCESS)
    reached = str(max(m.step for m in history)) if history else "0"
    return f"{reached}/{run.data.params.get('env_steps', '?')}"


def _status(client: MlflowClient, run: Run, now_ms: int) -> str:
    """The run's status; RUNNING? for a RUNNING run whose last metric (or start) is over STALE_MIN old: MLflow
    has no heartbeat, so a SIGKILLed or lost process leaves its run RUNNING for ever."""
    info = run.info
    if info.status != "RUNNING":
        return info.status
    key = PULSE.get(run.data.tags.get(STAGE_TAG, ""), "")
    last = max([info.start_time or 0, *(m.timestamp for m in client.get_metric_history(info.run_id, key))])
    return "RUNNING?" if now_ms - last > STALE_MIN * 60_000 else "RUNNING"


def _line(cells: tuple[str, ...]) -> str:
    return "".join(f"{c:<{w}s}" if w else c for c, w in zip(cells, WIDTHS, strict=True)).rstrip()


def _zero_shot(metrics: dict[str, float]) -> str:
    """A fit's zero-shot success at sigma 0: one figure, or ``train/heldout`` ones for a split evaluation."""
    if ZERO_SHOT in metrics:
        return f"{metrics[ZERO_SHOT]:.0%}"
    split = [metrics.get(ZERO_SHOT.replace("eval/", f"eval/{name}/")) for name in SPLITS]
    if all(v is None for v in split):
        return "-"
    return "/".join("-" if v is None else f"{v:.0%}" for v in split)


def _row(client: MlflowClient, run: Run, indent: str, now_ms: int) -> str:
    info, data = run.info, run.data
    finetune = data.tags.get(STAGE_TAG) == "finetune"
    success = data.metrics.get(SUCCESS)
    started = datetime.datetime.fromtimestamp(info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
    cells = (
        indent + info.run_id,
        data.tags.get("tmrl.method", "?") if finetune else "fit",
        data.params.get("seed", "?"),
        _steps(client, run) if finetune else "-",
        ("-" if success is None else f"{success:.0%}") if finetune else _zero_shot(data.metrics),
        _status(client, run, now_ms),
        started,
        info.run_name or "",
    )
    return _line(cells)


def runs_table(client: MlflowClient, exp_id: str, where: str) -> str:
    """The table of experiment ``exp_id`` (``where`` names it and its store in the first line)."""
    runs = all_runs(client, exp_id)
    fits = [r for r in runs if r.data.tags.get(STAGE_TAG) == "pretrain"]
    children: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        if r.data.tags.get(STAGE_TAG) == "finetune":
            children[r.data.tags.get(PRETRAIN_TAG, "")].append(r)
    tuned = sum(len(c) for c in children.values())
    if not fits and not tuned:
        return f"[tmrl] {where} has no runs yet; start with `tmrl fit --config configs/quickstart.yaml`"
    counts = (
        f"{len(fits)} pre-training run{'s' * (len(fits) != 1)}, {tuned} fine-tuning run{'s' * (tuned != 1)}"
    )
    lines = [f"[tmrl] {where}: {counts}", _line(HEADER)]
    now = int(time.time() * 1000)

    def order(r: Run) -> tuple:
        return r.data.tags.get("tmrl.method", ""), int(r.data.params.get("seed", 0)), r.info.start_time

    for fit in fits:
        lines.append(_row(client, fit, "", now))
        lines += [_row(client, c, "  ", now) for c in sorted(children.pop(fit.info.run_id, []), key=order)]
    orphans = sorted((c for cs in children.values() for c in cs), key=order)
    if orphans:  # their pre-training run was deleted, or lives in another experiment
        lines.append("fine-tuning runs whose pre-training run is not in this experiment:")
        lines += [_row(client, c, "  ", now) for c in orphans]
    others = len(runs) - len(fits) - tuned
    if others:
        lines.append(f"({others} runs of other tools not shown: no {STAGE_TAG} tag)")
    lines.append(
        f"success: the last {SUCCESS} (fine-tuning), the zero-shot {ZERO_SHOT} (pre-training; a task "
        f"evaluated per split shows {'/'.join(SPLITS)})"
    )
    if any(" RUNNING? " in line for line in lines):
        lines.append(
            f"RUNNING?: nothing logged for over {STALE_MIN} min; its process may be gone (killed, a lost "
            "machine): `tmrl finetune --from-run <fit> resume=<id>` continues a fine-tuning run"
        )
    lines.append("compare: `tmrl compare --parent <fit run id>` or `tmrl compare <fine-tuning run id> ...`")
    return "\n".join(lines)
