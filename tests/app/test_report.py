"""`tmrl report` on hand-made MLflow runs of known metric values (no training): the generated blocks hold
the right figures, prose stays byte for byte, twice gives the same bytes, errors are named and contained."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from app.cli import main
from app.report_blocks import FIGURE_KEY, _eval_table
from app.tracking import PRETRAIN_TAG, STAGE_TAG

T0 = 1_700_000_000_000  # ms
TMRL = {0: [0.3, 0.4, 0.2], 1: [0.3, 0.5, 0.3], 2: [0.3, 0.6, 1.0]}  # seed -> success at steps 0, 4998, 10000
DSRL = {0: [0.4, 0.45, 1.0], 1: [0.4, 0.45, 1.0]}
STEPS = [0, 4998, 10000]  # evaluations land a few steps off the 5k grid


def _log(client, run_id, metrics: dict[str, list[tuple[int, float]]], params: dict | None = None) -> None:
    items = [Metric(k, v, T0 + step, step) for k, points in metrics.items() for step, v in points]
    client.log_batch(run_id, metrics=items, params=[Param(k, str(v)) for k, v in (params or {}).items()])


def child(client, exp, parent, method, seed, success, env_steps=10000, minutes=7.0):
    start = T0 + 60_000 * (10 * seed + (method == "dsrl"))
    tags = {PRETRAIN_TAG: parent, "tmrl.method": method, "mlflow.parentRunId": parent, STAGE_TAG: "finetune"}
    run_id = client.create_run(exp, start_time=start, tags=tags, run_name=f"{method}-{seed}").info.run_id
    metrics = {
        "eval/success_rate": list(zip(STEPS, success, strict=True)),
        "eval/base_success_rate": [(0, 0.15)],
    }
    metrics["train/successes"] = [(5000, 4.0), (10000, 10.0 + seed + 10 * (method == "dsrl"))]
    if method == "tmrl":
        for q, shift in ((10, -0.01), (25, -0.005), (50, 0.0), (75, 0.005), (90, 0.01)):
            metrics[f"train/sigma_p{q}"] = [(1000, 0.02 + shift), (10000, 0.05 * (seed + 1) + shift)]
    params = {"seed": seed, "env_steps": env_steps, "threads": 1, "collect.workers": 1, "method": method}
    _log(client, run_id, metrics, params)
    # a resumed run evaluates a step again: the value logged last (a later timestamp) is the one that counts
    client.log_batch(run_id, metrics=[Metric("eval/success_rate", 0.99, T0 + STEPS[-1] - 1, STEPS[-1])])
    client.set_terminated(run_id, "FINISHED", end_time=start + int(minutes * 60_000))
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A pre-training run with zero-shot metrics and its fine-tuning runs: 3 tmrl and 2 dsrl seeds at 10k
    env steps, one tmrl run at another budget (filtered out)."""
    tmp = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("report")
    parent = client.create_run(exp, start_time=T0, run_name="fit", tags={STAGE_TAG: "pretrain"}).info.run_id
    zero = {"eval/success_sigma_0": 0.65, "eval/success_sigma_0.25": 0.75, "eval/success_sigma_1": 0.0}
    zero |= {"eval/success_sigma_0_ci_low": 0.45, "eval/success_sigma_0_ci_high": 0.85}
    zero |= {"eval/success_at_k_sigma_0_k_1": 0.5, "eval/success_at_k_sigma_0_k_1_ci_low": 0.3}
    zero |= {"eval/success_at_k_sigma_0_k_1_ci_high": 0.7, "eval/success_at_k_sigma_0_k_2": 0.8}
    zero |= {"eval/success_at_k_sigma_0_k_2_ci_low": 0.6, "eval/success_at_k_sigma_0_k_2_ci_high": 0.95}
    zero |= {"eval/success_at_k_sigma_0.25_k_1": 0.6, "train/loss": 0.1}
    params = {"seed": 0, "trainer.max_steps": 3000, "data.num_workers": 0}
    _log(client, parent, {k: [(3000, v)] for k, v in zero.items()}, params)
    client.set_terminated(parent, "FINISHED", end_time=T0 + 6 * 60_000)
    for seed, success in TMRL.items():
        child(client, exp, parent, "tmrl", seed, success)
    for seed, success in DSRL.items():
        child(client, exp, parent, "dsrl", seed, success, minutes=5.0)
    child(client, exp, parent, "tmrl", 7, [0.0, 0.0, 0.0], env_steps=20000)
    return uri, client, exp, parent


