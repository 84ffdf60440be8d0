#!/usr/bin/env bash
# A shared MLflow tracking server for a team: PostgreSQL for runs, a directory for artifacts.
#   deploy/tracking-server.sh                       # private PostgreSQL under ./deploy-state, port 5000
#   MLFLOW_TRACKING_URI=http://HOST:5000 tmrl fit --config configs/csp_state.yaml
# Needs Debian's postgresql package (apt-get install postgresql) and psycopg2-binary in the venv.
set -euo pipefail
STATE=${STATE:-$PWD/deploy-state}
PGPORT=${PGPORT:-55432}
PORT=${PORT:-5000}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | tail -n 1)
mkdir -p "$STATE/artifacts"
if [ ! -f "$STATE/pg/PG_VERSION" ]; then
  chown -R postgres "$STATE" 2>/dev/null || true
  su postgres -c "$PGBIN/initdb -D $STATE/pg -U mlflow --auth=trust" >/dev/null
fi
su postgres -c "$PGBIN/pg_ctl -D $STATE/pg -o '-p $PGPORT -k /tmp' -l $STATE/pg.log start" >/dev/null || true
psql -h /tmp -p "$PGPORT" -U mlflow -d postgres -tc "SELECT 1 FROM pg_database WHERE datname='mlflow'" \
  | grep -q 1 || psql -h /tmp -p "$PGPORT" -U mlflow -d postgres -c "CREATE DATABASE mlflow" >/dev/null
# many worker processes: start it in its own process group, stop it with: kill -- -<pgid>
exec setsid mlflow server \
  --backend-store-uri "postgresql+psycopg2://mlflow@localhost:$PGPORT/mlflow" \
  --artifacts-destination "$STATE/artifacts" --host 0.0.0.0 --port "$PORT"
