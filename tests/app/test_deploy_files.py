"""The cluster-launch files in deploy/: the compose file and the container files say what deploy/README.md
says they do, every shell script parses, and the two launchers really run a 2-process CPU DDP fit into one
MLflow run: deploy/torchrun.sh under torchrun, deploy/slurm/fit.sbatch under a stand-in `srun` that starts
its tasks the way SLURM does (Lightning's SLURMEnvironment then takes over)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
SCRIPTS = sorted([*DEPLOY.glob("*.sh"), *DEPLOY.glob("slurm/*.sbatch")])
MINE = [DEPLOY / "torchrun.sh", DEPLOY / "slurm" / "fit.sbatch"]
VENV = Path(sys.executable).parent.parent
# what a launcher or an enclosing job may have left in this process's environment
LAUNCH_VARS = ("TMRL_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK")


def _pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(d.split("==", 1) for d in deps if "==" in d)


def _defaults(value: str) -> str:
    """``value`` as compose resolves it with an empty environment: ``${X:-default}`` -> default, $$ -> $."""
    return re.sub(r"\$\{[A-Za-z_]\w*:-([^}]*)\}", r"\1", value).replace("$$", "$")


def _services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _option(command: list[str], flag: str) -> str:
    assert flag in command, f"mlflow server has no {flag}: {command}"
    return _defaults(command[command.index(flag) + 1])


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment less what a launcher or an enclosing job set, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "TORCHELASTIC"))
    }
    return {**env, "MUJOCO_GL": env.get("MUJOCO_GL", "egl"), "HF_HUB_OFFLINE": "1", **extra}


# --- docker-compose.yml ------------------------------------------------------------------------------------


def test_compose_has_postgres_minio_bucket_and_mlflow_with_healthchecks():
    services = _services()
    assert {"postgres", "minio", "create-bucket", "mlflow"} <= set(services)
    for name in ("postgres", "minio", "mlflow"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "/health" in " ".join(services["mlflow"]["healthcheck"]["test"])
    assert [_defaults(p) for p in services["mlflow"]["ports"]] == ["5000:5000"]
    # start order: the bucket exists and the database answers before the server starts
    bucket = services["create-bucket"]
    assert bucket["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["mlflow"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "create-bucket": {"condition": "service_completed_successfully"},
    }
    assert "minio/mc" in _defaults(bucket["image"]) and "minio/minio" in _defaults(services["minio"]["image"])


def test_compose_mlflow_stores_runs_in_postgres_and_artifacts_in_minio():
    services = _services()
    mlflow = services["mlflow"]
    command = [str(a) for a in mlflow["command"]]
    assert command[:2] == ["mlflow", "server"]
    backend = _option(command, "--backend-store-uri")
    pg = services["postgres"]["environment"]
    user, password, db = (_defaults(pg[k]) for k in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"))
    assert backend == f"postgresql+psycopg2://{user}:{password}@postgres:5432/{db}"
    destination = _option(command, "--artifacts-destination")
    assert destination.startswith("s3://")
    assert "--serve-artifacts" in command and _option(command, "--host") == "0.0.0.0"
    assert _option(command, "--port") == "5000"
    env = {k: _defaults(str(v)) for k, v in mlflow["environment"].items()}
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    minio = {k: _defaults(v) for k, v in services["minio"]["environment"].items()}
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
        minio["MINIO_ROOT_USER"],
        minio["MINIO_ROOT_PASSWORD"],
    )
    # the one-shot job creates the very bucket the server writes to
    bucket = services["create-bucket"]
    script = _defaults(" ".join(bucket["command"]))
    name = _defaults(bucket["environment"]["MLFLOW_BUCKET"])
    assert "mc mb" in script and destination == f"s3://{name}"
    # the Host header the app container sends (http://mlflow:5000) is one the server answers
    allowed = _option(command, "--allowed-hosts").split(",")
    assert "mlflow:*" in allowed and "localhost:*" in allowed


def test_compose_images_are_built_from_files_here():
    services = _services()
    build = services["mlflow"]["build"]
    dockerfile = (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve()
    assert dockerfile == DEPLOY / "mlflow.Dockerfile"
    text = dockerfile.read_text()
    assert f"ARG MLFLOW_VERSION={_pins()['mlflow']}" in text  # the server runs the clients' version
    assert "psycopg2-binary==" in text and "boto3==" in text
    app = services["tmrl"]["build"]
    assert (COMPOSE.parent / app["context"]).resolve() == ROOT
    assert (ROOT / app["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert services["tmrl"]["profiles"] == ["app"]  # `up` starts the tracking stack only
    assert services["tmrl"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_compose_file_is_valid_for_docker_compose():
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    for profile in ([], ["--profile", "app"]):
        proc = subprocess.run(
            [*cli, "-f", str(COMPOSE), *profile, "config", "-q"], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr


# --- Dockerfiles -----------------------------------------------------------------------------------------


def test_app_dockerfile_is_cuda_python311_with_the_projects_pins():
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)", text, re.M).group(1)
    assert base.startswith("nvidia/cuda:") and base.endswith("-ubuntu22.04")  # 22.04 ships python3.11
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}$", text, re.M)
    assert "python3.11 python3.11-venv" in text and "python3.11 -m venv" in text
    pins = _pins()
    torch = re.search(r'^ARG TORCH_PINS="([^"]+)"', text, re.M).group(1).split()
    assert torch == [f"torch=={pins['torch']}", f"torchvision=={pins['torchvision']}"]
    assert text.index("pip install ${TORCH_PINS}") < text.index("pip install -e '.[server]'")
    assert re.search(r"^ENV MUJOCO_GL=egl", text, re.M)
    assert re.search(r'^ENTRYPOINT \["tmrl"\]$', text, re.M)
    for src in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (ROOT / src).exists(), f"deploy/Dockerfile copies {src}, which the repository lacks"


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", "data", "runs", "mlflow.db", "mlruns", "**/*.zarr", ".git"} <= ignored
    # and nothing the Dockerfile copies
    assert not {"app", "modules", "datamodules", "configs", "pyproject.toml", "README.md"} & ignored


# --- shell scripts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_script_parses(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", MINE, ids=lambda p: str(p.relative_to(ROOT)))
def test_launcher_is_executable(script):
    assert os.access(script, os.X_OK)


def test_sbatch_header_asks_for_nodes_tasks_gpus_and_cpus():
    lines = (DEPLOY / "slurm" / "fit.sbatch").read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    header = [line for line in lines[:first_command] if line.startswith("#SBATCH")]
    options = {line.split()[1].split("=")[0] for line in header}
    assert {"--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task"} <= options
    late = [line for line in lines[first_command:] if line.startswith("#SBATCH")]
    assert not late, f"sbatch ignores #SBATCH lines after the first command: {late}"


def test_sbatch_refuses_without_a_tracking_uri(tmp_path):
    env = _clean_env(
        SLURM_NNODES="1", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_SUBMIT_DIR=str(tmp_path)
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        ["bash", str(DEPLOY / "slurm" / "fit.sbatch")], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert proc.returncode == 2 and "MLFLOW_TRACKING_URI is not set" in proc.stderr


def test_launchers_refuse_a_sqlite_store_across_nodes(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    torchrun = subprocess.run(
        [str(DEPLOY / "torchrun.sh"), "2", "1"],
        capture_output=True, text=True, cwd=ROOT, env=_clean_env(MLFLOW_TRACKING_URI=uri, VENV=str(VENV)),
    )  # fmt: skip
    assert torchrun.returncode == 2 and "need a tracking server" in torchrun.stderr
    slurm_env = _clean_env(
        MLFLOW_TRACKING_URI=uri, VENV=str(VENV), SLURM_NNODES="2", SLURM_NTASKS="4",
        SLURM_NTASKS_PER_NODE="2", SLURM_SUBMIT_DIR=str(ROOT),
    )  # fmt: skip
    sbatch = subprocess.run(
        ["bash", str(DEPLOY / "slurm" / "fit.sbatch")], capture_output=True, text=True, env=slurm_env
    )
    assert sbatch.returncode == 2 and "need a tracking server" in sbatch.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_torchrun_sh_without_arguments_prints_its_usage():
    proc = subprocess.run([str(DEPLOY / "torchrun.sh")], capture_output=True, text=True, env=_clean_env())
    assert proc.returncode == 2 and "NNODES NPROC_PER_NODE" in proc.stderr


# --- the launchers, for real (2 CPU processes, gloo) -------------------------------------------------------


def _free_port(low: int = 0, high: int = 0) -> int:
    for port in range(low, high + 1) if low else [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in {low}..{high}")


def _overrides(tmp_path: Path) -> list[str]:
    return [
        f"data.path={tmp_path / 'demos.zarr'}", f"output_dir={tmp_path / 'runs'}",
        f"tracking.artifact_location={tmp_path / 'artifacts'}", "eval.enabled=false",
    ]  # fmt: skip


def _why(proc: subprocess.CompletedProcess) -> str:
    """The errors a failed launch printed (a launcher's own summary buries the rank's), then its end."""
    errors = [line for line in proc.stderr.splitlines() if re.search(r"(Error|Exception)\b", line)]
    return "\n".join([*errors[-20:], "...", proc.stderr[-3000:]])


def _assert_one_finished_run(uri: str, stdout: str) -> None:
    from mlflow.tracking import MlflowClient

    printed = [line.split("=", 1)[1] for line in stdout.splitlines() if line.startswith("run_id=")]
    real = [r for r in printed if not r.startswith("rank")]  # ranks other than 0 print run_id=rank<N>
    assert len(real) == 1, stdout
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tmrl").experiment_id])
    assert [r.info.run_id for r in runs] == real  # rank 1 made no run of its own
    assert runs[0].info.status == "FINISHED" and "train/loss" in runs[0].data.metrics


@pytest.mark.slow
def test_torchrun_sh_cpu_ddp_fit_logs_into_one_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = _clean_env(
        MLFLOW_TRACKING_URI=uri, ACCELERATOR="cpu", CONFIG=tiny_config("csp_state"), VENV=str(VENV),
        MASTER_PORT=str(_free_port()),
    )  # fmt: skip
    cmd = [str(DEPLOY / "torchrun.sh"), "1", "2", *_overrides(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, _why(proc)
    assert "MEMBER: 2/2" in proc.stderr and "SLURM" not in proc.stderr
    _assert_one_finished_run(uri, proc.stdout)


FAKE_SRUN = """#!/usr/bin/env bash
# stand-in for srun inside an allocation: SLURM_NTASKS copies of "$@" on this machine, each with the
# variables srun gives a task; waits for all and fails if one did
set -u
echo "$*" >> "$FAKE_SRUN_LOG"
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % SLURM_NTASKS_PER_NODE)) SLURM_NODEID=$((i / SLURM_NTASKS_PER_NODE)) \\
    SLURM_STEP_ID=0 SLURM_STEPID=0 SLURM_STEP_NUM_TASKS=$SLURM_NTASKS SLURMD_NODENAME=localhost "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit "$rc"