FILTER = "filter=\"params.env_steps = '10000'\""
TEMPLATE = """# Results

Prose that the report never touches: | a | b |, `code`, <!-- a comment -->, trailing spaces{sp}
and Windows line ends\r
<!-- tmrl report: curves parent={p} {f} figure=figures/curves.png title="target (a)" -->
stale text from the last time
<!-- /tmrl report -->

Between blocks.

<!-- tmrl report: success-at-k runs={p} labels="CSP, seed 0" -->
<!-- /tmrl report -->
<!-- tmrl report: zero-shot runs={p} -->
<!-- /tmrl report -->

<!-- tmrl report: sigma parent={p} {f} figure=figures/sigma.png -->
<!-- /tmrl report -->

<!-- tmrl report: runs parent={p} {f} -->
<!-- /tmrl report -->

<!-- tmrl report: bench file=bench.md -->
<!-- /tmrl report -->
The end, no newline"""
BENCH = "`tmrl bench all`, 2030-01-01.\n\n| benchmark | what | value | unit | note |\n|---|---|---|---|---|\n"


def doc(tmp_path: Path, parent: str, template: str = TEMPLATE) -> Path:
    (tmp_path / "bench.md").write_text(BENCH + "| pretrain-state | parameters | 38,242 | | |\n")
    path = tmp_path / "RESULTS.md"
    path.write_bytes(template.format(p=parent, f=FILTER, sp="   ").encode())
    return path


def block(path: Path, kind: str) -> list[str]:
    """The generated lines of the first block of ``kind``."""
    text = path.read_bytes().decode()
    m = re.search(rf"<!-- tmrl report: {kind} .*?-->\n(.*?)<!-- /tmrl report -->", text, re.S)
    assert m, f"no {kind} block"
    return m.group(1).splitlines()


def rows(lines: list[str]) -> list[list[str]]:
    """The cells of every markdown table row, the separator lines left out."""
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines if line.startswith("|")]
    return [c for c in cells if not set("".join(c)) <= set("-|")]


def prose(path: Path) -> str:
    """The file with every block's generated text cut out (markers kept)."""
    text = path.read_bytes().decode()
    return re.sub(r"(<!-- tmrl report: [^\n]*-->\n).*?(<!-- /tmrl report -->)", r"\1\2", text, flags=re.S)


def report(uri: str, path: Path, *extra: str) -> int:
    return main(["report", "--uri", uri, "--file", str(path), *extra])


def test_curves_block_holds_the_mean_and_an_interval_around_it(store, tmp_path):
    uri, _, _, parent = store
    path = doc(tmp_path, parent)
    assert report(uri, path) == 0
    lines = block(path, "curves")
    table = rows(lines)
    assert table[0] == ["env steps", "dsrl (2 seeds)", "tmrl (3 seeds)"]  # the 20k-budget run filtered out
    by_step = {r[0]: r[1:] for r in table[1:4]}
    assert by_step["0"] == ["40%", "30%"]  # seeds that agree: no interval
    assert by_step["10k"][0] == "100%"
    for step, expected in (("5k", 50), ("10k", 50)):  # tmrl: 0.4, 0.5, 0.6 (4998 binned to 5k); 0.2, 0.3, 1.0
        mean, low, high = map(int, re.fullmatch(r"(\d+)% \[(\d+), (\d+)\]", by_step[step][1]).groups())
        assert mean == expected and low <= mean <= high and low < high
        assert low >= 20 and high <= 100  # inside the seeds' range
    assert ["tmrl", "0, 1, 2", "20%, 30%, 100%", "10, 11, 12", "10,000"] in table
    assert ["dsrl", "0, 1", "100%, 100%", "20, 21", "10,000"] in table
    assert "The base policy alone on the same evaluation episodes (`eval/base_success_rate`): 15%." in lines
    assert "![target (a)](figures/curves.png)" in lines
    assert (
        f"The same runs: `tmrl compare --parent {parent} --filter \"params.env_steps = '10000'\"`." in lines
    )
    from PIL import Image

    with Image.open(tmp_path / "figures" / "curves.png") as image:
        assert len(image.text[FIGURE_KEY]) == 64  # the data's sha256


