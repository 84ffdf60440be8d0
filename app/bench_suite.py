"""`tmrl bench` (or `tmrl bench all`): every benchmark of ``SUITE`` at a quick size, run in turn, as ONE
markdown table headed by the command, the date and the machine (``bench_all``); a benchmark that fails
leaves a "failed" row and the others still run. The benchmarks themselves are in app/bench.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from app.bench import Row, bench_finetune, bench_pretrain
from app.finetune import FinetuneConfig
from app.pretrain import fit_task


@dataclasses.dataclass(frozen=True)
class Suite:
    """One benchmark of `tmrl bench all`: a bench function on shipped configs at a quick size."""

    name: str  # its id in the table and for ``--only``
    kind: str  # a key of KINDS: "pretrain" (``bench_pretrain``) or "finetune" (``bench_finetune``)
    config: str  # the fit config (pretrain) or the fine-tuning config (finetune)
    size: int  # pretrain: timed steps per loop; finetune: env steps of the timed loop
    policy_config: str = ""  # finetune: the fit config whose policy and sensor to use
    overrides: tuple[str, ...] = ()  # key=value; "{scratch}" stands for a temporary directory


def _scratch_demos(name: str, episodes: int, steps: int) -> tuple[str, ...]:
    """A few fresh demonstrations in the scratch directory: the loader's speed does not need 300 episodes,
    and the measurement does not depend on which store lies in data/."""
    return f"data.path={{scratch}}/{name}.zarr", f"demos.episodes={episodes}", f"demos.episode_length={steps}"


SUITE = (  # quick sizes: the whole suite takes minutes on 2 CPU cores
    Suite("pretrain-state", "pretrain", "configs/csp_state.yaml", 20, "", _scratch_demos("state", 10, 500)),
    Suite("pretrain-cube", "pretrain", "configs/csp_pointcloud.yaml", 10, "", _scratch_demos("cube", 4, 200)),
    Suite("pretrain-image", "pretrain", "configs/csp_image.yaml", 10, "", _scratch_demos("maze", 6, 200)),
    Suite("finetune-state", "finetune", "configs/tmrl_pointmaze.yaml", 4000, "configs/csp_state.yaml"),
    Suite("finetune-cube", "finetune", "configs/tmrl_cube.yaml", 1000, "configs/csp_pointcloud.yaml"),
    Suite("finetune-image", "finetune", "configs/tmrl_image.yaml", 2000, "configs/csp_image.yaml"),
)  # fmt: skip


def _run_pretrain(s: Suite, overrides: list[str]) -> list[Row]:
    from app.config import load_config
    from app.tasks.registry import fit_schema

    return bench_pretrain(load_config(fit_schema(s.config, overrides), s.config, overrides), steps=s.size)


def _run_finetune(s: Suite, overrides: list[str]) -> list[Row]:
    from app.config import load_config
    from app.tasks.registry import fit_schema

    cfg = load_config(FinetuneConfig, s.config, overrides)
    fit_cfg = load_config(fit_schema(s.policy_config), s.policy_config)
    return bench_finetune(cfg, fit_cfg.policy, s.size, fit_task(fit_cfg).sensor(fit_cfg))


KINDS = {"pretrain": _run_pretrain, "finetune": _run_finetune}


def select(names: Sequence[str]) -> list[Suite]:
    """The benchmarks of SUITE named in ``names`` (all of them when empty), in SUITE's order."""
    known = [s.name for s in SUITE]
    if unknown := [n for n in names if n not in known]:
        raise ValueError(f"--only {' '.join(unknown)}: no such benchmark; expected some of {known}")
    return [s for s in SUITE if not names or s.name in names]


def cpu_model(cpuinfo: str) -> str:
    """The CPU's name from /proc/cpuinfo's text: x86's "model name", else ARM's "Model" or "Hardware"."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            fields.setdefault(key.strip(), value.strip())
    for key in ("model name", "Model", "Hardware", "cpu model"):
        if key in fields:
            return fields[key]
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:  # not Linux
        return ""


def machine() -> str:
    """This machine in one line: CPU model and cores, memory, torch version and threads, GPUs if any."""
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    cpu = f"{cpu_model(_read('/proc/cpuinfo'))}, {cores} cores" + (f" ({usable} usable)" * (usable != cores))
    mem = [line.split()[1] for line in _read("/proc/meminfo").splitlines() if line.startswith("MemTotal:")]
    if mem:
        cpu += f", {int(mem[0]) / 2**20:.0f} GiB memory"
    threads = torch.get_num_threads()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    gpu = ", ".join(f"{gpus.count(g)} x {g}" for g in sorted(set(gpus))) if gpus else "no GPU"
    return f"{cpu}; torch {torch.__version__}, {threads} torch thread{'s' * (threads != 1)}; {gpu}"


def _number(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def command_of(s: Suite) -> str:
    """The `tmrl bench` command that runs ``s`` alone (the scratch directory shown as <scratch>)."""
    size = f"--steps {s.size}" if s.kind == "pretrain" else f"--env-steps {s.size}"
    policy = f" --policy-config {s.policy_config}" if s.policy_config else ""
    rest = "".join(f" {o.replace('{scratch}', '<scratch>')}" for o in s.overrides)
    return f"tmrl bench {s.kind} --config {s.config}{policy} {size}{rest}"


def markdown(results: Sequence[tuple[Suite, list[Row]]], command: str, where: str, day: datetime.date) -> str:
    """ONE markdown table of every benchmark's rows, headed by the command, date and machine, followed by
    the command that runs each benchmark alone."""
    lines = [f"`{command}`, {day.isoformat()}. Machine: {where}.", ""]
    lines += ["| benchmark | what | value | unit | note |", "|---|---|---|---|---|"]
    for s, rows in results:
        for r in rows:
            lines.append(f"| {s.name} | {_cell(r.name)} | {_number(r.value)} | {r.unit} | {_cell(r.note)} |")
    lines += ["", *(f"- {s.name}: `{command_of(s)}`" for s, _ in results)]
    return "\n".join(lines) + "\n"


def bench_all(suite: Sequence[Suite], command: str = "tmrl bench all") -> tuple[str, list[str]]:
    """Run each benchmark of ``suite`` in turn (one that fails leaves a "failed" row, and the others still
    run); returns (the markdown table, the failures as "name: error")."""
    where, threads = machine(), torch.get_num_threads()
    results, failures = [], []
    with tempfile.TemporaryDirectory(prefix="tmrl-bench-") as scratch:
        for s in suite:
            overrides = [o.replace("{scratch}", scratch) for o in s.overrides]
            try:
                rows = KINDS[s.kind](s, overrides)
            except Exception as err:  # a broken benchmark must not lose the others' minutes of measurement
                rows = [Row("failed", float("nan"), "", f"{type(err).__name__}: {err}")]
                failures.append(f"{s.name}: {type(err).__name__}: {err}")
            finally:
                torch.set_num_threads(threads)  # bench_finetune sets its config's
            results.append((s, rows))
    return markdown(results, command, where, datetime.date.today()), failures
