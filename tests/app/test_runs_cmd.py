"""What a user meets in MLflow: `tmrl runs`, `tmrl compare ID ...`, `tmrl ui`'s link, run names and the
demonstration store as a dataset input. Runs are built by hand in a sqlite store (no training) except in
the one end-to-end test, which checks that a real fit and fine-tuning log their names and dataset."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from app import tracking
from app.cli import main
from app.compare import PLOT, TABLE, compare
from app.config import load_config
from app.finetune import FinetuneConfig
from app.finetune import run_name as finetune_name
from app.pretrain import run_name as fit_name
from app.schema import FitConfig
from tests.tiny import tiny_config

# (method, seed, eval/success_rate at env steps 0, 5000, 10000)
CHILDREN_A = [("tmrl", 1, [0.2, 0.6, 0.5]), ("dsrl", 0, [0.2, 0.3, 0.25]), ("tmrl", 0, [0.2, 0.8, 1.0])]
CHILDREN_B = [("tmrl", 0, [0.0, 0.1, 0.2])]


def _fit(client: MlflowClient, exp: str, name: str, zero_shot: float) -> str:
    run = client.create_run(exp, run_name=name, tags={tracking.STAGE_TAG: "pretrain"})
    tracking.log_params(client, run.info.run_id, {"seed": 0})
    client.log_metric(run.info.run_id, "eval/success_sigma_0", zero_shot)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _child(client: MlflowClient, exp: str, parent: str, method: str, seed: int, values: list[float]) -> str:
    tags = {tracking.STAGE_TAG: "finetune", tracking.PRETRAIN_TAG: parent, "tmrl.method": method}
    run = client.create_run(exp, run_name=f"{method} s{seed}", tags={**tags, "mlflow.parentRunId": parent})
    run_id = run.info.run_id
    tracking.log_params(client, run_id, {"seed": seed, "env_steps": 10000, "method": method})
    for step, value in zip((0, 5000, 10000), values, strict=True):
        tracking.log_metrics(
            client, run_id, {"eval/success_rate": value, "train/successes": step // 5000}, step
        )
    client.log_metric(run_id, "eval/base_success_rate", 0.2, step=0)
    client.set_terminated(run_id)
    return run_id


@pytest.fixture
def hand_store(mlflow_uri, tmp_path):
    """Experiment "tmrl": fit A with three children, fit B with one, and a child whose parent is gone."""
    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("tmrl", artifact_location=(tmp_path / "artifacts").as_uri())
    a = _fit(client, exp, "fit A", 0.25)
    b = _fit(client, exp, "fit B", 0.0)
    kids_a = [_child(client, exp, a, *c) for c in CHILDREN_A]
    kids_b = [_child(client, exp, b, *c) for c in CHILDREN_B]
    orphan = _child(client, exp, "0" * 32, "sac", 3, [0.0, 0.0, 0.0])
    return client, exp, a, b, kids_a, kids_b, orphan


def _row(lines: list[str], run_id: str) -> tuple[int, list[str]]:
    (i,) = [i for i, line in enumerate(lines) if run_id in line]
    return i, lines[i].split()


def test_runs_lists_each_fit_with_its_finetuning_runs_beneath(hand_store, capsys):
    client, exp, a, b, kids_a, kids_b, orphan = hand_store
    assert main(["runs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "2 pre-training runs, 5 fine-tuning runs" in lines[0]
    ia, fit_a = _row(lines, a)
    ib, _ = _row(lines, b)
    assert ib < ia  # newest fit first
    assert fit_a[1:3] == ["fit", "0"] and fit_a[4:6] == ["25%", "FINISHED"] and lines[ia].endswith("fit A")
    # A's children right beneath it, indented, by method then seed: dsrl 0, tmrl 0, tmrl 1
    order = [_row(lines, kids_a[i])[0] for i in (1, 2, 0)]
    assert order == [ia + 1, ia + 2, ia + 3] and all(lines[i].startswith("  ") for i in order)
    _, tmrl0 = _row(lines, kids_a[2])
    assert tmrl0[1:6] == ["tmrl", "0", "10000/10000", "100%", "FINISHED"] and lines[ia + 2].endswith(
        "tmrl s0"
    )
    assert _row(lines, kids_b[0])[0] == ib + 1
    io, _ = _row(lines, orphan)
    assert "not in this experiment" in lines[io - 1] and io > max(ia, ib) + 1


def test_runs_shows_a_split_evaluated_fit_as_train_over_heldout(mlflow_uri, tmp_path, capsys):
    """The cube's fit logs eval/<split>/success_sigma_0, not eval/success_sigma_0: both splits are shown."""
    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("tmrl", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(exp, run_name="cube fit", tags={tracking.STAGE_TAG: "pretrain"})
    client.log_metric(run.info.run_id, "eval/train/success_sigma_0", 0.5)
    client.log_metric(run.info.run_id, "eval/heldout/success_sigma_0", 0.125)
    half = client.create_run(exp, run_name="train only", tags={tracking.STAGE_TAG: "pretrain"})
    client.log_metric(half.info.run_id, "eval/train/success_sigma_0", 1.0)
    assert main(["runs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert _row(lines, run.info.run_id)[1][4] == "50%/12%"
    assert _row(lines, half.info.run_id)[1][4] == "100%/-"
    assert "train/heldout" in lines[-2]


def test_runs_flags_a_running_run_that_stopped_logging(mlflow_uri, tmp_path, capsys):
    """A SIGKILLed run stays RUNNING in MLflow: one with nothing logged for over an hour is shown RUNNING?."""
    import time

    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("tmrl", artifact_location=(tmp_path / "artifacts").as_uri())
    now = int(time.time() * 1000)
    fit = _fit(client, exp, "fit", 0.5)
    tags = {tracking.STAGE_TAG: "finetune", tracking.PRETRAIN_TAG: fit, "tmrl.method": "tmrl"}
    gone = client.create_run(exp, start_time=now - 3 * 3600_000, run_name="gone", tags=tags).info.run_id
    client.log_metric(gone, "train/successes", 3.0, timestamp=now - 2 * 3600_000, step=100)
    alive = client.create_run(exp, start_time=now - 3 * 3600_000, run_name="alive", tags=tags).info.run_id
    client.log_metric(alive, "train/successes", 3.0, timestamp=now - 60_000, step=100)
    assert main(["runs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert _row(lines, gone)[1][5] == "RUNNING?" and _row(lines, alive)[1][5] == "RUNNING"
    assert any(line.startswith("RUNNING?: nothing logged for over 60 min") for line in lines)


def test_runs_says_what_is_missing(hand_store, tmp_path, capsys):
    client = hand_store[0]
    assert main(["runs", "--experiment", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no experiment 'nope'" in err and "'tmrl'" in err and "Default" in err
    client.create_experiment("empty", artifact_location=(tmp_path / "e").as_uri())
    assert main(["runs", "--experiment", "empty"]) == 0
    out = capsys.readouterr().out
    assert "experiment 'empty'" in out and "has no runs yet" in out
    missing = tmp_path / "elsewhere" / "mlflow.db"
    assert main(["runs", "--uri", f"sqlite:///{missing}"]) == 2
    assert "no tracking store at" in capsys.readouterr().err and not missing.exists()  # none created


def test_compare_ids_of_one_parent_logs_plot_and_table_on_it(hand_store, capsys):
    client, exp, a, b, kids_a, kids_b, orphan = hand_store
    uri = client.tracking_uri
    summary = compare(uri, run_ids=kids_a)
    assert set(summary) == {"tmrl", "dsrl"}
    assert summary["tmrl"][0] == pytest.approx(0.75) and summary["tmrl"][2] == 2  # finals 1.0 and 0.5
    assert summary["dsrl"] == pytest.approx((0.25, 0.0, 1))
    out = capsys.readouterr().out
    assert "base policy alone on the same evaluation episodes: 20.0%" in out and PLOT in out
    files = {f.path for f in client.list_artifacts(a, "compare")}
    assert files == {PLOT, TABLE} and not client.list_artifacts(b)
    table = client.download_artifacts(a, TABLE)
    text = open(table).read()
    assert all(k in text for k in kids_a) and "eval success per method" in text
    # a filter narrows the given runs
    assert main(["compare", *kids_a, "--filter", "tags.`tmrl.method` = 'dsrl'"]) == 0
    out = capsys.readouterr().out
    assert "dsrl " in out and "tmrl " not in out
    # --parent still picks every child
    assert set(compare(uri, parent=a)) == {"tmrl", "dsrl"}


def test_compare_across_parents_splits_groups_and_saves_locally(hand_store, tmp_path, monkeypatch, capsys):
    client, exp, a, b, kids_a, kids_b, orphan = hand_store
    monkeypatch.chdir(tmp_path)
    summary = compare(client.tracking_uri, run_ids=[kids_a[2], kids_b[0]])
    assert set(summary) == {f"tmrl @{a[:8]}", f"tmrl @{b[:8]}"}
    assert summary[f"tmrl @{b[:8]}"][0] == pytest.approx(0.2)
    out = capsys.readouterr().out
    assert "nothing logged" in out and "base policy alone" not in out  # two bases: no single dashed line
    assert not client.list_artifacts(a, "compare") and not client.list_artifacts(b, "compare")
    assert (tmp_path / "success_vs_env_steps.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["compare", kids_a[0], kids_b[0], "--out", str(tmp_path / "figs" / "x.png")]) == 0
    assert (tmp_path / "figs" / "x.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_refuses_what_it_cannot_compare(hand_store, capsys):
    client, exp, a, b, kids_a, kids_b, orphan = hand_store
    cases = [
        ([kids_a[0], "f" * 32], f"run {'f' * 32!r} does not exist"),
        ([kids_a[0], a], "is a pre-training run, not a fine-tuning one"),
        ([kids_a[0], "--parent", a], "not both"),
        ([], "give either"),
        (["--parent", kids_a[0]], "is not a pre-training run"),
    ]
    for args, message in cases:
        assert main(["compare", *args]) == 2, args
        assert message in capsys.readouterr().err, args
    assert main(["compare", a]) == 2
    assert f"--parent {a}" in capsys.readouterr().err  # says how to compare a fit's children


def test_ui_prints_the_runs_page_of_the_experiment(hand_store, monkeypatch, capsys):
    client, exp = hand_store[:2]
    started = []
    monkeypatch.setattr("os.execv", lambda path, cmd: started.append(cmd))
    assert main(["ui", "--port", "5055"]) == 0
    out = capsys.readouterr().out
    assert f"http://127.0.0.1:5055/#/experiments/{exp}/runs?workflowType=machine_learning" in out
    cmd = started[0]
    assert cmd[cmd.index("--backend-store-uri") + 1] == client.tracking_uri and "5055" in cmd
    assert main(["ui", "--experiment", "other"]) == 0
    assert "no experiment 'other'" in capsys.readouterr().out


def test_run_names_say_stage_target_method_and_seed(mlflow_uri, tmp_path):
    fit = load_config(FitConfig, "configs/quickstart.yaml", ["seed=3"])
    assert fit_name(fit) == "fit pointmaze-large seed 3"
    names = {
        ("tmrl_pointmaze.yaml", "seed=2"): "finetune tmrl pointmaze-large task 1 seed 2",
        ("tmrl_pointmaze_a.yaml", "method=sac"): "finetune sac pointmaze-large from 1,4 to 7,6 seed 0",
        ("tmrl_pointmaze.yaml", "task.goal_ij=[7,6]"): "finetune tmrl pointmaze-large task 1 to 7,6 seed 0",
        ("tmrl_cube.yaml", "method=dsrl"): "finetune dsrl cube-single heldout seed 0",
    }
    for (config, override), name in names.items():
        assert finetune_name(load_config(FinetuneConfig, f"configs/{config}", [override])) == name
    cfg = tracking.TrackingConfig(artifact_location=str(tmp_path / "a"))
    client, run_id = tracking.start_run(cfg, "pretrain", name="fit x seed 0")
    assert client.get_run(run_id).info.run_name == "fit x seed 0"
    cfg.run_name = "mine"  # tracking.run_name wins over the default
    client, run_id = tracking.start_run(cfg, "pretrain", name="fit x seed 0")
    assert client.get_run(run_id).info.run_name == "mine"


def test_the_episode_store_is_a_dataset_input(synthetic_store, mlflow_uri, tmp_path):
    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    fit, child = (client.create_run(exp).info.run_id for _ in range(2))
    tracking.log_dataset(client, fit, synthetic_store)
    (given,) = client.get_run(fit).inputs.dataset_inputs
    data = given.dataset
    assert data.name == "synthetic.zarr" and data.digest == synthetic_store.fingerprint[:36]
    assert json.loads(data.source) == {"uri": str(synthetic_store.path.resolve())}
    assert json.loads(data.profile) == {"episodes": 6, "steps": 220, "env": "synthetic"}
    features = json.loads(json.loads(data.schema)["mlflow_tensorspec"]["features"])
    assert {f["name"]: f["tensor-spec"]["shape"] for f in features} == {
        "observation": [-1, 3],
        "action": [-1, 2],
    }
    assert [(t.key, t.value) for t in given.tags] == [("mlflow.data.context", "training")]
    tracking.copy_datasets(client, fit, child, context="pre-training")
    (copied,) = client.get_run(child).inputs.dataset_inputs
    assert copied.dataset.digest == data.digest and copied.tags[0].value == "pre-training"


def test_fit_and_finetune_runs_carry_names_and_the_dataset(mlflow_uri, tmp_path, capsys):
    """End to end (tiny): the names and dataset inputs a real fit and fine-tuning log."""
    fit_args = [f"data.path={tmp_path / 'demos.zarr'}", f"output_dir={tmp_path}", "eval.enabled=false"]
    fit_args.append(f"tracking.artifact_location={tmp_path / 'artifacts'}")
    assert main(["fit", "--config", tiny_config("csp_state"), *fit_args]) == 0
    parent = capsys.readouterr().out.strip().splitlines()[-1].split("=", 1)[1]
    ft = ["finetune", "--from-run", parent, "--config", tiny_config("tmrl"), "method=dsrl", "seed=4"]
    assert main([*ft, f"output_dir={tmp_path}"]) == 0
    child = capsys.readouterr().out.strip().splitlines()[-1].split("=", 1)[1]
    client = MlflowClient(mlflow_uri)
    fit_run, ft_run = client.get_run(parent), client.get_run(child)
    env = fit_run.data.params["demos.env"]
    assert fit_run.info.run_name == f"fit {env} seed 0"
    assert ft_run.info.run_name == f"finetune dsrl {ft_run.data.params['task.env']} task 1 seed 4"
    (data,) = [i.dataset for i in fit_run.inputs.dataset_inputs]
    assert data.name == "demos.zarr" and data.digest == fit_run.data.tags[tracking.DATASET_TAG][:36]
    assert [i.dataset.digest for i in ft_run.inputs.dataset_inputs] == [data.digest]
    assert main(["compare", child]) == 0  # the child's plot lands on its parent
    assert {f.path for f in client.list_artifacts(parent, "compare")} == {PLOT, TABLE}
