"""`tmrl eval --from-run` end to end: a tiny pre-training run re-evaluated (success and Success@k per sigma
with intervals), a tiny fine-tuning run's agent evaluated deterministically and stochastically (with the
traces a video needs), both logged back to their run without changing its status; and its refusals."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from app.cli import main
from app.eval_run import eval_run
from tests.app.test_fit_e2e import tiny_overrides
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny pre-training run (with its fit-time zero-shot evaluation) and a tiny TMRL run from it, whose
    goal lies in its start cell: within 60 steps an untrained agent reaches it in some episodes only."""
    tmp = tmp_path_factory.mktemp("eval")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("TMRL_RUN_ID", raising=False)
        assert main(["fit", "--config", tiny_config("csp_state"), *tiny_overrides(tmp)]) == 0
        fit = MlflowClient(uri).search_runs(["1"])[0].info.run_id
        args = [
            "--config",
            tiny_config("tmrl"),
            "method=tmrl",
            "task.goal_ij=[1,1]",
            f"output_dir={tmp / 'ft'}",
        ]
        assert main(["finetune", "--from-run", fit, *args]) == 0
    runs = MlflowClient(uri).search_runs(["1"], filter_string="tags.`tmrl.stage` = 'finetune'")
    return tmp, uri, fit, runs[0].info.run_id


def _finetune(runs, method: str) -> str:
    tmp, uri, fit, _ = runs
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        args = [
            "--config",
            tiny_config("tmrl"),
            f"method={method}",
            "task.goal_ij=[1,1]",
            f"output_dir={tmp / method}",
        ]
        assert main(["finetune", "--from-run", fit, *args]) == 0
    query = f"tags.`tmrl.method` = '{method}'"
    return MlflowClient(uri).search_runs(["1"], filter_string=query)[0].info.run_id


def _table(client: MlflowClient, run_id: str, tmp) -> list[dict]:
    tmp.mkdir(parents=True, exist_ok=True)
    path = client.download_artifacts(run_id, "eval/table.csv", str(tmp))
    with open(path) as f:
        return list(csv.DictReader(f))


def test_eval_of_a_pretraining_run_logs_success_at_k_with_intervals(runs, tmp_path, capsys):
    tmp, uri, fit, _ = runs
    client = MlflowClient(uri)
    before = client.get_run(fit).info
    fit_step = client.get_metric_history(fit, "eval/success_sigma_0")[-1].step
    capsys.readouterr()
    args = ["--uri", uri, "--out", str(tmp_path / "ev"), "eval.sigmas=[0,0.5]", "eval.rollouts=2"]
    assert main(["eval", "--from-run", fit, *args]) == 0
    out = capsys.readouterr().out
    assert "sigma=0.5: success" in out and "10 episodes = 5 starts x 2 rollouts" in out
    assert "Success@2" in out and "5 x 2" in out  # the printed table

    after = client.get_run(fit)
    assert after.info.status == before.status == "FINISHED" and after.info.end_time == before.end_time
    metrics = after.data.metrics
    for sigma in ("0", "0.5"):
        for name in (
            f"eval/success_sigma_{sigma}",
            *(f"eval/success_at_k_sigma_{sigma}_k_{k}" for k in (1, 2)),
        ):
            low, value, high = (metrics[name + end] for end in ("_ci_low", "", "_ci_high"))
            assert 0 <= low <= value <= high <= 1
        assert (
            metrics[f"eval/success_at_k_sigma_{sigma}_k_1"] <= metrics[f"eval/success_at_k_sigma_{sigma}_k_2"]
        )
    # the re-evaluation is the latest value of the fit's own metric, logged at its step, the fit's kept
    history = client.get_metric_history(fit, "eval/success_sigma_0")
    assert len(history) == 2 and history[-1].step == fit_step

    rows = _table(client, fit, tmp_path / "dl")
    assert len(rows) == 2 * 3 and {r["metric"] for r in rows} <= set(metrics)
    for r in rows:
        assert float(r["value"]) == pytest.approx(metrics[r["metric"]])
        assert (r["states"], r["rollouts"]) == ("5", "2")
    files = {f.path for f in client.list_artifacts(fit, "eval")}
    assert {
        "eval/table.csv",
        "eval/success_at_k.png",
        "eval/eval_config.yaml",
        "eval/zero_shot_paths.png",
    } <= files
    assert (tmp_path / "ev" / "table.csv").is_file() and (
        tmp_path / "ev" / "success_at_k.png"
    ).stat().st_size > 0


