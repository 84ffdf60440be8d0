"""`tmrl eval --from-run <id>`: re-evaluate a run, print the table and log it back to the run.

    pre-training run   the policy zero-shot at every sigma of ``eval.sigmas``: success rate and Success@k
                       for k = 1..K (``eval.rollouts``; the cube: ``eval.states`` x ``eval.rollouts``)
    fine-tuning run    its agent (``checkpoints/agent_final.pt``, else ``agent_last.pt``) acting
                       deterministically and stochastically on the run's fixed evaluation episodes

Every estimate comes with its 95% percentile-bootstrap interval over initial states (``app.evaluation``,
which names the metrics). Logged to the run without touching its status: the metrics (a pre-training run's
at the step of its last evaluation, so the UI shows the re-evaluation as their latest value, the history
keeping the fit's; a fine-tuning run's at its checkpoint's env steps), ``eval/table.csv``,
``eval/eval_config.yaml`` (the settings evaluated), the plots under ``eval/`` and the rollout videos under
``eval/videos/`` (``app.eval_videos``: ``videos`` successes and failures per sigma or per mode; a TMRL
agent's with its chosen sigma drawn under the frames; they replace the videos of the run's earlier
evaluation). ``overrides`` are ``key=value`` pairs on the run's
stored config (``eval.*``).
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from app import tracking
from app.agent_eval import MODES, EpisodeTrace, evaluate_agent, rebuild_agent
from app.config import load_config, to_yaml
from app.eval_videos import trace_replays
from app.evaluation import EvalTable, agent_row, plot_agent_success, plot_success_at_k

FINETUNE = "finetune"  # the stage tag of `tmrl finetune` runs (app.finetune's start_run)
VIDEOS = "eval/videos"  # the artifact folder of the latest evaluation's videos (earlier ones are replaced)


@dataclass
class RunEval:
    """What ``eval_run`` found: the table, the task's summary lines, the plots written under ``out`` and,
    for a fine-tuning run, every evaluation episode's trace by mode ("deterministic", "stochastic")."""

    run_id: str
    stage: str
    table: EvalTable
    out: Path
    lines: list[str] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    traces: dict[str, list[EpisodeTrace]] = field(default_factory=dict)
    step: int = 0  # the step the metrics were (or would be) logged at
    videos: list[Path] = field(default_factory=list)  # the MP4 files under ``out/videos``


def _get_run(client: MlflowClient, uri: str, run_id: str):
    try:
        return client.get_run(run_id)
    except MlflowException as err:
        raise ValueError(f"run {run_id!r} does not exist in the tracking store {uri}") from err


def _download(uri: str, run_id: str, artifact: str, dst: str) -> Path | None:
    from mlflow.artifacts import download_artifacts

    try:
        return Path(download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=dst, tracking_uri=uri))
    except (MlflowException, OSError):
        return None


def eval_run(
    uri: str,
    run_id: str,
    overrides: list[str] | None = None,
    out: str | Path | None = None,
    log: bool = True,
    videos: int = 1,
) -> RunEval:
    """Evaluate run ``run_id`` of the tracking store ``uri`` (module docstring); plots, ``table.csv`` and
    ``videos/`` go to ``out`` (default ``<output_dir>/<run_id>/eval``); ``log``: log them and the metrics to
    the run; ``videos``: successes and failures filmed per sigma or mode (0: none). ValueError naming the
    run if it does not exist or is neither a pre-training nor a fine-tuning run."""
    if isinstance(videos, bool) or not isinstance(videos, int) or videos < 0:
        raise ValueError(f"--videos {videos!r}: expected an integer >= 0 (episodes per outcome)")
    tracking.check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    run = _get_run(client, uri, run_id)
    stage = run.data.tags.get(tracking.STAGE_TAG)
    if stage == "pretrain":
        result = _eval_pretrain(client, uri, run, overrides or [], out, videos)
    elif stage == FINETUNE:
        result = _eval_finetune(uri, run, overrides or [], out, videos)
    else:
        raise ValueError(
            f"run {run_id!r} is not a CSP pre-training run nor a fine-tuning run (its {tracking.STAGE_TAG} "
            f"tag is {stage!r})"
        )
    csv = result.table.write_csv(result.out / "table.csv")
    if log:
        tracking.log_metrics(client, run_id, result.table.metrics(), result.step)
        for path in (csv, *result.plots, result.out / "eval_config.yaml"):
            client.log_artifact(run_id, str(path), "eval")
        if result.videos:
            note = _clear_videos(uri, run)
            if note:
                result.lines.append(note)
        for path in result.videos:
            client.log_artifact(run_id, str(path), VIDEOS)
    return result


