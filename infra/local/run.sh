#!/usr/bin/env bash
# `make run`: set up what is missing, start the whole stack natively, drive it with
# simulated agents and an operator changing desired state, and show what happens.
# Ctrl-C (or `make stop` from another shell) stops everything.
#
# FLEETPLANE_RUN_DURATION=<s> stops by itself after that many seconds;
# FLEETPLANE_SIM_AGENTS / _CUSTOMERS size the simulated fleet.
set -euo pipefail
HERE="$(dirname "${BASH_SOURCE[0]}")"
source "$HERE/lib.sh"

AGENTS="${FLEETPLANE_SIM_AGENTS:-24}"
CUSTOMERS="${FLEETPLANE_SIM_CUSTOMERS:-4}"
DURATION="${FLEETPLANE_RUN_DURATION:-}"
CONTROLLER_PORTS="${FLEETPLANE_CONTROLLER_PORTS:-18091 18092}"

SIM_PID=""
stop_everything() {
    trap - EXIT INT TERM
    say ""
    say "stopping..."
    if [[ -n "$SIM_PID" ]] && alive "$SIM_PID"; then
        kill -TERM "$SIM_PID" 2>/dev/null || true
        wait "$SIM_PID" || true
    fi
    bash "$HERE/demo.sh" stop || true
    bash "$HERE/services.sh" stop || true
    bash "$HERE/observability.sh" stop || true
    bash "$HERE/stack.sh" down || true
    rm -f "$PID_DIR/run.pid"
}
trap stop_everything EXIT
# A stop asked for (Ctrl-C, make stop) is a normal end, not a failure.
trap 'exit 0' INT TERM
echo $$ >"$PID_DIR/run.pid"

bash "$HERE/setup.sh"
bash "$HERE/stack.sh" up
"$VENV_PYTHON" -m services.shared.topics
"$VENV_PYTHON" -m services.shared.migrate
# A backup every minute while the demo runs (the default schedule is hourly).
FLEETPLANE_BACKUP_SCHEDULE="${FLEETPLANE_BACKUP_SCHEDULE:-* * * * *}" bash "$HERE/services.sh" start
FLEETPLANE_CONTROLLER_PORTS="$CONTROLLER_PORTS" bash "$HERE/observability.sh" start

KEY="$("$VENV_PYTHON" -m services.gateway_auth.operator_keys create --name make-run --all-customers)"
metrics_args=()
status_args=()
for port in $CONTROLLER_PORTS; do
    metrics_args+=(--controller-metrics "http://127.0.0.1:$port/metrics")
    status_args+=(--controller-status "http://127.0.0.1:$port/status")
done

cat <<INFO

Fleetplane is running (everything on 127.0.0.1):
  agent edge (mTLS)   https://127.0.0.1:$EDGE_PORT        certificates in $PKI_DIR
  operator edge       https://127.0.0.1:$OPERATOR_PORT        key: $KEY
  agent enrollment    https://127.0.0.1:$ENROLL_PORT        POST /v1/enroll with a token and a CSR
  gateway_auth        https://127.0.0.1:$GATEWAY_AUTH_PORT        (behind the edge; enrollment, renewal, revocations)
  API instances       $(for p in $API_PORTS; do printf 'https://127.0.0.1:%s ' "$p"; done)
  controllers         $(for p in $CONTROLLER_PORTS; do printf 'http://127.0.0.1:%s/status ' "$p"; done)
  Kafka               127.0.0.1:$KAFKA_PORT        PostgreSQL 127.0.0.1:$PG_PORT
  S3 (backups)        $S3_URL        bucket: $S3_BUCKET
  backups             every minute; .venv/bin/python -m services.backup list   metrics http://127.0.0.1:$BACKUP_METRICS_PORT/metrics
  Prometheus          http://127.0.0.1:$PROMETHEUS_PORT        alerts: http://127.0.0.1:$PROMETHEUS_PORT/alerts
  Alertmanager        http://127.0.0.1:$ALERTMANAGER_PORT
  logs                $LOG_DIR
Try: curl -s --cacert $PKI_DIR/root-ca.pem -H "Authorization: Bearer $KEY" \\
       https://127.0.0.1:$OPERATOR_PORT/v1/operator/customers/cust-0/environments
Ops view: .venv/bin/python -m services.controller status --watch   (partitions, owners, lag)
INFO

FLEETPLANE_OPERATOR_KEY="$KEY" bash "$HERE/demo.sh" start "$CUSTOMERS"
say "simulating $AGENTS agents of $CUSTOMERS customers${DURATION:+ for ${DURATION}s}; Ctrl-C stops"
# In the background so that the traps run at once on Ctrl-C or `make stop`
# (bash runs a trap only after a foreground child returns).
"$VENV_PYTHON" -m bench.simulator --agents "$AGENTS" --customers "$CUSTOMERS" \
    "${status_args[@]}" \
    --edge-url "https://127.0.0.1:$EDGE_PORT" --pki-dir "$PKI_DIR" \
    --report "$RUN_DIR/simulator-report.json" \
    ${DURATION:+--duration "$DURATION"} "${metrics_args[@]}" </dev/null &
SIM_PID=$!
wait "$SIM_PID"
