#!/usr/bin/env bash
# A team MLflow tracking server WITHOUT Docker: a private PostgreSQL instance for the runs (Debian's
# `postgresql` package: initdb + pg_ctl, nothing system-wide is touched) and `mlflow server`, which stores
# and serves the artifacts (checkpoints, plots) from a directory.
#
#   deploy/tracking-server.sh start     # initialise (first time), start both, wait until healthy
#   deploy/tracking-server.sh status    # what runs, and the tracking URI
#   deploy/tracking-server.sh stop      # stop both, by their process ids
#   MLFLOW_TRACKING_URI=http://127.0.0.1:5000 tmrl fit --config configs/quickstart.yaml
#
# Settings (environment): STATE (./deploy-state: the database cluster, artifacts, logs, pid files),
# HOST (127.0.0.1; 0.0.0.0 to serve the team's network), PORT (5000), PGPORT (55432), WORKERS (2, the
# server's worker processes), START_TIMEOUT (120 s). Needs PostgreSQL's server binaries (apt-get install
# postgresql) and the psycopg2 driver in the environment that runs `mlflow` (pip install -e '.[server]').
# The database trusts local connections only (unix socket in $STATE, loopback TCP), so run it on a host
# whose users you trust, or put a password on the `mlflow` role.
set -euo pipefail

STATE=$(realpath -m "${STATE:-$PWD/deploy-state}")
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-5000}
PGPORT=${PGPORT:-55432}
WORKERS=${WORKERS:-2}
START_TIMEOUT=${START_TIMEOUT:-120}
MLFLOW=${MLFLOW:-$(command -v mlflow || true)}
PGDATA=$STATE/pg
SOCKETS=$STATE/sockets
PIDFILE=$STATE/mlflow.pid
URL_HOST=$HOST
[ "$HOST" = "0.0.0.0" ] && URL_HOST=$(hostname)
URI=http://$URL_HOST:$PORT

die() { echo "tracking-server: $*" >&2; exit 1; }

pg_bin() {  # a PostgreSQL server program: on PATH, else the newest Debian install
  local found
  found=$(command -v "$1" 2>/dev/null || ls -d /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | sort -V | tail -n 1)
  [ -n "$found" ] || die "PostgreSQL's $1 not found: install the server (apt-get install postgresql)"
  echo "$found"
}

as_db_owner() {  # PostgreSQL refuses to run as root: as root, run it as the `postgres` system user
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root needs the 'postgres' user (apt-get install postgresql)"
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

healthy() { curl -fsS -m 2 "$URI/health" >/dev/null 2>&1; }

mlflow_pid() {  # the server's process id, if it runs
  [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null && cat "$PIDFILE"
}

start() {
  [ -n "$MLFLOW" ] || die "mlflow not found on PATH: activate the project's environment (.venv/bin/activate)"
  "$(dirname "$MLFLOW")/python" -c "import psycopg2" 2>/dev/null \
    || die "the psycopg2 driver is missing beside $MLFLOW: pip install -e '.[server]'"
  command -v curl >/dev/null || die "curl is needed for the health check (apt-get install curl)"
  mkdir -p "$STATE/artifacts" "$SOCKETS"
  if [ ! -f "$PGDATA/PG_VERSION" ]; then
    echo "tracking-server: initialising a PostgreSQL cluster in $PGDATA"
    if [ "$(id -u)" = 0 ]; then
      chown postgres "$STATE" "$SOCKETS"
      runuser -u postgres -- test -w "$STATE" \
        || die "the postgres user cannot reach $STATE (a parent folder is private): choose another STATE"
    fi
    as_db_owner "$(pg_bin initdb)" -D "$PGDATA" -U mlflow --auth=trust -E UTF8 >"$STATE/initdb.log" \
      || die "initdb failed: see $STATE/initdb.log"
  fi
  if [ "$(id -u)" = 0 ]; then chown postgres "$SOCKETS"; fi
  if ! as_db_owner "$(pg_bin pg_ctl)" -D "$PGDATA" status >/dev/null 2>&1; then
    as_db_owner "$(pg_bin pg_ctl)" -D "$PGDATA" -w -t "$START_TIMEOUT" -l "$STATE/postgres.log" \
      -o "-p $PGPORT -k $SOCKETS -c listen_addresses=127.0.0.1" start >/dev/null \
      || die "PostgreSQL did not start on port $PGPORT: see $STATE/postgres.log"
  fi
  local psql=(psql -h "$SOCKETS" -p "$PGPORT" -U mlflow -d postgres -qtA)
  if [ "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = 'mlflow'")" != 1 ]; then
    "${psql[@]}" -c "CREATE DATABASE mlflow" >/dev/null
  fi
  if pid=$(mlflow_pid); then
    echo "tracking-server: mlflow server already runs (pid $pid) at $URI"
    return
  fi
  healthy && die "port $PORT already serves something else: set PORT"
  # its own session (setsid), so `stop` ends the server and all its workers through the group id
  setsid "$MLFLOW" server \
    --backend-store-uri "postgresql+psycopg2://mlflow@127.0.0.1:$PGPORT/mlflow" \
    --artifacts-destination "$STATE/artifacts" --serve-artifacts \
    --host "$HOST" --port "$PORT" --workers "$WORKERS" >>"$STATE/mlflow.log" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  local waited=0
  until healthy; do
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || die "mlflow server exited: see $STATE/mlflow.log"
    [ "$waited" -ge "$START_TIMEOUT" ] && die "mlflow server not healthy after ${START_TIMEOUT}s: see $STATE/mlflow.log"
    sleep 1
    waited=$((waited + 1))
  done
  echo "tracking-server: healthy after ${waited}s; runs in PostgreSQL (port $PGPORT), artifacts in $STATE/artifacts"
  echo "MLFLOW_TRACKING_URI=$URI"
}

stop() {
  if pid=$(mlflow_pid); then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "tracking-server: mlflow server (pid $pid) stopped"
  fi
  rm -f "$PIDFILE"
  if [ -f "$PGDATA/PG_VERSION" ] && as_db_owner "$(pg_bin pg_ctl)" -D "$PGDATA" status >/dev/null 2>&1; then
    as_db_owner "$(pg_bin pg_ctl)" -D "$PGDATA" -m fast -w stop >/dev/null
    echo "tracking-server: PostgreSQL stopped"
  fi
}

status() {
  local up=0
  if pid=$(mlflow_pid); then echo "mlflow server: pid $pid"; else echo "mlflow server: not running"; up=1; fi
  if [ -f "$PGDATA/PG_VERSION" ] && as_db_owner "$(pg_bin pg_ctl)" -D "$PGDATA" status >/dev/null 2>&1; then
    echo "PostgreSQL: running on port $PGPORT"
  else
    echo "PostgreSQL: not running"; up=1
  fi
  if healthy; then echo "MLFLOW_TRACKING_URI=$URI (healthy)"; else echo "$URI: no answer"; up=1; fi
  return $up
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status   (settings: STATE HOST PORT PGPORT WORKERS START_TIMEOUT)" >&2; exit 2 ;;
esac
