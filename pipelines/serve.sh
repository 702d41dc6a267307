#!/usr/bin/env bash
# `make serve`: a local Prefect server (SQLite under .prefect/, the embedded default), the
# `mtl-process` work pool, the deployments of pipelines/prefect.yaml, the automation of
# pipelines/automations.yaml (runs whose heartbeats stop end Crashed), and a worker.
# With PREFECT_API_URL already set, the existing server is used and none is started.
# `make stop` (pipelines/serve.sh stop) stops what this started: the worker and the flow runs it
# started, then the server. Each gets SIGTERM, then SIGKILL after STOP_TIMEOUT seconds (10).
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1
run_dir="$PREFECT_HOME/run"
mkdir -p "$run_dir"

# A process and all its descendants.
tree() {
  local child
  for child in $(pgrep -P "$1"); do tree "$child"; done
  echo "$1"
}

# The process groups of a process and its descendants: flow runs start in sessions of their own,
# out of the worker's group, and the stage commands they run are in theirs.
process_groups() { ps -o pgid= -p "$(tree "$1" | paste -sd, -)" | sort -u; }

# Processes of these groups that still run (a zombie has exited; its parent reaps it).
running() { ps -e -o pgid=,stat= | awk -v groups=" $* " 'index(groups, " " $1 " ") && $2 !~ /^Z/'; }

# SIGTERM to a process and everything under it, then SIGKILL to what still runs after
# STOP_TIMEOUT seconds. It is paused while its processes are listed, so that it starts no flow
# run meanwhile, and listed again while it stops (a run it was starting).
stop_one() {
  local name=$1 file="$run_dir/$1.pid" pid args group groups="" waited=0
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  args=$(ps -ww -o args= -p "$pid" || true)  # -ww: whole line, whatever COLUMNS says
  if [[ "$args" != *"prefect $name start"* ]]; then
    echo "no $name to stop: process $pid (from $file) is ${args:-gone}" >&2
  else
    kill -STOP "$pid"
    while :; do
      for group in $(process_groups "$pid"); do
        case " $groups " in
          *" $group "*) ;;
          *) groups="$groups $group"; kill -TERM -- "-$group" 2>/dev/null || true ;;
        esac
      done
      kill -CONT "$pid" 2>/dev/null || true
      [ -n "$(running $groups)" ] && [ "$waited" -lt "$((${STOP_TIMEOUT:-10} * 5))" ] || break
      sleep 0.2
      waited=$((waited + 1))
    done
    for group in $(running $groups | awk '{print $1}' | sort -u); do
      kill -KILL -- "-$group" 2>/dev/null || true
    done
    echo "stopped $name"
  fi
  rm -f "$file"
}

if [ "${1:-}" = "stop" ]; then stop_one worker; stop_one server; exit 0; fi

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
automation=mtl-pipeline-crash-zombie-runs  # the name in pipelines/automations.yaml
prefect --no-prompt automation delete "$automation" >/dev/null 2>&1 || true
prefect automation create --from-file pipelines/automations.yaml
setsid prefect worker start --pool mtl-process >"$run_dir/worker.log" 2>&1 &
echo $! >"$run_dir/worker.pid"
echo "Worker started (log: $run_dir/worker.log). UI: ${PREFECT_API_URL%/api}"
echo "Run now: PREFECT_API_URL=$PREFECT_API_URL prefect deployment run pipeline/nightly"
echo "Stop:    make stop"
