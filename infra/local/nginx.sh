#!/usr/bin/env bash
# nginx edge: agent mTLS, operator and enrollment listeners on 127.0.0.1, proxying to the
# API instances and gateway_auth over mTLS.
# Usage: nginx.sh start|stop|reload|status
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NGINX_DIR="$RUN_DIR/nginx"
CONF="$NGINX_DIR/nginx.conf"
TEMPLATE="$REPO_ROOT/infra/nginx/edge.conf.template"
PIDFILE="$PID_DIR/nginx.pid"
LOGFILE="$LOG_DIR/nginx.log"
PATTERN="-c $CONF"
NGINX=("$NGINX_BIN" -e "$NGINX_DIR/logs/error.log" -p "$NGINX_DIR" -c "$CONF")

render() {
    [[ -f "$PKI_DIR/agent-ca-bundle.pem" && -f "$PKI_DIR/edge-client.pem" ]] ||
        die "nginx: PKI missing in $PKI_DIR; run infra/local/setup.sh"
    mkdir -p "$NGINX_DIR/logs" "$NGINX_DIR/temp"
    local servers=() port
    for port in $API_PORTS; do
        servers+=(--api-server "127.0.0.1:$port")
    done
    # The one renderer of the template (also used by compose, benchmarks and tests).
    python3 "$REPO_ROOT/infra/nginx/render.py" --output "$CONF" \
        --nginx-dir "$NGINX_DIR" --pki-dir "$PKI_DIR" --pid-file "$PIDFILE" \
        --nginx-modules "$NGINX_MODULES" --workers "$NGINX_WORKERS" \
        --edge-port "$EDGE_PORT" --operator-port "$OPERATOR_PORT" \
        --enroll-port "$ENROLL_PORT" --status-port "$EDGE_STATUS_PORT" \
        "${servers[@]}" --gateway-auth "127.0.0.1:$GATEWAY_AUTH_PORT" \
        --crs-setup "$CRS_SETUP" --crs-rules "$CRS_RULES" \
        --agent-rate "$EDGE_AGENT_RATE" --agent-burst "$EDGE_AGENT_BURST" \
        --agent-conn "$EDGE_AGENT_CONN" --operator-rate "$EDGE_OPERATOR_RATE" \
        --operator-burst "$EDGE_OPERATOR_BURST" --operator-conn "$EDGE_OPERATOR_CONN" \
        --edge-conn "$EDGE_CONN" --api-conns "$EDGE_API_CONNS" ||
        die "nginx: rendering $TEMPLATE failed"
    "${NGINX[@]}" -t -q 2>"$NGINX_DIR/logs/config-test.log" ||
        { cat "$NGINX_DIR/logs/config-test.log" >&2; die "nginx: configuration test failed ($CONF)"; }
}

# Any TLS answer will do: without a client certificate the edge answers 401.
answers() {
    [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 --cacert "$PKI_DIR/root-ca.pem" \
        "https://127.0.0.1:$EDGE_PORT/")" == 401 ]]
}

start() {
    if pid="$(live_pid "$PIDFILE" "$PATTERN")"; then
        say "nginx: already running (pid $pid)"
        return 0
    fi
    require_free_port nginx "$EDGE_PORT"
    require_free_port nginx "$OPERATOR_PORT"
    require_free_port nginx "$ENROLL_PORT"
    require_free_port nginx "$EDGE_STATUS_PORT"
    render
    # daemon off under setsid: we know the master's pid at once, and it leads a
    # process group that holds its workers.
    setsid "${NGINX[@]}" -g 'daemon off;' >>"$LOGFILE" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    say "nginx: starting (pid $!, log $NGINX_DIR/logs/error.log)"
    wait_until nginx 10 "$PIDFILE" "$PATTERN" "$NGINX_DIR/logs/error.log" answers
    say "nginx: ready on https://127.0.0.1:$EDGE_PORT in $(elapsed)"
}

reload() {
    local pid
    pid="$(live_pid "$PIDFILE" "$PATTERN")" || die "nginx: not running"
    render
    kill -HUP "$pid"
    say "nginx: reloaded (pid $pid)"
}

case "${1:-}" in
start) start ;;
stop) stop_pid nginx "$PIDFILE" "$PATTERN" ;;
reload) reload ;;
status) status_line nginx "$PIDFILE" "$PATTERN" "$EDGE_PORT" ;;
*) die "usage: $0 start|stop|reload|status" ;;
esac
