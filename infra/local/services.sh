#!/usr/bin/env bash
# The Python services of the native stack: gateway_auth, API instances, controllers
# and the backup schedule.
# Usage: services.sh start|stop|status
# Needs the stack (stack.sh up), topics and migrations in place.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CONTROLLER_PORTS="${FLEETPLANE_CONTROLLER_PORTS:-18091 18092}"

api_ready() {
    curl -sf -o /dev/null --max-time 2 --cacert "$PKI_DIR/internal-ca.pem" \
        --resolve "localhost:$1:127.0.0.1" "https://localhost:$1/readyz"
}

gateway_auth_ready() { api_ready "$1"; }

backup_ready() {
    curl -sf -o /dev/null --max-time 2 "http://127.0.0.1:$1/metrics"
}

# An age key for the native stack's backups, made once (age-keygen's file format).
ensure_backup_key() {
    local key="$FLEETPLANE_BACKUP_AGE_IDENTITY_FILE"
    [[ -s "$key" ]] && return 0
    mkdir -p "$(dirname "$key")"
    (umask 077 && "$VENV_PYTHON" -c 'import pyrage
i = pyrage.x25519.Identity.generate()
print(f"# public key: {i.to_public()}")
print(i)' >"$key")
    say "backup: age key made in $key"
}

controller_ready() {
    curl -sf -o /dev/null --max-time 2 "http://127.0.0.1:$1/readyz"
}

# start_service <name> <port> <ready-function> <python module args...>
start_service() {
    local name="$1" port="$2" ready="$3"
    shift 3
    local pidfile="$PID_DIR/$name.pid" logfile="$LOG_DIR/$name.log" pattern="-m $*"
    if pid="$(live_pid "$pidfile" "$pattern")"; then
        say "$name: already running (pid $pid)"
        return 0
    fi
    require_free_port "$name" "$port"
    mkdir -p "$PID_DIR" "$LOG_DIR"
    setsid "$VENV_PYTHON" -m "$@" >>"$logfile" 2>&1 </dev/null &
    echo $! >"$pidfile"
    wait_until "$name" "$START_TIMEOUT" "$pidfile" "$pattern" "$logfile" "$ready" "$port"
    say "$name: ready on 127.0.0.1:$port in $(elapsed) (log $logfile)"
}

api_args() { echo "services.api --port $1"; }
gateway_auth_args() { echo "services.gateway_auth --port $1"; }
controller_args() { echo "services.controller --web-port $1 --instance-id controller-$2"; }
backup_args() { echo "services.backup schedule --port $1"; }

start() {
    local port i=0
    # shellcheck disable=SC2046 # the words are meant to split
    start_service gateway-auth "$GATEWAY_AUTH_PORT" gateway_auth_ready \
        $(gateway_auth_args "$GATEWAY_AUTH_PORT")
    for port in $API_PORTS; do
        i=$((i + 1))
        # shellcheck disable=SC2046 # the words are meant to split
        start_service "api-$i" "$port" api_ready $(api_args "$port")
    done
    i=0
    for port in $CONTROLLER_PORTS; do
        i=$((i + 1))
        # shellcheck disable=SC2046
        start_service "controller-$i" "$port" controller_ready $(controller_args "$port" "$i")
    done
    ensure_backup_key
    # shellcheck disable=SC2046
    start_service backup "$BACKUP_METRICS_PORT" backup_ready $(backup_args "$BACKUP_METRICS_PORT")
}

each() {
    local action="$1" port i=0 status=0
    "$action" backup "$BACKUP_METRICS_PORT" || status=$?
    for port in $CONTROLLER_PORTS; do
        i=$((i + 1))
        "$action" "controller-$i" "$port" || status=$?
    done
    i=0
    for port in $API_PORTS; do
        i=$((i + 1))
        "$action" "api-$i" "$port" || status=$?
    done
    "$action" gateway-auth "$GATEWAY_AUTH_PORT" || status=$?
    return "$status"
}

pattern_of() {
    case "$1" in
    api-*) echo "-m $(api_args "$2")" ;;
    gateway-auth) echo "-m $(gateway_auth_args "$2")" ;;
    controller-*) echo "-m $(controller_args "$2" "${1#controller-}")" ;;
    backup) echo "-m $(backup_args "$2")" ;;
    esac
}
stop_one() { stop_pid "$1" "$PID_DIR/$1.pid" "$(pattern_of "$1" "$2")"; }
status_one() { status_line "$1" "$PID_DIR/$1.pid" "$(pattern_of "$1" "$2")" "$2"; }

case "${1:-}" in
start) start ;;
stop) each stop_one ;;
status) each status_one ;;
*) die "usage: $0 start|stop|status" ;;
esac
