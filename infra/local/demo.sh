#!/usr/bin/env bash
# The operator demo of `make run`, in the background. Usage: demo.sh start <customers>|stop
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PIDFILE="$PID_DIR/operator-demo.pid"
PATTERN="-m bench.operator_demo"

case "${1:-}" in
start)
    [[ -n "${FLEETPLANE_OPERATOR_KEY:-}" ]] || die "demo: FLEETPLANE_OPERATOR_KEY is not set"
    setsid "$VENV_PYTHON" -m bench.operator_demo --key "$FLEETPLANE_OPERATOR_KEY" \
        --operator-url "https://127.0.0.1:$OPERATOR_PORT" --pki-dir "$PKI_DIR" \
        --customers "${2:-4}" >>"$LOG_DIR/operator-demo.log" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    say "operator demo: changing desired state every 20 s (log $LOG_DIR/operator-demo.log)"
    ;;
stop) stop_pid "operator demo" "$PIDFILE" "$PATTERN" ;;
*) die "usage: $0 start <customers>|stop" ;;
esac