"""


@pytest.mark.slow
def test_fit_sbatch_under_srun_logs_into_one_run(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    # Lightning's SLURMEnvironment takes its port from the job id (15000 + its last 4 digits): pick a free one
    port = _free_port(15000 + 2000, 15000 + 9999)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = _clean_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_SRUN_LOG=str(tmp_path / "srun.log"),
        MLFLOW_TRACKING_URI=uri, ACCELERATOR="cpu", CONFIG=tiny_config("csp_state"), VENV=str(VENV),
        # what sbatch sets in the batch script of --nodes=1 --ntasks-per-node=2 --cpus-per-task=1
        SLURM_JOB_ID=f"7{port - 15000:04d}", SLURM_JOB_NAME="tmrl-fit", SLURM_NNODES="1",
        SLURM_JOB_NUM_NODES="1", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_CPUS_PER_TASK="1",
        SLURM_JOB_NODELIST="localhost", SLURM_NODELIST="localhost", SLURM_SUBMIT_DIR=str(tmp_path),
    )  # fmt: skip
    cmd = ["bash", str(DEPLOY / "slurm" / "fit.sbatch"), *_overrides(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, _why(proc)
    srun_calls = (tmp_path / "srun.log").read_text().splitlines()
    assert len(srun_calls) == 1 and srun_calls[0].startswith("tmrl fit --config ")
    assert "trainer.devices=2 trainer.num_nodes=1 trainer.strategy=ddp" in srun_calls[0]
    # Lightning took the SLURM environment (it says so once per task) and formed one 2-process group
    assert proc.stderr.count("SLURM auto-requeueing enabled") == 2 and "MEMBER: 2/2" in proc.stderr
    _assert_one_finished_run(uri, proc.stdout)
