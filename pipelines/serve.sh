#!/usr/bin/env bash
# `make serve`: a local Prefect server (SQLite under .prefect/, the embedded default), the
# `mtl-process` work pool, the deployments of pipelines/prefect.yaml, and a worker.
# With PREFECT_API_URL already set, the existing server is used and none is started.
# `make stop` (pipelines/serve.sh stop) stops what this started.
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1
run_dir="$PREFECT_HOME/run"
mkdir -p "$run_dir"

stop() {
  for name in worker server; do
    if [ -f "$run_dir/$name.pid" ]; then
      pid=$(cat "$run_dir/$name.pid")
      { kill -- "-$pid" || kill "$pid"; } 2>/dev/null && echo "stopped $name" || true
      rm -f "$run_dir/$name.pid"
    fi
  done
}

if [ "${1:-}" = "stop" ]; then stop; exit 0; fi

if [ -z "${PREFECT_API_URL:-}" ]; then
  port="${PREFECT_PORT:-4200}"
  export PREFECT_API_URL="http://127.0.0.1:$port/api"
  setsid prefect server start --host 127.0.0.1 --port "$port" >"$run_dir/server.log" 2>&1 &
  echo $! >"$run_dir/server.pid"
  echo "Prefect server starting on $PREFECT_API_URL (log: $run_dir/server.log)"
fi
prefect server status --wait --timeout 120 >/dev/null
prefect work-pool inspect mtl-process >/dev/null 2>&1 || prefect work-pool create mtl-process --type process
prefect --no-prompt deploy --prefect-file pipelines/prefect.yaml --all
setsid prefect worker start --pool mtl-process >"$run_dir/worker.log" 2>&1 &
echo $! >"$run_dir/worker.pid"
echo "Worker started (log: $run_dir/worker.log). UI: ${PREFECT_API_URL%/api}"
echo "Run now: PREFECT_API_URL=$PREFECT_API_URL prefect deployment run pipeline/nightly"
echo "Stop:    make stop"
