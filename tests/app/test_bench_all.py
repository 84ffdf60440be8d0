"""`tmrl bench` (all): every benchmark of SUITE as rows of one markdown table, with the machine and the date.
At test size (the shipped configs shrunk by tests/tiny.py); the figures themselves are never asserted."""

from __future__ import annotations

import dataclasses
import datetime
import re

import pytest
import torch

from app import bench_suite as bench
from app.cli import build_parser, cmd_bench, cmd_bench_all, main
from tests.tiny import BASES, tiny_config

SIZES = {"pretrain": 2, "finetune": 16}  # timed steps per loop / env steps of the timed loop
ROWS = {  # what every benchmark of a kind reports
    "pretrain": [
        "parameters", "forward FLOPs per sample", "training, bare PyTorch loop", "training, Lightning",
        "data loader", "chunk sampling, batch 1", "chunk sampling, batch 64",
    ],
    "finetune": ["environment alone", "chunk sampling alone", "floor (all)", "full loop", "SAC updates"],
}  # fmt: skip
SENSOR = [  # fine-tuning with a sensor (cube point clouds, maze camera frames) reports its cost as well
    "sensor alone", "the sensor's share of a fine-tuning env step", "context encoder alone",
    "the context encoder's share of a fine-tuning env step",
]  # fmt: skip


def tiny_suite() -> tuple[bench.Suite, ...]:
    """SUITE on the test-size configs; their own few demonstrations (only the scratch data path kept)."""
    tiny = {f"configs/{file}": tiny_config(name) for name, file in BASES.items()}
    return tuple(
        dataclasses.replace(
            s,
            config=tiny[s.config],  # a benchmark without a test-size config fails here
            policy_config=tiny[s.policy_config] if s.policy_config else "",
            size=SIZES[s.kind],
            overrides=tuple(o for o in s.overrides if o.startswith("data.path=")),
        )
        for s in bench.SUITE
    )


def table_rows(text: str) -> dict[str, list[list[str]]]:
    """{benchmark: [[what, value, unit, note], ...]} from the markdown table."""
    out: dict[str, list[list[str]]] = {}
    for line in text.splitlines()[4:]:
        if line.startswith("| "):
            name, *cells = [c.strip() for c in line.strip("|").split(" | ")]
            out.setdefault(name, []).append(cells)
    return out


def test_bench_alone_writes_every_benchmarks_rows_in_one_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    monkeypatch.setattr(bench, "SUITE", tiny_suite())
    out = tmp_path / "bench" / "table.md"
    assert main(["bench", "--out", str(out)]) == 0
    text = out.read_text()
    head = text.splitlines()[0]
    assert head.startswith(f"`tmrl bench all`, {datetime.date.today().isoformat()}. Machine: ")
    assert f"torch {torch.__version__}" in head and " cores" in head and ("GPU" in head)
    assert text.splitlines()[2] == "| benchmark | what | value | unit | note |"
    assert text.count("| benchmark |") == 1  # ONE table
    rows = table_rows(text)
    assert list(rows) == [s.name for s in bench.SUITE]
    for s in bench.SUITE:
        expected = ROWS[s.kind] + (SENSOR if s.name in ("finetune-cube", "finetune-image") else [])
        assert sorted(r[0] for r in rows[s.name]) == sorted(expected), s.name
        for what, value, *_ in rows[s.name]:
            assert re.fullmatch(r"-|-?[\d,]+(\.\d+)?(e[-+]\d+)?", value), (s.name, what, value)
        assert f"- {s.name}: `tmrl bench {s.kind} --config " in text  # the command of each alone
    assert "table written to" in capsys.readouterr().out


def test_a_failing_benchmark_leaves_its_row_and_the_others_run(tmp_path, monkeypatch, capsys):
    def fake(s, overrides):
        torch.set_num_threads(threads + 1)  # as bench_finetune sets its config's
        return [bench.Row("x", 1234.5, "u/s", "a | b")]

    threads = torch.get_num_threads()
    monkeypatch.setitem(bench.KINDS, "fake", fake)
    suite = (
        bench.Suite("broken", "pretrain", str(tmp_path / "missing.yaml"), 1),
        bench.Suite("ok", "fake", "", 1),
    )
    monkeypatch.setattr(bench, "SUITE", suite)
    out = tmp_path / "t.md"
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "all", "--out", str(out)])
    assert exit_.value.code == 1
    assert "broken: " in capsys.readouterr().err
    rows = table_rows(out.read_text())
    assert rows["broken"][0][:2] == ["failed", "-"] and "missing.yaml" in rows["broken"][0][3]
    assert rows["ok"] == [["x", "1,234", "u/s", "a \\| b"]]  # the note's pipe escaped
    assert torch.get_num_threads() == threads  # each benchmark starts from the same threads


def test_the_bench_command_line(tmp_path):
    parse = build_parser().parse_args
    assert parse(["bench"]).func is cmd_bench_all and parse(["bench"]).only == []
    assert parse(["bench", "--out", "f.md", "all"]).out == "f.md"  # kept through `all`
    args = parse(["bench", "all", "--out", "g.md", "--only", "pretrain-state", "finetune-cube"])
    assert (args.func, args.out, args.only) == (cmd_bench_all, "g.md", ["pretrain-state", "finetune-cube"])
    assert parse(["bench", "pretrain", "--steps", "3"]).func is cmd_bench
    assert [s.name for s in bench.select(["finetune-cube", "pretrain-state"])] == [
        "pretrain-state",
        "finetune-cube",
    ]
    with pytest.raises(ValueError, match="--only nope: no such benchmark"):
        bench.select(["nope"])
    assert main(["bench", "--only", "nope"]) == 2


def test_the_cpu_is_named_from_proc_cpuinfo():
    x86 = (
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6338\nflags\t: fpu\n"
    )
    arm = "processor\t: 0\nBogoMIPS\t: 108.00\n\nHardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B\n"
    assert bench.cpu_model(x86 + x86) == "Intel(R) Xeon(R) Gold 6338"
    assert bench.cpu_model(arm) == "Raspberry Pi 4 Model B"
    assert bench.cpu_model("") != ""
    assert [bench._number(v) for v in (38242.0, 12.34, 0.51234, float("nan"), float("inf"))] == [
        "38,242", "12.3", "0.512", "-", "-"
    ]  # fmt: skip
