"""The block kinds of `tmrl report` (app/report.py): each reads runs from MLflow and returns the markdown
lines of its block; ``KINDS`` maps a marker's kind to its renderer and the arguments it takes.

Deterministic by construction: runs sorted (method, seed, id), the bootstrap seeded, no timestamps in the
text, a figure drawn again only when the sha256 of its data (kept in the PNG's text metadata) changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from app.compare import BASE, EXPLORATION, METRIC, bootstrap_interval, on_grid
from app.plots import pyplot
from app.report_store import TRAIN, thin
from app.tracking import PRETRAIN_TAG, STAGE_TAG

# eval/[<split>/]success_sigma_<s>, eval/[<split>/]success_at_k_sigma_<s>_k_<k> (app/evaluation.py) and the
# older eval/<split>/success_at_<k>_sigma_<s>, each perhaps with _ci_low / _ci_high
EVAL = re.compile(
    r"^eval/(?:(?P<split>[^/]+)/)?success_(?:sigma_(?P<s>[^_]+)|at_k_sigma_(?P<sk>[^_]+)_k_(?P<k>\d+)"
    r"|at_(?P<k_old>\d+)_sigma_(?P<s_old>[^_]+))(?P<ci>_ci_low|_ci_high)?$"
)
SIGMA = re.compile(r"^train/sigma_p(?P<q>\d+)$")
FIGURE_KEY = "tmrl-report-data"  # PNG text chunk: the sha256 of the data the figure was drawn from
RENDER = 1  # bump when the drawing code changes, so every figure is drawn again


class BlockError(Exception):
    """A block that cannot be generated (a missing run, a bad argument); its message goes into the block."""


@dataclass
class Context:
    client: MlflowClient
    root: Path  # the report's folder: figure and file paths are relative to it
    write: bool  # False for --check: figures are compared, not drawn
    figures: list[str] = field(default_factory=list)  # figures that were (or would be) drawn


def _run(ctx: Context, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return ctx.client.get_run(run_id)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise BlockError(f"run {run_id!r} not found in the tracking store") from None
        raise


def _seed(run) -> tuple[float, str]:
    seed = run.data.params.get("seed", "")
    try:
        return float(seed), seed
    except ValueError:
        return math.inf, seed


def _order(run) -> tuple:
    return run.data.tags.get("tmrl.method", ""), _seed(run), run.info.run_id


def _runs(ctx: Context, args: dict[str, str]) -> list:
    """The runs a block names: ``runs=`` ids, or the children of ``parent=`` matching ``filter=``; sorted."""
    if "runs" in args:
        return sorted((_run(ctx, r) for r in args["runs"].split(",") if r), key=_order)
    if "parent" not in args:
        raise BlockError("needs parent=<run id> or runs=<run id>,...")
    from mlflow.exceptions import MlflowException

    parent = _run(ctx, args["parent"])
    query = f"tags.`{PRETRAIN_TAG}` = '{parent.info.run_id}'"
    query += f" and {args['filter']}" if args.get("filter") else ""
    try:
        runs = ctx.client.search_runs([parent.info.experiment_id], filter_string=query, max_results=10_000)
    except MlflowException as err:
        raise BlockError(f"filter {args.get('filter')!r} is not a valid MLflow search filter") from err
    if not runs:
        where = f" matching {args['filter']!r}" if args.get("filter") else ""
        raise BlockError(f"run {args['parent']!r} has no fine-tuning runs{where}")
    return sorted(runs, key=_order)


def _history(ctx: Context, run, metric: str) -> np.ndarray:
    """(T, 2) of (step, value), one value per step (the last logged); a training series at the steps an
    evidence store keeps of it (``app.report_store.thin``), so a store and its export give one report."""
    points = sorted(
        (m.step, m.timestamp, m.value) for m in ctx.client.get_metric_history(run.info.run_id, metric)
    )
    last = sorted({step: value for step, _, value in points}.items())
    if metric.startswith(TRAIN):
        last = [last[i] for i in thin(len(last))]
    return np.asarray(last, dtype=np.float64).reshape(-1, 2)


def _pct(v: float) -> str:
    return f"{100 * v:.0f}%" if math.isfinite(v) else "-"


def _with_interval(v: float, low: float, high: float) -> str:
    if round(100 * low) == round(100 * high):  # one seed, or seeds that agree: no interval to show
        return _pct(v)
    return f"{_pct(v)} [{100 * low:.0f}, {100 * high:.0f}]"


def _steps(step: float) -> str:
    return f"{step / 1000:g}k" if step and step % 1000 == 0 else f"{step:.0f}"


def _code(text: str) -> str:
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _quoted(text: str) -> str:
    """``text`` as one shell word inside double quotes."""
    return '"' + re.sub(r'([\\"`$])', r"\\\1", text) + '"'


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]


def _group(run, by: list[str]) -> str:
    method = run.data.tags.get("tmrl.method", "?")
    return " ".join([method, *(f"{key}={run.data.params.get(key, '?')}" for key in by)])


def _figure(ctx: Context, rel: str, alt: str, data: object, draw: Callable[[object], None]) -> str:
    """A markdown image of the PNG at ``rel``, drawn by ``draw(fig)`` unless it holds this data already."""
    path = ctx.root / rel
    digest = hashlib.sha256(json.dumps([RENDER, data], sort_keys=True).encode()).hexdigest()
    stored = None
    if path.exists():
        from PIL import Image

        try:
            with Image.open(path) as image:
                stored = getattr(image, "text", {}).get(FIGURE_KEY)
        except (OSError, ValueError):  # not a PNG (any more): drawn again
            pass
    if stored != digest:
        ctx.figures.append(rel)
        if ctx.write:
            plt = pyplot()
            fig = plt.figure(figsize=(7, 4))
            draw(fig)
            fig.tight_layout()
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as tmp:
                fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None, FIGURE_KEY: digest})
            plt.close(fig)
            os.chmod(tmp.name, 0o644)  # a temporary file is the owner's alone
            os.replace(tmp.name, path)
    return f"![{alt}]({rel})"


def _draw_curves(curves: dict[str, list[np.ndarray]], base: float | None, title: str) -> Callable:
    def draw(fig) -> None:
        ax = fig.add_subplot(1, 1, 1)
        cmap = pyplot().get_cmap("tab10")
        for i, (group, runs) in enumerate(sorted(curves.items())):
            grid, values = on_grid(runs)
            for r in runs:
                ax.plot(r[:, 0], r[:, 1], color=cmap(i), lw=0.6, alpha=0.3)
            if len(runs) > 1:
                low, high = bootstrap_interval(values)
                ax.fill_between(grid, low, high, color=cmap(i), alpha=0.18, lw=0)
            ax.plot(grid, values.mean(0), color=cmap(i), lw=2.2, label=f"{group} ({len(runs)} seeds)")
        if base is not None:
            ax.axhline(base, color="0.3", ls="--", lw=1.2, label=f"base policy alone ({base:.0%})")
        ax.set(xlabel="environment steps", ylabel="success rate (fixed eval episodes)", title=title)
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)

    return draw


def curves_block(ctx: Context, args: dict[str, str]) -> list[str]:
    """Mean eval success per group at each evaluation (binned to ``width`` env steps: the runs' evaluations
    land a few steps apart), the per-seed finals and training successes, the base, the figure."""
    if "parent" not in args:
        raise BlockError("needs parent=<run id>")
    by, width = args.get("by", "").split(), int(args.get("width", 5000))
    groups: dict[str, list] = defaultdict(list)
    for run in _runs(ctx, args):
        history = _history(ctx, run, METRIC)
        if len(history):
            groups[_group(run, by)].append((run, history))
    if not groups:
        raise BlockError(f"no fine-tuning run of {args['parent']!r} logged {METRIC}")
    names = sorted(groups)
    cells: dict[int, dict[str, str]] = defaultdict(dict)
    for name in names:
        binned: dict[int, list[float]] = defaultdict(list)
        for _, h in groups[name]:
            for step, value in {int(round(s / width) * width): v for s, v in h}.items():
                binned[step].append(value)
        for step, vals in binned.items():
            low, high = bootstrap_interval(np.asarray(vals)[:, None])[:, 0]
            cells[step][name] = _with_interval(float(np.mean(vals)), low, high)
    header = ["env steps", *(f"{n} ({len(groups[n])} seeds)" for n in names)]
    out = ["Mean eval success [95% bootstrap interval over seeds]:", ""]
    out += _table(header, [[_steps(s), *(cells[s].get(n, "-") for n in names)] for s in sorted(cells)])
    per_seed = []
    for name in names:
        found = [_history(ctx, run, EXPLORATION) for run, _ in groups[name]]
        last = [h[-1, 0] for _, h in groups[name]]
        per_seed.append([
            name, ", ".join(_seed(run)[1] or "?" for run, _ in groups[name]),
            ", ".join(_pct(h[-1, 1]) for _, h in groups[name]),
            ", ".join(f"{f[-1, 1]:.0f}" if len(f) else "-" for f in found),
            f"{min(last):,.0f}" + (f"-{max(last):,.0f}" if max(last) != min(last) else ""),
        ])  # fmt: skip
    header = ["method", "seeds", "final eval success", "training episodes that reached the goal", "env steps"]
    out += ["", "Per seed:", "", *_table(header, per_seed), ""]
    bases = [h[0, 1] for g in names for run, _ in groups[g] if len(h := _history(ctx, run, BASE))]
    base = float(np.mean(bases)) if bases else None
    if base is None:
        out.append(f"No run logged `{BASE}`.")
    else:
        out.append(f"The base policy alone on the same evaluation episodes (`{BASE}`): {_pct(base)}.")
    if "figure" in args:
        curves = {n: [h for _, h in groups[n]] for n in names}
        title = args.get("title", f"fine-tuning from {args['parent'][:8]}")
        data = {"curves": {n: [h.tolist() for h in c] for n, c in curves.items()}, "base": base, "t": title}
        out += ["", _figure(ctx, args["figure"], title, data, _draw_curves(curves, base, title))]
    command = f"tmrl compare --parent {args['parent']}"
    command += f" --filter {_quoted(args['filter'])}" if args.get("filter") else ""
    command += f" --by {' '.join(by)}" if by else ""
    return [*out, "", f"The same runs: {_code(command)}."]


def _eval_table(run) -> dict[tuple[str, float], dict]:
    """{(split, sigma): {None: success, k: Success@k}}, each (value, low, high); NaN bounds if not logged."""
    found: dict[tuple, dict] = defaultdict(lambda: {"": math.nan, "_ci_low": math.nan, "_ci_high": math.nan})
    old: dict[tuple, float] = {}
    for name, value in run.data.metrics.items():
        if not (m := EVAL.match(name)):
            continue
        split = m["split"] or ""
        if m["k_old"]:
            if not m["ci"]:
                old[split, float(m["s_old"]), int(m["k_old"])] = value
            continue
        key = (split, float(m["s"]), None) if m["s"] else (split, float(m["sk"]), int(m["k"]))
        found[key][m["ci"] or ""] = value
    for key, value in old.items():  # the older names only where the current ones are absent
        if key not in found:
            found[key][""] = value
    table: dict[tuple[str, float], dict] = defaultdict(dict)
    for (split, sigma, k), v in found.items():
        table[split, sigma][k] = (v[""], v["_ci_low"], v["_ci_high"])
    return dict(table)


def _estimate(entry: tuple[float, float, float] | None) -> str:
    if entry is None:
        return "-"
    value, low, high = entry
    return _pct(value) if math.isnan(low) or math.isnan(high) else _with_interval(value, low, high)


def _eval_runs(ctx: Context, args: dict[str, str]) -> list[tuple[str, dict]]:
    ids = [r for r in args.get("runs", "").split(",") if r]
    if not ids:
        raise BlockError("needs runs=<run id>[,<run id>...]")
    labels = args["labels"].split(";") if "labels" in args else []
    if labels and len(labels) != len(ids):
        raise BlockError(f"labels= names {len(labels)} runs, runs= {len(ids)}")
    out = []
    for i, run_id in enumerate(ids):
        run = _run(ctx, run_id)
        if not (table := _eval_table(run)):
            raise BlockError(f"run {run_id!r} logged no eval/success_sigma_<s> metrics (run `tmrl eval`)")
        out.append((labels[i] if labels else f"{run.info.run_name} ({run_id[:8]})", table))
    return out


def zero_shot_block(ctx: Context, args: dict[str, str]) -> list[str]:
    """Success per sigma: one row per run (and split), one column per sigma."""
    runs = _eval_runs(ctx, args)
    sigmas = sorted({s for _, t in runs for _, s in t})
    splits = any(split for _, t in runs for split, _ in t)
    rows = []
    for label, table in runs:
        for split in sorted({sp for sp, _ in table}):
            cells = [_estimate(table.get((split, s), {}).get(None)) for s in sigmas]
            rows.append([label, *([split] if splits else []), *cells])
    header = ["policy", *(["split"] if splits else []), *(f"sigma {s:g}" for s in sigmas)]
    ids = " ".join(f"`tmrl eval --from-run {r}`" for r in args["runs"].split(",") if r)
    return [*_table(header, rows), "", f"Measured again by {ids}."]


def success_at_k_block(ctx: Context, args: dict[str, str]) -> list[str]:
    """Success and Success@1..K per run, split and sigma [95% bootstrap interval over initial states]."""
    runs = _eval_runs(ctx, args)
    ks = sorted({k for _, t in runs for v in t.values() for k in v if k is not None})
    splits = any(split for _, t in runs for split, _ in t)
    rows = []
    for label, table in runs:
        for (split, sigma), v in sorted(table.items()):
            cells = [_estimate(v.get(None)), *(_estimate(v.get(k)) for k in ks)]
            rows.append([label, *([split] if splits else []), f"{sigma:g}", *cells])
    header = ["policy", *(["split"] if splits else []), "sigma", "success", *(f"Success@{k}" for k in ks)]
    out = _table(header, rows)
    if not ks:
        out += ["", "No Success@k logged by these runs (`eval/success_at_k_sigma_<s>_k_<k>`)."]
    ids = " ".join(f"`tmrl eval --from-run {r}`" for r in args["runs"].split(",") if r)
    return [*out, "", f"Measured again by {ids}."]


def sigma_block(ctx: Context, args: dict[str, str]) -> list[str]:
    """The learned sigma's median (and spread over each batch) at the start and end of each run, a plot."""
    runs = []
    for run in _runs(ctx, args):
        qs = sorted(int(m["q"]) for name in run.data.metrics if (m := SIGMA.match(name)))
        if 50 in qs:
            runs.append((run, {q: _history(ctx, run, f"train/sigma_p{q}") for q in qs}))
    if not runs:
        raise BlockError("no run logged train/sigma_p50 (only a learned sigma has one: method tmrl)")
    rows = []
    for run, h in runs:
        lo, hi = min(h), max(h)
        spread = f"{h[lo][-1, 1]:.3f}-{h[hi][-1, 1]:.3f} (p{lo}-p{hi})" if lo != hi else "-"
        rows.append([
            run.data.tags.get("tmrl.method", "?"), _seed(run)[1] or "?", run.info.run_id[:8],
            f"{h[50][0, 1]:.3f}", f"{h[50][-1, 1]:.3f}", spread, f"{h[50][-1, 0]:,.0f}",
        ])  # fmt: skip
    header = [
        "method",
        "seed",
        "run",
        "median sigma, first batch",
        "last batch",
        "spread, last batch",
        "env steps",
    ]
    out = [
        "Training sigma over fine-tuning (quantiles over each collected batch):",
        "",
        *_table(header, rows),
    ]
    if "figure" in args:
        data = [[r.info.run_id, {q: v.tolist() for q, v in h.items()}] for r, h in runs]

        def draw(fig) -> None:
            ax = fig.add_subplot(1, 1, 1)
            cmap = pyplot().get_cmap("tab10")
            for i, (run, h) in enumerate(runs):
                label = f"{run.data.tags.get('tmrl.method', '?')} seed {_seed(run)[1] or '?'}"
                ax.plot(h[50][:, 0], h[50][:, 1], color=cmap(i % 10), lw=1.6, label=label)
                if 25 in h and 75 in h and len(h[25]) == len(h[75]):
                    ax.fill_between(
                        h[25][:, 0], h[25][:, 1], h[75][:, 1], color=cmap(i % 10), alpha=0.15, lw=0
                    )
            ax.set(xlabel="environment steps", ylabel="training sigma (median; band p25-p75)")
            ax.legend(fontsize=8)

        out += ["", _figure(ctx, args["figure"], "training sigma over fine-tuning", data, draw)]
    return out