def _clear_videos(uri: str, run) -> str | None:
    """Delete the run's earlier ``eval/videos/`` so the folder holds one evaluation's videos, not a mix of
    several (their labels name episodes and states, which differ between evaluations); a note when the
    artifact store cannot delete (the old videos then stay beside the new)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        repo = get_artifact_repository(run.info.artifact_uri, tracking_uri=uri)
        if repo.list_artifacts(VIDEOS):
            repo.delete_artifacts(VIDEOS)
    except (MlflowException, NotImplementedError, OSError) as err:
        return f"[tmrl] earlier {VIDEOS}/ of the run kept (the artifact store cannot delete: {err})"
    return None


def _film(task, env: str, replays: list, out: Path, per_outcome: int, sigma_max: float | None, lines):
    """The videos of ``replays`` under ``out/videos`` (none if ``per_outcome`` is 0); a note in ``lines``
    when the task cannot film them."""
    from app.eval_videos import write_videos
    from app.tasks.base import pick_replays

    if not per_outcome:
        return []
    files, note = write_videos(task, env, pick_replays(replays, per_outcome), out / "videos", sigma_max)
    if note:
        lines.append(f"[tmrl] {note}")
    return files


def _last_eval_step(client: MlflowClient, run, names: list[str]) -> int:
    """The step of the run's last evaluation: of the first of ``names`` it has, and of its training loss."""
    present = [n for n in names if n in run.data.metrics][:1] + ["train/loss"]
    steps = [m.step for n in present for m in client.get_metric_history(run.info.run_id, n)]
    return max(steps, default=0)


def _eval_pretrain(client: MlflowClient, uri: str, run, overrides: list[str], out, videos: int) -> RunEval:
    from app.tasks.registry import task_of_fit
    from modules.nets.policy import CSPPolicy

    run_id = run.info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        files = tracking.fetch_pretrain_run(uri, run_id, tmp)
        data = yaml.safe_load(files["config"].read_text()) or {}
        mode = (data.get("policy") or {}).get("context_mode") or "goal"
        task = task_of_fit(mode, (data.get("demos") or {}).get("env"))
        files["config"].write_text(yaml.safe_dump(task.upgrade_run_config(data), sort_keys=False))
        cfg = load_config(task.fit_schema(), files["config"], overrides)
        policy = CSPPolicy.load(files["policy"])
    out = Path(out or Path(cfg.output_dir) / run_id / "eval")
    report = task.zero_shot(policy, cfg, None, out)
    env = (data.get("demos") or {}).get("env") or task.name
    title = f"run {run_id[:8]} ({env}): Success@k, {report.table.rows[0].states} states"
    plot = plot_success_at_k(report.table, out / "success_at_k.png", title)
    (out / "eval_config.yaml").write_text(to_yaml(cfg.eval))
    step = _last_eval_step(client, run, list(report.table.metrics()))
    lines = list(report.lines)
    films = _film(task, getattr(cfg.eval, "env", None) or env, report.replays, out, videos, None, lines)
    plots = [*report.plots, plot]
    return RunEval(run_id, "pretrain", report.table, out, lines, plots, step=step, videos=films)


def _eval_finetune(uri: str, run, overrides: list[str], out, videos: int) -> RunEval:
    from app.finetune_config import FinetuneConfig

    run_id = run.info.run_id
    from_run = run.data.tags.get(tracking.PRETRAIN_TAG)
    with tempfile.TemporaryDirectory() as tmp:
        config = _download(uri, run_id, "config.yaml", tmp)
        # the agent at the run's end, else at its last save (a run killed or still going)
        agent_file = _download(uri, run_id, "checkpoints/agent_final.pt", tmp)
        agent_file = agent_file or _download(uri, run_id, "checkpoints/agent_last.pt", tmp)
        if config is None or agent_file is None or not from_run:
            raise ValueError(
                f"fine-tuning run {run_id!r} has no config.yaml, agent checkpoint or {tracking.PRETRAIN_TAG} "
                "tag (did it save a checkpoint?)"
            )
        cfg = load_config(FinetuneConfig, config, overrides)
        # its base policy is fetched from this store, whichever store the run was told to use
        cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, uri=uri))
        agent = rebuild_agent(cfg, from_run, agent_file, tmp)
    evals = {mode: evaluate_agent(agent, mode) for mode in MODES}
    table = EvalTable([agent_row(e.success, mode) for mode, e in evals.items()])
    out = Path(out or Path(cfg.output_dir) / run_id / "eval")
    out.mkdir(parents=True, exist_ok=True)
    title = f"run {run_id[:8]} ({cfg.method} on {cfg.task.env}, {agent.env_steps} env steps)"
    plot = plot_agent_success(table, out / "success.png", title)
    (out / "eval_config.yaml").write_text(to_yaml(cfg.eval))
    traces = {mode: e.traces for mode, e in evals.items()}
    lines: list[str] = []
    sigma_max = cfg.chunk.sigma_max
    films = _film(cfg.task.task, cfg.task.env, trace_replays(traces, videos), out, videos, sigma_max, lines)
    return RunEval(run_id, FINETUNE, table, out, lines, [plot], traces, agent.env_steps, films)