def test_success_at_k_and_zero_shot_tables_hold_the_logged_numbers(store, tmp_path):
    uri, _, _, parent = store
    path = doc(tmp_path, parent)
    assert report(uri, path) == 0
    table = rows(block(path, "success-at-k"))
    assert table[0] == ["policy", "sigma", "success", "Success@1", "Success@2"]
    assert table[1] == ["CSP, seed 0", "0", "65% [45, 85]", "50% [30, 70]", "80% [60, 95]"]
    assert table[2] == ["CSP, seed 0", "0.25", "75%", "60%", "-"]  # no interval logged; no @2
    assert table[3] == ["CSP, seed 0", "1", "0%", "-", "-"]
    zero = rows(block(path, "zero-shot"))
    assert zero == [
        ["policy", "sigma 0", "sigma 0.25", "sigma 1"],
        [f"fit ({parent[:8]})", "65% [45, 85]", "75%", "0%"],
    ]


def test_sigma_and_runs_blocks(store, tmp_path):
    uri, _, _, parent = store
    path = doc(tmp_path, parent)
    assert report(uri, path) == 0
    sigma = rows(block(path, "sigma"))
    assert [r[:2] + r[3:5] for r in sigma[1:]] == [
        ["tmrl", "0", "0.020", "0.050"], ["tmrl", "1", "0.020", "0.100"], ["tmrl", "2", "0.020", "0.150"]
    ]  # fmt: skip
    assert sigma[1][5] == "0.040-0.060 (p10-p90)"
    assert (tmp_path / "figures" / "sigma.png").stat().st_size > 1000
    runs = block(path, "runs")
    table = rows(runs)
    assert table[1][1:6] == ["pretrain", "-", "0", "3,000 training steps", "6.0 min"]
    assert [r[2:6] for r in table[2:]] == [
        ["dsrl", "0", "10,000 env steps", "5.0 min"], ["dsrl", "1", "10,000 env steps", "5.0 min"],
        *(["tmrl", str(s), "10,000 env steps", "7.0 min"] for s in range(3)),
    ]  # fmt: skip
    assert runs[-3].startswith(
        "Mean wall-clock per run (MLflow start to end): dsrl 5.0 min (2), pretrain 6.0"
    )
    ids = {(r[2], r[3]): r[0] for r in table[2:]}  # (method, seed) -> short id
    full = {r.info.run_id[:8]: r.info.run_id for r in store[1].search_runs([store[2]])}
    listed = f"{full[ids['tmrl', '2']]},{full[ids['dsrl', '1']]}"  # runs=: any order, sorted in the table
    path.write_text(f"<!-- tmrl report: runs runs={listed} -->\n<!-- /tmrl report -->\n")
    assert report(uri, path) == 0
    assert [r[2:4] for r in rows(block(path, "runs"))[1:]] == [["dsrl", "1"], ["tmrl", "2"]]


def test_bench_block_embeds_the_file_as_it_is(store, tmp_path):
    uri, _, _, parent = store
    path = doc(tmp_path, parent)
    assert report(uri, path) == 0
    assert block(path, "bench") == [
        "",
        *BENCH.splitlines(),
        "| pretrain-state | parameters | 38,242 | | |",
        "",
    ]


