"""`tmrl finetune` end to end on a tiny budget, its refusals, and what one update may and may not change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from tensordict.nn import TensorDictModule

from app.cli import main
from app.config import load_config
from app.envs.torchrl_envs import make_chunk_env
from app.finetune import FinetuneConfig, make_collector
from modules.nets.keys import ACTION, GOAL, OBS
from modules.nets.policy import CSPPolicy, PolicyConfig
from modules.tmrl.agent import ActorPolicy, head_specs, make_agent
from modules.tmrl.loss import make_optimizers, update
from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[2]
TINY_FIT = tiny_config("csp_state")
TINY_FT = tiny_config("tmrl")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """One tiny pre-training run (pointmaze-medium) in a module-wide sqlite store."""
    tmp = tmp_path_factory.mktemp("pretrain")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        mp.delenv("TMRL_RUN_ID", raising=False)
        args = [f"data.path={tmp / 'demos.zarr'}", f"output_dir={tmp / 'runs'}", "eval.enabled=false",
                f"tracking.artifact_location={tmp / 'artifacts'}"]  # fmt: skip
        assert main(["fit", "--config", TINY_FIT, *args]) == 0
    runs = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").search_runs(["1"])
    return tmp, runs[0].info.run_id


@pytest.fixture
def store(pretrained, monkeypatch):
    tmp, run_id = pretrained
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri, run_id


@pytest.mark.parametrize("method", ["tmrl", "dsrl", "fixed_sigma", "sac", "rlpd"])
def test_finetune_runs_nested_under_its_pretraining_run(store, tmp_path, capsys, method):
    uri, parent = store
    args = [
        "finetune",
        "--from-run",
        parent,
        "--config",
        TINY_FT,
        f"method={method}",
        f"output_dir={tmp_path}",
    ]
    assert main(args) == 0
    run_id = capsys.readouterr().out.strip().splitlines()[-1].split("=", 1)[1]
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["tmrl.pretrain_run_id"] == parent
    assert run.data.tags["tmrl.stage"] == "finetune" and run.data.params["method"] == method
    assert "eval/success_rate" in run.data.metrics and "train/loss_qvalue" in run.data.metrics
    assert "train/successes" in run.data.metrics
    history = MlflowClient(uri).get_metric_history(run_id, "eval/success_rate")
    assert max(m.step for m in history) >= 400  # logged against real environment steps
    files = {f.path for f in MlflowClient(uri).list_artifacts(run_id, "checkpoints")}
    assert {"checkpoints/agent_final.pt", "checkpoints/agent_last.pt"} <= files
    plots = {f.path for f in MlflowClient(uri).list_artifacts(run_id, "plots")}
    assert ("plots/sigma_trace.png" in plots) == (method == "tmrl")
    assert ("plots/sigma_over_finetuning.png" in plots) == (method == "tmrl")
    ckpt = torch.load(tmp_path / run_id / "checkpoints" / "agent_final.pt", weights_only=True)
    assert {"version", "loss", "optimizers", "counters", "rng", "replay_size"} <= set(ckpt)
    assert ckpt["counters"]["env_steps"] >= 400
    assert set(ckpt["optimizers"]) == {"actor", "critic", "alpha"}


def test_unknown_run_is_refused(store, capsys):
    assert main(["finetune", "--from-run", "feedfacefeedface", "--config", TINY_FT]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_negative_worker_count_is_refused(store, capsys):
    _, parent = store
    assert main(["finetune", "--from-run", parent, "--config", TINY_FT, "collect.workers=-1"]) == 2
    assert "collect.workers must be >= 0, got -1" in capsys.readouterr().err


def test_a_finetuning_run_is_not_a_pretraining_run(store, tmp_path, capsys):
    uri, parent = store
    assert main(["finetune", "--from-run", parent, "--config", TINY_FT, f"output_dir={tmp_path}"]) == 0
    child = capsys.readouterr().out.strip().splitlines()[-1].split("=", 1)[1]
    assert main(["finetune", "--from-run", child, "--config", TINY_FT]) == 2
    assert "not a CSP pre-training run" in capsys.readouterr().err


def test_a_policy_that_does_not_fit_the_env_is_refused(store, tmp_path, capsys):
    uri, parent = store
    client = MlflowClient(uri)
    run = client.create_run(client.get_run(parent).info.experiment_id, tags={"tmrl.stage": "pretrain"})
    policy = CSPPolicy(
        PolicyConfig(chunk_len=4, width=32, depth=1, heads=2), obs_dim=5, action_dim=2, goal_dim=2
    )
    policy.save(tmp_path / "policy.pt")
    client.log_artifact(run.info.run_id, str(tmp_path / "policy.pt"), "checkpoints")
    client.log_text(run.info.run_id, "seed: 0\n", "config.yaml")
    assert main(["finetune", "--from-run", run.info.run_id, "--config", TINY_FT]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "obs_dim: policy 5 vs env 2" in err


def test_one_update_changes_the_agent_and_never_the_frozen_policy(pretrained):
    tmp, parent = pretrained
    cfg = load_config(FinetuneConfig, TINY_FT)
    policy = CSPPolicy.load(tmp / "runs" / parent / "policy.pt")
    frozen = {k: v.clone() for k, v in policy.state_dict().items()}
    env = make_chunk_env(cfg.task, 4, policy, "tmrl", exec_horizon=4, seed=0, steps=2)
    heads = head_specs(env.decoder.sizes, cfg.agent, sigma_max=env.decoder.sigma_max, uses_base=True)
    loss = make_agent(4, heads, cfg.agent)
    optimizers = make_optimizers(loss, lr=1e-2)
    actor = TensorDictModule(ActorPolicy(loss.actor), in_keys=[OBS, GOAL], out_keys=[ACTION])
    cfg.collect.warmup_chunks = 0
    collector = make_collector(env, actor, cfg.collect)
    batch = next(iter(collector)).reshape(-1)
    collector.shutdown()
    before = {n: p.detach().clone() for n, p in loss.named_parameters()}
    update(loss, optimizers, batch)
    changed = {n for n, p in loss.named_parameters() if not torch.equal(before[n], p)}
    assert any(n.startswith("actor.") for n in changed) and any("critic" in n for n in changed)
    assert all(torch.equal(frozen[k], v) for k, v in policy.state_dict().items())
    assert not any(p.requires_grad for p in policy.parameters())


def test_worker_collector_acts_with_the_updated_weights(pretrained):
    """collect.workers=1: the env lives in another process, yet it acts with the learner's current weights
    (TorchRL shares them; here they are pinned so every action is ~+0.9, far from a random actor's)."""
    import functools

    from app.finetune import _worker_env

    tmp, parent = pretrained
    cfg = load_config(FinetuneConfig, TINY_FT, ["collect.workers=1", "collect.warmup_chunks=0"])
    policy = CSPPolicy.load(tmp / "runs" / parent / "policy.pt")
    env_kw = dict(task=cfg.task, num_envs=2, policy=policy, method="tmrl", exec_horizon=4, steps=2)
    env = make_chunk_env(seed=0, **env_kw)
    heads = head_specs(env.decoder.sizes, cfg.agent, sigma_max=env.decoder.sigma_max, uses_base=True)
    loss = make_agent(4, heads, cfg.agent)
    actor = TensorDictModule(ActorPolicy(loss.actor), in_keys=[OBS, GOAL], out_keys=[ACTION])
    collector = make_collector(
        env, actor, cfg.collect, env_fn=functools.partial(_worker_env, seed=0, **env_kw)
    )
    try:
        batches = iter(collector)
        first = next(batches)[ACTION]
        with torch.no_grad():
            out, dim = loss.actor.out, loss.actor.action_dim  # loc = atanh(0.9), log_std at its minimum
            out.weight.zero_()
            out.bias.copy_(torch.cat([torch.full((dim,), 1.4722), torch.full((dim,), -1e3)]))
        collector.update_policy_weights_()
        # the batch after the next may still come from the old weights (one batch of lag)
        later = [next(batches)[ACTION] for _ in range(3)]
    finally:
        collector.shutdown()
    assert first.std() > 0.2  # a freshly initialized, random actor
    assert torch.allclose(later[-1], torch.full_like(later[-1], 0.9), atol=1e-2)


def test_bench_commands_report_their_figures(tmp_path, capsys, monkeypatch):
    """Smoke test of both benchmarks at test size: they run and print every figure (no timing asserted)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    ft = ["bench", "finetune", "--config", TINY_FT, "--policy-config", TINY_FIT, "--env-steps", "200"]
    assert main(ft) == 0
    out = capsys.readouterr().out
    for label in ("environment alone", "chunk sampling alone", "floor (all)", "of the floor"):
        assert label in out
    pre = ["bench", "pretrain", "--config", TINY_FIT, "--steps", "4", f"data.path={tmp_path / 'd.zarr'}"]
    assert main(pre) == 0
    out = capsys.readouterr().out
    for label in ("bare loop", "Lightning/bare", "data loader", "batch 64"):
        assert label in out


def test_compare_plots_every_method_on_the_parent(store, tmp_path, capsys):
    uri, parent = store
    for method in ("tmrl", "dsrl"):
        args = ["finetune", "--from-run", parent, "--config", TINY_FT, f"method={method}", "env_steps=100"]
        assert main([*args, f"output_dir={tmp_path}"]) == 0
    assert main(["compare", "--parent", parent]) == 0
    out = capsys.readouterr().out
    assert "tmrl" in out and "dsrl" in out and "final success" in out and "training successes" in out
    assert "eval success per method" in out and "bootstrap interval" in out
    assert main(["compare", "--parent", parent, "--filter", "tags.`tmrl.method` = 'dsrl'"]) == 0
    out = capsys.readouterr().out
    assert "dsrl" in out and "tmrl " not in out
    assert main(["compare", "--parent", parent, "--by", "chunk.sigma_max", "seed"]) == 0
    out = capsys.readouterr().out
    assert "dsrl chunk.sigma_max=1.0 seed=0" in out and "tmrl chunk.sigma_max=1.0 seed=0" in out
    assert main(["compare", "--parent", parent, "--filter", "params.env_steps = '7'"]) == 2
    assert "matching" in capsys.readouterr().err
    assert main(["compare", "--parent", parent, "--filter", "params.method IN ('a')"]) == 2
    assert "not a valid MLflow search filter" in capsys.readouterr().err
    files = {f.path for f in MlflowClient(uri).list_artifacts(parent, "compare")}
    assert "compare/success_vs_env_steps.png" in files


def test_finetune_resumes_its_run_from_the_checkpoint(store, tmp_path, capsys):
    uri, parent = store
    base = ["finetune", "--from-run", parent, "--config", TINY_FT, f"output_dir={tmp_path}"]
    assert main(base) == 0
    run_id = capsys.readouterr().out.strip().splitlines()[-1].split("=", 1)[1]
    assert (tmp_path / run_id / "replay").exists()  # the buffer is kept locally for a resume
    assert main([*base, "env_steps=800", f"resume={run_id}"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"run_id={run_id}"
    ckpt = torch.load(tmp_path / run_id / "checkpoints" / "agent_final.pt", weights_only=True)
    assert ckpt["counters"]["env_steps"] >= 800  # counting went on from the first run's ~400 steps
    steps = [m.step for m in MlflowClient(uri).get_metric_history(run_id, "eval/success_rate")]
    assert max(steps) >= 800 and MlflowClient(uri).get_run(run_id).info.status == "FINISHED"
    assert main([*base, "method=dsrl", f"resume={run_id}"]) == 2  # another method's run is refused
    assert "is not a method=dsrl fine-tuning run" in capsys.readouterr().err


def test_evaluation_handles_episodes_that_end_at_different_times(pretrained):
    from app.finetune import evaluate
    from app.tasks.registry import TaskConfig

    tmp, parent = pretrained
    policy = CSPPolicy.load(tmp / "runs" / parent / "policy.pt")
    # goal cell = start cell: some sub-envs start inside the goal radius and finish at once, others do not
    task = TaskConfig(
        env="pointmaze-medium", task_id=None, init_ij=[1, 1], goal_ij=[1, 1], max_episode_steps=40
    )
    env = make_chunk_env(task, 6, policy, "dsrl", exec_horizon=4, seed=0, steps=2)
    agent = load_config(FinetuneConfig, TINY_FT).agent
    heads = head_specs(env.decoder.sizes, agent, sigma_max=env.decoder.sigma_max, uses_base=True)
    loss = make_agent(4, heads, agent)
    actor = TensorDictModule(ActorPolicy(loss.actor), in_keys=[OBS, GOAL], out_keys=[ACTION])
    first = evaluate(env, actor, max_chunks=11, seed=3)
    assert 0.0 < first <= 1.0
    assert evaluate(env, actor, max_chunks=11, seed=3) == first  # a fixed, seeded set of episodes


def _random_walk_pipeline(tmp_path, overrides: list[str]):
    """An untrained tiny policy (adaLN-Zero: its chunk IS its clipped action noise z, a random walk) on a
    start-in-the-goal-cell task: a walk with N(0, I) noise reaches the goal far more often than z = 0,
    which stands still and succeeds only where the start already lies inside the goal radius."""
    from app.bench import unit_stats
    from app.finetune import build_pipeline

    policy = CSPPolicy(
        PolicyConfig(chunk_len=4, width=32, depth=1, heads=2), obs_dim=2, action_dim=2, goal_dim=2
    )
    policy.set_normalization(unit_stats(policy))
    task = ["task.task_id=null", "task.init_ij=[1,1]", "task.goal_ij=[1,1]", "task.max_episode_steps=40"]
    cfg = load_config(FinetuneConfig, TINY_FT, [*task, "eval.episodes=128", *overrides])
    return cfg, build_pipeline(cfg, policy, tmp_path)


@pytest.mark.parametrize("method", ["tmrl", "dsrl", "fixed_sigma"])
def test_the_agent_starts_at_its_base_policys_zero_shot_success(tmp_path, method):
    """Do no harm: at env step 0 the agent's evaluation equals the base alone (sigma = 0, fresh N(0, I)
    noise) on the same fixed episodes, within sampling noise; the deterministic agent (z = 0) does not."""
    from app.finetune import dummy_action, evaluate

    cfg, p = _random_walk_pipeline(tmp_path, [f"method={method}", "chunk.fixed_sigma=0.0"])
    chunks = 11
    base = evaluate(p.base_env, dummy_action, chunks, cfg.eval.seed)
    agent = evaluate(p.eval_env, p.policy, chunks, cfg.eval.seed)
    still = evaluate(p.eval_env, p.policy, chunks, cfg.eval.seed, deterministic=True)
    p.collector.shutdown()
    assert base - still > 0.2  # the episodes tell a good noise from z = 0
    assert abs(agent - base) <= 0.1  # 2 standard errors of the difference at 128 episodes
    assert agent - still > 0.2


def test_the_base_alone_steps_the_eval_envs_own_sub_envs(tmp_path):
    """The base's evaluation shares the eval env's sub-envs (a rendered cube sub-env is ~330 MB; a second
    set of eval.episodes of them doubled a run's memory) and sees the same episodes before and after the
    agent has stepped them; a backend of another size is refused."""
    from app.envs.torchrl_envs import make_zero_shot_env
    from app.finetune import dummy_action, evaluate

    cfg, p = _random_walk_pipeline(tmp_path, ["method=tmrl"])
    assert p.base_env.backend is p.eval_env.backend
    before = evaluate(p.base_env, dummy_action, 11, cfg.eval.seed)
    evaluate(p.eval_env, p.policy, 11, cfg.eval.seed + 1)
    after = evaluate(p.base_env, dummy_action, 11, cfg.eval.seed)
    p.collector.shutdown()
    assert 0.0 < before < 1.0 and after == before
    policy = p.base_env.decoder.policy
    with pytest.raises(ValueError, match="num_envs=3 but the shared backend has 128"):
        make_zero_shot_env(cfg.task, 3, policy, cfg.chunk.exec_horizon, backend=p.eval_env.backend)


def test_the_evaluated_agent_hands_out_the_base_policys_noise(tmp_path):
    """With eval.deterministic off (default), the decoded z of the evaluation is N(0, 1) noise over the
    whole chunk (not an all-zero or repeated vector), sigma is near 0; the deterministic option gives 0."""
    from app.finetune import evaluate

    cfg, p = _random_walk_pipeline(tmp_path, [])
    seen = []

    def recording(td):
        td = p.policy(td)
        seen.append(p.eval_env.decoder.split(td[ACTION]))
        return td

    evaluate(p.eval_env, recording, 3, cfg.eval.seed)
    z = torch.cat([s["z"] for s in seen])  # (chunks * N, L, d_a)
    sigma = torch.cat([s["sigma"] for s in seen])
    assert z.mean().abs() < 0.05 and (z.std() - 1.0).abs() < 0.05
    assert (z[:, 1:] - z[:, :1]).abs().mean() > 0.5  # not one vector repeated over the chunk
    assert sigma.median() < 0.05 and sigma.max() < 0.3
    seen.clear()
    evaluate(p.eval_env, recording, 1, cfg.eval.seed, deterministic=True)
    assert torch.equal(seen[0]["z"], torch.zeros_like(seen[0]["z"]))
    p.collector.shutdown()


def test_step_zero_is_evaluated_and_logged_beside_the_base(tmp_path):
    """The loop logs eval/success_rate and eval/base_success_rate at env step 0, before any update."""
    from app.finetune import RunHooks, run_loop

    cfg, p = _random_walk_pipeline(tmp_path, ["env_steps=40", "eval.episodes=8"])
    logged = []
    run_loop(cfg, p, RunHooks(log=lambda metrics, step: logged.append((step, dict(metrics)))))
    p.collector.shutdown()
    step, first = logged[0]
    assert step == 0 and {"eval/success_rate", "eval/base_success_rate"} <= set(first)


def test_bootstrap_interval_of_the_mean():
    import numpy as np

    from app.compare import bootstrap_interval

    same = bootstrap_interval(np.full((5, 3), 0.4))
    assert np.allclose(same, 0.4)  # no spread over seeds: the interval is the point
    values = np.array([[0.0], [1.0], [0.0], [1.0], [1.0]])
    low, high = bootstrap_interval(values)[:, 0]
    assert 0.0 <= low < 0.6 < high <= 1.0 and high - low > 0.4


def test_zero_shot_on_the_target_creates_no_run(store, capsys):
    uri, parent = store
    before = len(MlflowClient(uri).search_runs(["1"]))
    assert main(["finetune", "--from-run", parent, "--config", TINY_FT, "--zero-shot", "0,0.5"]) == 0
    out = capsys.readouterr().out
    assert "sigma=0: success" in out and "sigma=0.5: success" in out and "(3 episodes)" in out
    assert len(MlflowClient(uri).search_runs(["1"])) == before
    assert main(["finetune", "--from-run", parent, "--config", TINY_FT, "--zero-shot", "0,2"]) == 2
    assert "expected comma-separated sigmas in [0, 1]" in capsys.readouterr().err


def test_a_sigma_start_outside_its_range_is_refused_before_any_run():
    with pytest.raises(Exception, match=r"agent.sigma_init=0.0 must lie inside \(0, chunk.sigma_max=1.0\)"):
        load_config(FinetuneConfig, TINY_FT, ["agent.sigma_init=0.0"])
    with pytest.raises(Exception, match="agent.sigma_init=0.6"):
        load_config(FinetuneConfig, TINY_FT, ["agent.sigma_init=0.6", "chunk.sigma_max=0.5"])
    load_config(FinetuneConfig, TINY_FT, ["agent.sigma_init=0.0", "method=dsrl"])  # no sigma head: fine