def test_no_log_writes_the_table_but_logs_nothing(runs, tmp_path, capsys):
    tmp, uri, fit, _ = runs
    client = MlflowClient(uri)
    before = client.get_run(fit).data.metrics
    capsys.readouterr()
    args = ["--uri", uri, "--out", str(tmp_path / "ev"), "--no-log", "eval.sigmas=[1]"]
    assert main(["eval", "--from-run", fit, *args]) == 0
    assert "not logged (--no-log)" in capsys.readouterr().out
    with (tmp_path / "ev" / "table.csv").open() as f:
        metrics = [r["metric"] for r in csv.DictReader(f)]
    assert metrics == ["eval/success_sigma_1", "eval/success_at_k_sigma_1_k_1"]
    assert client.get_run(fit).data.metrics == before
    assert len(client.get_metric_history(fit, "eval/success_sigma_1")) == 1  # the fit's alone


def test_eval_of_a_finetuning_run_logs_both_agents_and_keeps_its_status(runs, tmp_path, capsys):
    tmp, uri, _, ft = runs
    client = MlflowClient(uri)
    before = client.get_run(ft)
    assert main(["eval", "--from-run", ft, "--uri", uri, "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "deterministic" in out and "stochastic" in out and "3 x 1" in out
    after = client.get_run(ft)
    assert (after.info.status, after.info.end_time) == (before.info.status, before.info.end_time)
    metrics = after.data.metrics
    for mode in ("deterministic", "stochastic"):
        name = f"eval/success_{mode}"
        assert 0 <= metrics[name + "_ci_low"] <= metrics[name] <= metrics[name + "_ci_high"] <= 1
        assert client.get_metric_history(ft, name)[-1].step >= 400  # at the checkpoint's env steps
    # the same agent on the same fixed, seeded episodes as the run's own final (sampling) evaluation
    assert metrics["eval/success_stochastic"] == pytest.approx(before.data.metrics["eval/success_rate"])
    assert 0 < metrics["eval/success_stochastic"] < 1  # (some episodes succeed, some do not)
    assert {r["metric"] for r in _table(client, ft, tmp_path / "dl")} == {
        "eval/success_deterministic",
        "eval/success_stochastic",
    }
    assert {"eval/table.csv", "eval/success.png"} <= {f.path for f in client.list_artifacts(ft, "eval")}


def test_a_finetuning_evaluation_traces_every_episode(runs, tmp_path):
    tmp, uri, _, ft = runs
    result = eval_run(uri, ft, [], tmp_path, log=False)  # its 3 episodes end at different steps
    assert result.stage == "finetune" and set(result.traces) == {"deterministic", "stochastic"}
    limit, h = 60, 4  # the tiny run's task.max_episode_steps and chunk.exec_horizon
    for mode, traces in result.traces.items():
        assert [t.episode for t in traces] == [0, 1, 2] and all(t.mode == mode for t in traces)
        row = next(r for r in result.table.rows if r.policy == mode)
        assert row.value == np.mean([t.success for t in traces])
        for t in traces:
            assert t.observations.shape == (t.steps + 1, 2) and t.goal.shape == (2,)
            assert t.steps == limit or (t.success and t.steps < limit)  # its first episode, to its end
            assert t.success == (np.linalg.norm(t.xy[-1] - t.goal) <= 1.0)  # the maze's success radius
            assert len(t.chunk_starts) == len(t.sigma_per_chunk) == math.ceil(t.steps / h)
            assert t.sigma_per_step.shape == (t.steps,) and np.all(
                (0 <= t.sigma_per_step) & (t.sigma_per_step <= 1)
            )
    det, sto = result.traces["deterministic"], result.traces["stochastic"]
    for a, b in zip(det, sto, strict=True):  # the same fixed episodes in both modes, acted on differently
        np.testing.assert_array_equal(a.observations[0], b.observations[0])
        np.testing.assert_array_equal(a.goal, b.goal)
    assert not np.array_equal(det[0].sigma_per_chunk, sto[0].sigma_per_chunk)
    assert not np.array_equal(det[0].observations[0], det[1].observations[0])


def test_a_raw_action_agent_is_evaluated_without_a_sigma(runs, tmp_path):
    _, uri, _, _ = runs
    sac = _finetune(runs, "sac")  # no base policy behind its actions, no sigma to choose
    result = eval_run(uri, sac, [], tmp_path, log=False)
    for traces in result.traces.values():
        assert len(traces) == 3 and all(
            t.sigma_per_chunk is None and t.sigma_per_step is None for t in traces
        )
    stochastic = next(r for r in result.table.rows if r.policy == "stochastic").value
    assert stochastic == pytest.approx(MlflowClient(uri).get_run(sac).data.metrics["eval/success_rate"])


def test_runs_that_cannot_be_evaluated_are_refused_naming_them(runs, capsys):
    tmp, uri, fit, _ = runs
    client = MlflowClient(uri)
    exp = client.get_run(fit).info.experiment_id
    other = client.create_run(exp, tags={"tmrl.stage": "bench"}).info.run_id
    assert main(["eval", "--from-run", other, "--uri", uri]) == 2
    err = capsys.readouterr().err
    assert other in err and "not a CSP pre-training run nor a fine-tuning run" in err and "'bench'" in err
    empty = client.create_run(exp, tags={"tmrl.stage": "finetune", "tmrl.pretrain_run_id": fit}).info.run_id
    assert main(["eval", "--from-run", empty, "--uri", uri]) == 2
    assert f"fine-tuning run {empty!r} has no config.yaml, agent checkpoint" in capsys.readouterr().err
    assert main(["eval", "--from-run", "0123456789abcdef", "--uri", uri]) == 2
    assert "'0123456789abcdef' does not exist" in capsys.readouterr().err


def _frames(path) -> np.ndarray:
    import imageio.v2 as imageio

    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        return np.stack(list(reader.iter_data()))
    finally:
        reader.close()


def test_a_pretraining_evaluation_films_a_success_and_a_failure_per_sigma(runs, tmp_path):
    _, uri, fit, _ = runs
    client = MlflowClient(uri)
    result = eval_run(uri, fit, ["eval.sigmas=[0,1]", "eval.rollouts=2"], tmp_path / "ev", videos=1)
    expected = []
    for sigma in (0, 1):  # one video per outcome that occurred at that sigma
        rate = result.table.metrics()[f"eval/success_sigma_{sigma}"]
        expected += [f"sigma_{sigma}" for ok in (rate > 0, rate < 1) if ok]
    names = sorted(p.name for p in result.videos)
    assert sorted(n.split("_state")[0] for n in names) == sorted(expected)
    assert all(("_success" in n) != ("_failure" in n) for n in names)
    logged = {f.path for f in client.list_artifacts(fit, "eval/videos")}
    assert {f"eval/videos/{n}" for n in names} == logged  # earlier evaluations' videos were replaced
    stale = tmp_path / "sigma_9_state_0_failure.mp4"  # as if an earlier evaluation had filmed sigma 9
    stale.write_bytes(b"old")
    client.log_artifact(fit, str(stale), "eval/videos")
    again = eval_run(uri, fit, ["eval.sigmas=[0]", "eval.rollouts=2"], tmp_path / "ev2", videos=1)
    logged = {f.path for f in client.list_artifacts(fit, "eval/videos")}
    assert logged == {f"eval/videos/{p.name}" for p in again.videos} and again.videos
    frames = _frames(result.videos[0])
    assert frames.shape[1:] == (128, 128, 3) and 1 < len(frames) <= 250  # no sigma strip: no agent chose
    assert eval_run(uri, fit, ["eval.sigmas=[0]"], tmp_path / "none", log=False, videos=0).videos == []
    with pytest.raises(ValueError, match="--videos -1"):
        eval_run(uri, fit, [], tmp_path / "bad", log=False, videos=-1)


def test_a_tmrl_agent_is_filmed_with_its_sigma_under_the_frames(runs, tmp_path, capsys):
    _, uri, _, ft = runs
    assert main(["eval", "--from-run", ft, "--uri", uri, "--out", str(tmp_path / "ev"), "--videos", "2"]) == 0
    assert "videos in videos/" in capsys.readouterr().out
    client = MlflowClient(uri)
    logged = sorted(f.path.rsplit("/", 1)[1] for f in client.list_artifacts(ft, "eval/videos"))
    for mode in ("deterministic", "stochastic"):  # 3 episodes: at most 2 per outcome, 3 in all
        mine = [n for n in logged if n.startswith(mode)]
        wins = sum("_success" in n for n in mine)
        assert 1 <= len(mine) <= 3 and wins <= 2 and len(mine) - wins <= 2, mine
    frames = _frames(tmp_path / "ev" / "videos" / logged[0])
    assert frames.shape[2:] == (128, 3) and frames.shape[1] > 128  # frame + strip
    strip = frames[:, 128:].astype(int)
    assert np.abs(strip[0] - strip[-1]).sum() > 0  # its cursor moves along the episode