def test_twice_gives_the_same_bytes_and_leaves_the_prose_alone(store, tmp_path):
    uri, _, _, parent = store
    path = doc(tmp_path, parent)
    before = prose(path)
    assert "trailing spaces   \nand Windows line ends\r\n" in before and "stale text" not in before
    assert report(uri, path) == 0
    first, figure = path.read_bytes(), tmp_path / "figures" / "curves.png"
    drawn = (figure.read_bytes(), figure.stat().st_mtime_ns)
    assert prose(path) == before  # every byte outside the blocks, the CR LF and trailing spaces included
    assert b"stale text" not in first and first.endswith(b"The end, no newline")
    assert report(uri, path) == 0
    assert path.read_bytes() == first
    assert (figure.read_bytes(), figure.stat().st_mtime_ns) == drawn  # same data: not drawn again
    figure.unlink()  # a figure lost is drawn again, with the same bytes
    assert report(uri, path) == 0
    assert figure.read_bytes() == drawn[0]


def test_a_missing_run_leaves_an_error_line_and_exits_non_zero(store, tmp_path, capsys):
    uri, _, _, parent = store
    template = TEMPLATE.replace("sigma parent={p}", "sigma parent=0123456789abcdef")
    path = doc(tmp_path, parent, template)
    before = prose(path)
    assert report(uri, path) == 2
    err = capsys.readouterr().err
    assert "sigma block" in err and "'0123456789abcdef' not found" in err and "line 16" in err
    assert block(path, "sigma") == [
        "",
        "**tmrl report error:** run '0123456789abcdef' not found in the tracking store",
        "",
    ]
    assert prose(path) == before
    assert rows(block(path, "curves"))[0][0] == "env steps"  # the other blocks regenerated


def test_check_exits_1_when_the_file_would_change_and_writes_nothing(store, tmp_path, capsys):
    uri, _, _, parent = store
    path = doc(tmp_path, parent)
    stale = path.read_bytes()
    with pytest.raises(SystemExit) as exit_:
        report(uri, path, "--check")
    assert exit_.value.code == 1 and "out of date" in capsys.readouterr().err
    assert path.read_bytes() == stale and not (tmp_path / "figures").exists()
    assert report(uri, path) == 0
    assert report(uri, path, "--check") == 0  # fresh
    path.write_bytes(path.read_bytes().replace(b"| 38,242 |", b"| 38,000 |"))  # a hand edit inside a block
    with pytest.raises(SystemExit):
        report(uri, path, "--check")
    assert report(uri, path) == 0
    (tmp_path / "figures" / "sigma.png").unlink()
    with pytest.raises(SystemExit):  # a missing figure is stale too
        report(uri, path, "--check")


def test_a_figure_is_drawn_again_when_its_data_changed(store, tmp_path):
    uri, client, exp, parent = store
    f = "filter=\"params.env_steps = '30000'\""
    child(client, exp, parent, "dsrl", 5, [0.1, 0.2, 0.3], env_steps=30000)
    path = doc(
        tmp_path,
        parent,
        f"<!-- tmrl report: curves parent={{p}} {f} figure=c.png -->\n<!-- /tmrl report -->\n",
    )
    assert report(uri, path) == 0
    drawn = (tmp_path / "c.png").read_bytes()
    child(client, exp, parent, "dsrl", 6, [0.1, 0.9, 0.9], env_steps=30000)
    with pytest.raises(SystemExit):
        report(uri, path, "--check")
    assert report(uri, path) == 0
    assert (tmp_path / "c.png").read_bytes() != drawn
    assert "dsrl (2 seeds)" in path.read_text()


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("<!-- tmrl report: runs runs={p} -->\nno end\n", "line 1: the `tmrl report` block is not closed"),
        ("x\n<!-- /tmrl report -->\n", "line 2: `<!-- /tmrl report -->` closes no block"),
    ],
)
def test_a_broken_marker_is_refused_and_the_file_kept(store, tmp_path, capsys, template, message):
    uri, _, _, parent = store
    path = doc(tmp_path, parent, template)
    before = path.read_bytes()
    assert report(uri, path) == 2
    assert message in capsys.readouterr().err
    assert path.read_bytes() == before


