"""The `tmrl` command: fit | finetune | compare | runs | eval | demos | bench | report | robot-server | ui.

    tmrl fit --config configs/csp_state.yaml trainer.max_steps=50 seed=3
    tmrl fit --config configs/csp_state.yaml --print-config
    tmrl finetune --from-run <run_id> method=dsrl env_steps=50000 seed=1
    tmrl finetune --from-run <run_id> --config configs/tmrl_pointmaze_a.yaml --zero-shot 0,0.25
    tmrl compare --parent <run_id>
    tmrl compare <finetune run_id> <finetune run_id> ...
    tmrl runs [--experiment tmrl]
    tmrl eval --from-run <run_id> eval.episodes_per_task=10 eval.sigmas=[0,0.25,0.5,0.75,1] --videos 2
    tmrl eval --from-run <point-cloud run_id> eval.states=20 eval.rollouts=8 eval.variations=[heldout]
    tmrl demos --env pointmaze-large --episodes 300 --out data/pointmaze-large.zarr
    tmrl demos --env cube-single --episodes 4 --episode-length 200 --out data/cube.zarr
    tmrl bench pretrain --config configs/csp_state.yaml
    tmrl bench finetune --config configs/tmrl_cube.yaml --policy-config configs/csp_pointcloud.yaml
    tmrl bench all --out docs/bench.md
    tmrl report --uri sqlite:///docs/evidence/mlflow.db --file docs/RESULTS.md --check
    tmrl robot-server --env pointmaze-large --init 1,4 --goal 7,6 --address 127.0.0.1:5555
    tmrl finetune --from-run <run_id> --config configs/tmrl_remote.yaml task.address=127.0.0.1:5555
    tmrl ui --port 5000

Errors in what the user gave (config keys and values, paths, run ids, an unreachable tracking server) are
printed as one clear message and exit with status 2; a run that fails for another reason it can name (a
collector worker died) exits with status 1; set TMRL_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from app.config import ConfigError, load_config, to_yaml

USER_ERRORS = (ConfigError, ValueError, FileNotFoundError, FileExistsError)


def _add_config_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--config", default=default, help="YAML config file (see configs/)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. trainer.max_steps=50"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _load_fit_config(args: argparse.Namespace):
    from app.tasks.registry import fit_schema

    cfg = load_config(fit_schema(args.config, args.overrides), args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return None
    return cfg


def cmd_fit(args: argparse.Namespace) -> None:
    cfg = _load_fit_config(args)
    if cfg is None:
        return
    from app import tracking
    from app.pretrain import fit, global_rank

    run_id = fit(cfg)
    if global_rank() != 0:  # the other processes of a multi-process fit: rank zero reports
        return
    uri = tracking.resolve_uri(cfg.tracking)
    where = "it serves the UI" if uri.startswith(("http://", "https://")) else "open the UI with `tmrl ui`"
    print(f"[tmrl] tracking store: {uri}; {where}")
    print(f"run_id={run_id}")


def task_aliases(overrides: list[str]) -> list[str]:
    """``env=X`` and ``env.KEY=V`` (the robot-link spelling, ``env=remote env.address=HOST:PORT``) as the
    ``task.env=X`` and ``task.KEY=V`` they stand for; every other override as it is."""
    return [
        f"task.{o}" if o.startswith("env=") else f"task.{o[4:]}" if o.startswith("env.") else o
        for o in overrides
    ]


def cmd_finetune(args: argparse.Namespace) -> None:
    from app.finetune import FinetuneConfig, finetune

    cfg = load_config(FinetuneConfig, args.config, task_aliases(args.overrides))
    if args.print_config:
        print(to_yaml(cfg), end="")
        return
    if args.zero_shot is not None:
        from app.base_run import zero_shot_on_target

        try:
            sigmas = [float(v) for v in args.zero_shot.split(",")]
        except ValueError:
            sigmas = []
        if not sigmas or any(not 0.0 <= s <= 1.0 for s in sigmas):
            raise ValueError(f"--zero-shot {args.zero_shot!r}: expected comma-separated sigmas in [0, 1]")
        zero_shot_on_target(cfg, args.from_run, sigmas)
        return
    from app.finetune_state import request_stop

    handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:  # pre-emption (SIGTERM) and Ctrl-C stop at the end of a batch: saved, the run KILLED
        run_id = finetune(cfg, args.from_run)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    print(f"[tmrl] nested under pre-training run {args.from_run}; compare runs with `tmrl ui`")
    print(f"run_id={run_id}")


def cmd_compare(args: argparse.Namespace) -> None:
    from app import tracking
    from app.compare import compare

    uri = tracking.existing_store(tracking.resolve_uri(tracking.TrackingConfig(uri=args.uri)))
    tracking.check_reachable(uri)
    compare(uri, args.parent, args.filter, args.by, args.out, run_ids=args.run_ids)


def cmd_runs(args: argparse.Namespace) -> None:
    from mlflow.tracking import MlflowClient

    from app import tracking
    from app.runs import runs_table

    uri = tracking.existing_store(tracking.resolve_uri(tracking.TrackingConfig(uri=args.uri)))
    tracking.check_reachable(uri)
    name = args.experiment or tracking.TrackingConfig().experiment
    client = MlflowClient(tracking_uri=uri)
    exp_id = tracking.experiment_id(client, name, uri)
    print(runs_table(client, exp_id, f"experiment {name!r} in {uri}"))


def cmd_eval(args: argparse.Namespace) -> None:
    from app import tracking
    from app.eval_run import eval_run

    uri = tracking.resolve_uri(tracking.TrackingConfig(uri=args.uri))
    result = eval_run(uri, args.from_run, args.overrides, args.out, log=not args.no_log, videos=args.videos)
    for line in result.lines:
        print(line)
    print(f"[tmrl] eval of {result.stage} run {args.from_run} (95% bootstrap interval over initial states):")
    for line in result.table.lines():
        print(line)
    where = "not logged (--no-log)" if args.no_log else f"logged to run {args.from_run} under eval/"
    films = f", {len(result.videos)} videos in videos/" if result.videos else ""
    print(f"[tmrl] table.csv and plots{films} in {result.out}; {where}")


def cmd_demos(args: argparse.Namespace) -> None:
    from app.tasks.registry import task_of_env

    task = task_of_env(args.env)
    options = dict(num_points=args.num_points, robot_geometry=args.robot_geometry, variation=args.variation)
    if args.cameras is not None:
        options["cameras"] = [c.strip() for c in args.cameras.split(",") if c.strip()]
    if args.image_size is not None:
        options["width"] = options["height"] = args.image_size
    options = {k: v for k, v in options.items() if v is not None}
    demos = task.demo_config(args.env, args.episodes, args.length, args.seed, args.noise_std, options)
    store = task.generate_demos(demos, args.out, overwrite=args.overwrite)
    print(f"[tmrl] wrote {store.num_episodes} episodes, {store.num_steps} steps to {args.out}")
    print(f"fingerprint={store.fingerprint}")


def cmd_bench(args: argparse.Namespace) -> None:
    from app.bench import bench_pretrain

    cfg = _load_fit_config(args)
    if cfg is not None:
        bench_pretrain(cfg, steps=args.steps)


def cmd_bench_finetune(args: argparse.Namespace) -> None:
    from app.bench import bench_finetune
    from app.finetune import FinetuneConfig
    from app.pretrain import fit_task
    from app.tasks.registry import fit_schema

    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    fit_cfg = load_config(fit_schema(args.policy_config), args.policy_config)
    sensor = fit_task(fit_cfg).sensor(fit_cfg)
    bench_finetune(cfg, fit_cfg.policy, env_steps=args.env_steps, sensor=sensor)


def _add_bench_all_args(p: argparse.ArgumentParser, out: object, only: object) -> None:
    p.add_argument("--out", default=out, help="write the markdown table here (default: stdout)")
    p.add_argument(
        "--only", nargs="+", default=only, metavar="NAME", help="only these (app/bench_suite.py SUITE)"
    )
    p.set_defaults(func=cmd_bench_all)


def cmd_bench_all(args: argparse.Namespace) -> None:
    from app.bench_suite import bench_all, select

    suite = select(args.only)
    command = "tmrl bench all" + (f" --only {' '.join(args.only)}" if args.only else "")
    table, failures = bench_all(suite, command)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table)
        print(f"[tmrl] {len(suite)} benchmarks: table written to {args.out}")
    else:
        print("\n" + table, end="")
    if failures:  # the table holds their rows; exit 1, as for a run that failed
        print("tmrl bench: failed: " + "; ".join(failures), file=sys.stderr)
        raise SystemExit(1)


def cmd_report(args: argparse.Namespace) -> None:
    from app.report import report
    from app.tracking import TrackingConfig, existing_store, resolve_uri

    uri = existing_store(resolve_uri(TrackingConfig(uri=args.uri)))
    if args.export:  # the slimmed copy first, and the report from it: what is committed reproduces it
        from app.report_store import export_store

        done = export_store(uri, args.export)
        print(
            f"[tmrl] exported {done.runs} runs to {done.path}: {done.rows_kept} of {done.rows_total} metric "
            f"rows kept, {done.size_before / 1e6:.1f} MB -> {done.size_after / 1e6:.1f} MB"
        )
        uri = f"sqlite:///{done.path}"
    result = report(uri, args.file, check=args.check)
    state = ("would change" if args.check else "rewritten") if result.changed else "unchanged"
    if result.figures:
        state += f"; figures {'to draw' if args.check else 'drawn'}: {', '.join(result.figures)}"
    print(f"[tmrl] {args.file}: {result.blocks} blocks, {state}")
    if result.errors:  # the file holds an error line in each such block; the rest is regenerated
        raise ValueError(f"{args.file}: " + "; ".join(result.errors))
    if args.check and (result.changed or result.figures):
        print(f"tmrl report: {args.file} is out of date; `tmrl report --file {args.file}`", file=sys.stderr)
        raise SystemExit(1)


def cmd_robot_server(args: argparse.Namespace) -> None:
    from app.robot.server import RobotServer, config_of, load_robot

    if args.robot:
        robot = load_robot(args.robot)
    else:  # the stand-in: a simulated task behind the robot interface
        from app.robot.sim import SimRobot
        from app.tasks.registry import TaskConfig

        cells = {
            k: [int(c) for c in v.split(",")]
            for k, v in (("init_ij", args.init), ("goal_ij", args.goal))
            if v
        }
        task_id = None if cells else args.task_id
        target = TaskConfig(args.env, task_id, max_episode_steps=args.max_episode_steps, **cells)
        robot = SimRobot(target, seed=args.seed, step_delay_s=args.step_delay)
    RobotServer(robot, config_of(args)).serve()


def cmd_ui(args: argparse.Namespace) -> None:
    from mlflow.tracking import MlflowClient

    from app import tracking

    # a relative sqlite path made absolute: the server reads the store this directory uses
    uri = tracking.existing_store(tracking.resolve_uri(tracking.TrackingConfig(uri=args.uri)))
    base = f"http://{args.host}:{args.port}"
    print(f"[tmrl] MLflow UI for {uri} at {base} (Ctrl-C stops it)")
    name = args.experiment or tracking.TrackingConfig().experiment
    exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
    if exp is None:
        print(f"[tmrl] no experiment {name!r} in this store yet (--experiment names another)")
    else:  # MLflow's home page is its GenAI welcome page: tmrl's runs are one link away
        print(f"[tmrl] runs of experiment {name!r}: {tracking.runs_page(base, exp.experiment_id)}")
    sys.stdout.flush()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    cmd += ["--host", args.host, "--port", str(args.port)]
    os.execv(sys.executable, cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tmrl", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="pre-train a CSP policy (generates demonstrations if missing)")
    _add_config_args(p, default=None)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("finetune", help="TMRL (or a baseline) fine-tuning of a pre-training run's policy")
    p.add_argument("--from-run", required=True, help="MLflow run id of a `tmrl fit` run")
    _add_config_args(p, default="configs/tmrl_pointmaze.yaml")
    p.add_argument(
        "--zero-shot", nargs="?", const="0", default=None, metavar="SIGMAS",
        help="only evaluate the base policy alone on the target's evaluation episodes at these sigmas "
        "(comma-separated, default 0) and exit; creates no run",
    )  # fmt: skip
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("compare", help="plot fine-tuning runs (given, or of one pre-training run) by method")
    p.add_argument("run_ids", nargs="*", metavar="ID", help="fine-tuning run ids (`tmrl runs` lists them)")
    p.add_argument("--parent", default=None, help="instead of IDs: all fine-tuning runs of this fit run")
    p.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    example = "\"params.env_steps = '100000'\""
    p.add_argument("--filter", default=None, help=f"MLflow search filter on the children, e.g. {example}")
    p.add_argument("--by", nargs="*", default=[], help="params splitting a method's runs (chunk.sigma_max)")
    p.add_argument("--out", default=None, help="also save the plot here (e.g. docs/figures/target_a.png)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "eval", help="re-evaluate a run (a fit's policy zero-shot, a fine-tuned agent), logged back to it"
    )
    p.add_argument("--from-run", required=True, help="MLflow run id of a `tmrl fit` or `tmrl finetune` run")
    p.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--out", default=None, help="where plots go (default: <output_dir>/<run_id>/eval)")
    p.add_argument("--no-log", action="store_true", help="print and write to --out only; log nothing")
    p.add_argument(
        "--videos", type=int, default=1, metavar="N",
        help="MP4 videos of N successful and N failed episodes per sigma (or agent mode); 0: none",
    )  # fmt: skip
    example = "eval.episodes_per_task=10 eval.rollouts=4 (cube: eval.states=20; fine-tuned: eval.episodes=50)"
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"e.g. {example}")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demos", help="generate scripted-expert demonstrations into an episode store")
    p.add_argument(
        "--env",
        default="pointmaze-large",
        help="pointmaze-{medium,large,giant,teleport}, visual-pointmaze-{...} (camera frames) or cube-single",
    )
    p.add_argument("--episodes", type=int, required=True)
    p.add_argument("--out", required=True, help="episode store path, e.g. data/pointmaze-large.zarr")
    p.add_argument(
        "--length", "--episode-length", type=int, default=None, help="steps per episode (maze 1000, cube 200)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--noise-std",
        type=float,
        default=None,
        help="expert action noise (maze: ExpertConfig.noise_std; cube: OracleConfig.noise)",
    )
    p.add_argument("--num-points", type=int, default=None, help="cube: points per cloud (512)")
    p.add_argument("--robot-geometry", default=None, help="cube: visual | collision | none (visual)")
    p.add_argument("--variation", default=None, help="cube: train | heldout (train)")
    p.add_argument(
        "--cameras", default=None, help="cameras, comma-separated (visual maze: top,follow; cube: left,right)"
    )
    p.add_argument("--image-size", type=int, default=None, help="frame width = height, pixels (64)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_demos)

    p = sub.add_parser("bench", help="benchmarks (printed, not tracked); alone: all of them, as one table")
    _add_bench_all_args(p, out=None, only=[])
    bench = p.add_subparsers(dest="bench")
    b = bench.add_parser("all", help="every benchmark at a quick size, as one markdown table")
    _add_bench_all_args(b, out=argparse.SUPPRESS, only=argparse.SUPPRESS)  # `bench --out F all` keeps F
    b = bench.add_parser("pretrain", help="Lightning vs bare loop, data-loader and sampling throughput")
    _add_config_args(b, default="configs/csp_state.yaml")
    b.add_argument("--steps", type=int, default=30, help="timed training steps per loop")
    b.set_defaults(func=cmd_bench)

    b = bench.add_parser("finetune", help="fine-tuning loop vs its env + chunk-sampling floor")
    b.add_argument("--config", default="configs/tmrl_pointmaze.yaml", help="fine-tuning config")
    b.add_argument(
        "--policy-config", default="configs/csp_state.yaml", help="fit config whose policy size to use"
    )
    b.add_argument("--env-steps", type=int, default=10_000, help="env steps of the timed loop")
    b.add_argument("overrides", nargs="*", metavar="key=value", help="fine-tuning config overrides")
    b.set_defaults(func=cmd_bench_finetune)

    p = sub.add_parser("report", help="regenerate the generated blocks of a markdown report from MLflow runs")
    p.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--file", default="docs/RESULTS.md", help="the report (block syntax: app/report.py)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file would change")
    p.add_argument(
        "--export", default=None, metavar="DB",
        help="first copy the (sqlite) store to DB with only the metrics reports read, then report from DB",
    )  # fmt: skip
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("runs", help="list pre-training runs with their fine-tuning runs beneath them")
    p.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: tmrl)")
    p.set_defaults(func=cmd_runs)

    from app.robot.server import add_arguments as robot_server_arguments

    p = sub.add_parser("robot-server", help="serve a robot (or a simulated stand-in) to `tmrl finetune`")
    p.add_argument("--robot", default=None, help="module:Class of your Robot (app/robot/interface.py)")
    p.add_argument("--env", default="pointmaze-large", help="without --robot: the simulated task to serve")
    p.add_argument("--task-id", type=int, default=1, help="stand-in maze: OGBench evaluation task")
    p.add_argument(
        "--init", default=None, help="stand-in maze: start cell I,J (with --goal, instead of a task)"
    )
    p.add_argument("--goal", default=None, help="stand-in maze: goal cell I,J")
    p.add_argument("--max-episode-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-delay", type=float, default=0.0, help="stand-in: seconds added to every step")
    robot_server_arguments(p)
    p.set_defaults(func=cmd_robot_server)

    p = sub.add_parser("ui", help="serve the MLflow UI on the configured tracking store")
    p.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--experiment", default=None, help="experiment whose runs page to print (default: tmrl)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as err:
        if os.environ.get("TMRL_DEBUG"):
            raise
        print(f"tmrl {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tmrl {args.command}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as err:  # a RunFailed is not the user's input: status 1, but one clear message
        from app.tracking import RunFailed

        if os.environ.get("TMRL_DEBUG") or not isinstance(err, RunFailed):
            raise
        print(f"tmrl {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