def bench_block(ctx: Context, args: dict[str, str]) -> list[str]:
    """The markdown written by `tmrl bench --out FILE`, embedded as it is."""
    if "file" not in args:
        raise BlockError("needs file=<markdown written by `tmrl bench --out`>")
    path = ctx.root / args["file"]
    if not path.is_file():
        raise BlockError(f"file {args['file']!r} not found (write it with `tmrl bench --out {args['file']}`)")
    return path.read_text().strip("\n").splitlines()


def runs_block(ctx: Context, args: dict[str, str]) -> list[str]:
    """Per run (the parent first, if named): stage, method, seed, steps, wall-clock, threads, workers."""
    runs = ([_run(ctx, args["parent"])] if "parent" in args and "runs" not in args else []) + _runs(ctx, args)
    rows, minutes = [], defaultdict(list)
    for run in runs:
        p, info = run.data.params, run.info
        stage = run.data.tags.get(STAGE_TAG, "?")
        if stage == "pretrain":
            steps = f"{int(p['trainer.max_steps']):,} training steps" if "trainer.max_steps" in p else "-"
            workers = p.get("data.num_workers", "-")
        else:
            done = _history(ctx, run, METRIC)
            steps = f"{done[-1, 0]:,.0f} env steps" if len(done) else f"{p.get('env_steps', '-')} (budget)"
            workers = p.get("collect.workers", "-")
        wall = "-"
        if info.end_time and info.start_time:
            minutes[run.data.tags.get("tmrl.method", stage)].append(
                (info.end_time - info.start_time) / 60_000
            )
            wall = f"{minutes[run.data.tags.get('tmrl.method', stage)][-1]:.1f} min"
        method = run.data.tags.get("tmrl.method", "-")
        row = [
            info.run_id[:8],
            stage,
            method,
            _seed(run)[1] or "-",
            steps,
            wall,
            p.get("threads", "-"),
            workers,
        ]
        rows.append([*row, info.status])
    header = ["run", "stage", "method", "seed", "steps", "wall-clock", "torch threads", "workers", "status"]
    mean = ", ".join(f"{k} {np.mean(v):.1f} min ({len(v)})" for k, v in sorted(minutes.items()))
    out = _table(header, rows) + ["", f"Mean wall-clock per run (MLflow start to end): {mean or '-'}."]
    return out + ["Workers: collector processes (fine-tuning) or data-loader workers (pre-training)."]


KINDS: dict[str, tuple[Callable[[Context, dict[str, str]], list[str]], set[str]]] = {
    "curves": (curves_block, {"parent", "filter", "by", "figure", "title", "width"}),
    "zero-shot": (zero_shot_block, {"runs", "labels"}),
    "success-at-k": (success_at_k_block, {"runs", "labels"}),
    "sigma": (sigma_block, {"parent", "runs", "filter", "figure"}),
    "bench": (bench_block, {"file"}),
    "runs": (runs_block, {"parent", "runs", "filter"}),
}