def test_a_bad_argument_is_the_blocks_error(store, tmp_path, capsys):
    uri, _, _, parent = store
    path = doc(tmp_path, parent, "<!-- tmrl report: zero-shot run={p} -->\n<!-- /tmrl report -->\n")
    assert report(uri, path) == 2
    assert "argument 'run=" in capsys.readouterr().err
    assert "expected key=value with key one of ['labels', 'runs']" in path.read_text()


def test_eval_metric_names_are_read_by_pattern():
    """The current names (app/evaluation.py), the cube's older Success@k names and other metrics side by
    side: each lands in its (split, sigma, k) cell; the older names only where the current one is absent."""

    class Run:
        class data:  # noqa: N801
            metrics = {
                "eval/train/success_sigma_0.5": 0.4,
                "eval/train/success_at_2_sigma_0.5": 0.7,  # older name, no current one: used
                "eval/train/success_at_1_sigma_0.5": 0.1,  # older name beside a current one: ignored
                "eval/train/success_at_k_sigma_0.5_k_1": 0.3,
                "eval/train/success_at_k_sigma_0.5_k_1_ci_high": 0.5,
                "eval/success_rate": 0.9,
                "eval/base_success_rate": 0.2,
                "eval/success_deterministic": 0.8,
            }

    table = _eval_table(Run)
    assert list(table) == [("train", 0.5)]
    cell = table["train", 0.5]
    assert cell[None][0] == 0.4 and cell[2][0] == 0.7
    assert cell[1][:2] == (0.3, pytest.approx(float("nan"), nan_ok=True)) and cell[1][2] == 0.5


def test_the_report_file_must_exist(store, tmp_path, capsys):
    uri, _, _, _ = store
    assert report(uri, tmp_path / "missing.md") == 2
    assert "no such report" in capsys.readouterr().err
    path = doc(tmp_path, "x")
    assert main(["report", "--uri", f"sqlite:///{tmp_path / 'typo.db'}", "--file", str(path)]) == 2
    assert "no tracking store at" in capsys.readouterr().err
    assert not (tmp_path / "typo.db").exists()  # not created empty


def test_an_exported_store_reproduces_the_report_with_fewer_metrics(store, tmp_path, capsys):
    uri, client, _, parent = store
    path = doc(tmp_path, parent)
    assert report(uri, path) == 0
    from_source = path.read_bytes()
    source_file = Path(uri[len("sqlite:///") :])
    source_bytes = source_file.read_bytes()
    dst = tmp_path / "evidence" / "mlflow.db"
    assert report(uri, path, "--export", str(dst)) == 0
    n = len(client.search_runs([client.get_run(parent).info.experiment_id]))
    assert re.search(rf"exported {n} runs .*: \d+ of \d+ metric rows kept", capsys.readouterr().out)
    assert path.read_bytes() == from_source and source_file.read_bytes() == source_bytes
    assert report(f"sqlite:///{dst}", path, "--check") == 0  # the committed copy reproduces it
    copy = MlflowClient(f"sqlite:///{dst}")
    assert "train/loss" in client.get_run(parent).data.metrics
    kept = copy.get_run(parent).data
    assert "train/loss" not in kept.metrics and kept.metrics["eval/success_sigma_0"] == 0.65
    assert kept.params == client.get_run(parent).data.params


def test_thin_keeps_the_ends_evenly_spaced_and_is_idempotent():
    from app.report_store import thin

    assert list(thin(5, most=10)) == [0, 1, 2, 3, 4]
    idx = thin(1000, most=60)
    assert len(idx) == 60 and idx[0] == 0 and idx[-1] == 999 and (np.diff(idx) >= 16).all()
    assert list(thin(len(idx), most=60)) == list(range(60))  # a thinned series is kept whole


