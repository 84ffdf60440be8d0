#!/usr/bin/env bash
# Multi-node DDP pre-training launched by torchrun: run this once on EVERY node, from the repository root.
#
#   deploy/torchrun.sh NNODES NPROC_PER_NODE [key=value ...]
#
#   # 2 nodes x 4 GPUs; node 0 is gpu-a (reachable from gpu-b on port 29500):
#   gpu-a$ NODE_RANK=0 MASTER_ADDR=gpu-a MLFLOW_TRACKING_URI=http://tracker:5000 deploy/torchrun.sh 2 4
#   gpu-b$ NODE_RANK=1 MASTER_ADDR=gpu-a MLFLOW_TRACKING_URI=http://tracker:5000 deploy/torchrun.sh 2 4
#   # try-out on one CPU machine, 2 processes (gloo), about a minute:
#   ACCELERATOR=cpu CONFIG=configs/csp_state.yaml deploy/torchrun.sh 1 2 \
#     trainer.max_steps=20 trainer.val_check_interval=10 eval.enabled=false
#
# Environment (defaults in brackets):
#   NODE_RANK [0]            this node's index, 0 .. NNODES-1
#   MASTER_ADDR [127.0.0.1]  host name or address of node 0, reachable from every node
#   MASTER_PORT [29500]      a free TCP port on node 0
#   ACCELERATOR [gpu]        trainer.accelerator: gpu, or cpu for a try-out
#   CONFIG [configs/csp_state_paper.yaml]
#   VENV [.venv of the repository, when it exists]  virtual environment to activate; VENV=none: use PATH
#   MLFLOW_TRACKING_URI      the team's server (deploy/README.md); unset: ./mlflow.db (one node only)
# Extra arguments are `tmrl fit` overrides (they come last, so they win), e.g. data.path=/shared/demos.zarr.
# data.path must be on a filesystem every node sees, or exist before the launch (`tmrl demos`): rank 0
# generates it when it is missing and the other ranks wait for it.
set -euo pipefail

usage() {
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
[ $# -ge 2 ] || usage
NNODES=$1
NPROC_PER_NODE=$2
shift 2
[[ $NNODES =~ ^[1-9][0-9]*$ && $NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] || {
  echo "torchrun.sh: NNODES and NPROC_PER_NODE must be positive integers, got '$NNODES' '$NPROC_PER_NODE'" >&2
  exit 2
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
ACCELERATOR=${ACCELERATOR:-gpu}
CONFIG=${CONFIG:-configs/csp_state_paper.yaml}
VENV=${VENV:-$ROOT/.venv}

if [ "$VENV" != none ] && [ -f "$VENV/bin/activate" ]; then
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
elif [ "$VENV" != none ] && [ "$VENV" != "$ROOT/.venv" ]; then
  echo "torchrun.sh: VENV=$VENV has no bin/activate (create it with \`make .venv/bin/tmrl\`)" >&2
  exit 2
fi
command -v torchrun >/dev/null || {
  echo "torchrun.sh: torchrun not found: activate the project's environment or set VENV" >&2
  exit 2
}
if [ ! -f "$CONFIG" ]; then
  echo "torchrun.sh: CONFIG=$CONFIG not found (run from the repository root, or give a path)" >&2
  exit 2
fi
if (( NODE_RANK < 0 || NODE_RANK >= NNODES )); then
  echo "torchrun.sh: NODE_RANK=$NODE_RANK is not in 0..$((NNODES - 1))" >&2
  exit 2
fi
unset TMRL_RUN_ID # rank zero creates the run and publishes its id to the other ranks itself
URI=${MLFLOW_TRACKING_URI:-sqlite:///./mlflow.db} # (the app's default store)
if [[ $URI == sqlite:* ]]; then
  if (( NNODES > 1 )); then
    echo "torchrun.sh: $NNODES nodes need a tracking server: set MLFLOW_TRACKING_URI=http://HOST:5000" \
      "(deploy/README.md), not a sqlite file" >&2
    exit 2
  fi
fi
export MUJOCO_GL=${MUJOCO_GL:-egl}

# Lightning sees torchrun's RANK / LOCAL_RANK / WORLD_SIZE / MASTER_* (TorchElasticEnvironment) and starts no
# processes of its own; devices and num_nodes must match what torchrun launched.
exec torchrun \
  --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" --node_rank="$NODE_RANK" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  -m app.cli fit --config "$CONFIG" \
  trainer.accelerator="$ACCELERATOR" trainer.devices="$NPROC_PER_NODE" trainer.num_nodes="$NNODES" \
  trainer.strategy=ddp "$@"