def test_an_export_thins_long_training_series_to_the_points_the_report_reads(tmp_path):
    """A run with 500 logged training steps (each logged twice: the later value counts) and 500 evaluations:
    the copy keeps 60 training points, first and last among them, every evaluation, and gives the same
    report, sigma figure included."""
    from app.report_store import TRAIN_POINTS

    uri = f"sqlite:///{tmp_path / 'src.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("thin")
    parent = client.create_run(exp, start_time=T0, tags={STAGE_TAG: "pretrain"}).info.run_id
    tags = {PRETRAIN_TAG: parent, "tmrl.method": "tmrl", "mlflow.parentRunId": parent, STAGE_TAG: "finetune"}
    run = client.create_run(exp, start_time=T0, tags=tags).info.run_id
    steps = range(0, 50_000, 100)
    metrics = [Metric("eval/success_rate", (i % 7) / 7, T0 + i, step) for i, step in enumerate(steps)]
    for q in (25, 50, 75):
        metrics += [
            Metric(f"train/sigma_p{q}", q / 100 + i / 1e4, T0 + i, step) for i, step in enumerate(steps)
        ]
        metrics += [
            Metric(f"train/sigma_p{q}", q / 100 + i / 1e3, T0 + i + 1, step) for i, step in enumerate(steps)
        ]
    metrics += [Metric("train/successes", float(i), T0 + i, step) for i, step in enumerate(steps)]
    for start in range(0, len(metrics), 1000):
        client.log_batch(
            run, metrics=metrics[start : start + 1000], params=[] if start else [Param("seed", "0")]
        )
    client.set_terminated(run)
    path = tmp_path / "RESULTS.md"
    path.write_text(
        f"<!-- tmrl report: sigma runs={run} figure=figures/sigma.png -->\n<!-- /tmrl report -->\n"
        f"<!-- tmrl report: curves parent={parent} figure=figures/curves.png -->\n<!-- /tmrl report -->\n"
    )
    assert report(uri, path) == 0
    dst = tmp_path / "copy.db"
    assert report(uri, path, "--export", str(dst)) == 0
    copy = MlflowClient(f"sqlite:///{dst}")
    sigma = [(m.step, m.value) for m in copy.get_metric_history(run, "train/sigma_p50")]
    assert len(sigma) == TRAIN_POINTS and min(sigma)[0] == 0 and max(sigma)[0] == 49_900
    assert dict(sigma)[49_900] == pytest.approx(0.5 + 499 / 1e3)  # the step's later value
    assert len(copy.get_metric_history(run, "train/successes")) == TRAIN_POINTS
    assert len(copy.get_metric_history(run, "eval/success_rate")) == len(steps)
    assert report(f"sqlite:///{dst}", path, "--check") == 0


def test_a_bad_export_is_refused_and_leaves_the_file(store, tmp_path, capsys):
    uri, _, _, parent = store
    path = doc(tmp_path, parent)
    assert report(uri, path, "--export", uri[len("sqlite:///") :]) == 2
    assert "is the source store itself" in capsys.readouterr().err
    dst = tmp_path / "keep.db"
    dst.write_bytes(b"mine")
    absent = f"sqlite:///{tmp_path / 'absent.db'}"
    assert main(["report", "--uri", absent, "--file", str(path), "--export", str(dst)]) == 2
    assert "no tracking store at" in capsys.readouterr().err and dst.read_bytes() == b"mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export")] == []


def test_the_committed_report_is_what_its_committed_evidence_store_gives(tmp_path):
    """docs/RESULTS.md's regenerated blocks match docs/evidence/mlflow.db (read from a copy: the check opens
    the store with MLflow, which may migrate or touch it)."""
    root = Path(__file__).resolve().parents[2]
    store = tmp_path / "mlflow.db"
    store.write_bytes((root / "docs" / "evidence" / "mlflow.db").read_bytes())
    assert report(f"sqlite:///{store}", root / "docs" / "RESULTS.md", "--check") == 0
