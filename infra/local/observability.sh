#!/usr/bin/env bash
# Prometheus, Alertmanager, the PostgreSQL exporter, mtail over the edge's access
# log and prometheus-nginx-exporter over the edge's stub_status (Debian's packages) on 127.0.0.1, scraping every Fleetplane service and the
# Kafka broker's JMX exporter agent (kafka.sh); configs rendered from infra/observability/.
# Usage: observability.sh start|stop|status|targets
#
# `targets` rewrites the scrape targets from the ports in the environment (API,
# gateway_auth, controllers), which Prometheus picks up without a restart.
# Tunables (the tests shorten them so an alert fires and resolves within seconds):
#   FLEETPLANE_PROMETHEUS_SCRAPE_INTERVAL / _SCRAPE_TIMEOUT / _EVALUATION_INTERVAL
#   FLEETPLANE_ALERTMANAGER_GROUP_WAIT / _GROUP_INTERVAL / _REPEAT_INTERVAL
#   FLEETPLANE_ALERTMANAGER_WEBHOOK_URL   both receivers post to <url>/page and <url>/ticket
#   FLEETPLANE_OBSERVABILITY_DIR          data, configs, pids and logs (default <run dir>/observability)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CONFIG_DIR="$REPO_ROOT/infra/observability"
CONTROLLER_PORTS="${FLEETPLANE_CONTROLLER_PORTS:-18091 18092}"
OBS_PIDS="$OBSERVABILITY_DIR/pids"
OBS_LOGS="$OBSERVABILITY_DIR/logs"
TARGETS_DIR="$OBSERVABILITY_DIR/targets"
PROM_CONFIG="$OBSERVABILITY_DIR/prometheus.yml"
AM_CONFIG="$OBSERVABILITY_DIR/alertmanager.yml"

PROM_BIN="${FLEETPLANE_PROMETHEUS_BIN:-/usr/bin/prometheus}"
AM_BIN="${FLEETPLANE_ALERTMANAGER_BIN:-/usr/bin/prometheus-alertmanager}"
PGX_BIN="${FLEETPLANE_POSTGRES_EXPORTER_BIN:-/usr/bin/prometheus-postgres-exporter}"
MTAIL_BIN="${FLEETPLANE_MTAIL_BIN:-/usr/bin/mtail}"
NGX_BIN="${FLEETPLANE_NGINX_EXPORTER_BIN:-/usr/bin/prometheus-nginx-exporter}"
EDGE_ACCESS_LOG="$RUN_DIR/nginx/logs/access.log"
PROM_PATTERN="$PROM_BIN --config.file=$PROM_CONFIG"
AM_PATTERN="$AM_BIN --config.file=$AM_CONFIG"
PGX_PATTERN="$PGX_BIN --web.listen-address=127.0.0.1:$POSTGRES_EXPORTER_PORT"
MTAIL_PATTERN="$MTAIL_BIN --progs $CONFIG_DIR/mtail --port $EDGE_EXPORTER_PORT"
NGX_PATTERN="$NGX_BIN -web.listen-address=127.0.0.1:$NGINX_EXPORTER_PORT"

# One file_sd file per job: a JSON list with one target group.
write_targets_file() {
    local job="$1" ports="$2" port sep="" list=""
    for port in $ports; do
        list+="$sep\"127.0.0.1:$port\""
        sep=", "
    done
    printf '[{"targets": [%s], "labels": {}}]\n' "$list" >"$TARGETS_DIR/$job.json.tmp"
    # Renamed into place: Prometheus never reads a half-written file.
    mv "$TARGETS_DIR/$job.json.tmp" "$TARGETS_DIR/$job.json"
}

write_targets() {
    mkdir -p "$TARGETS_DIR"
    write_targets_file fleetplane-api "$API_PORTS"
    write_targets_file fleetplane-gateway-auth "$GATEWAY_AUTH_PORT"
    write_targets_file fleetplane-controller "$CONTROLLER_PORTS"
    write_targets_file postgres "$POSTGRES_EXPORTER_PORT"
    write_targets_file edge "$EDGE_EXPORTER_PORT"
    write_targets_file nginx "$NGINX_EXPORTER_PORT"
    write_targets_file kafka "$KAFKA_METRICS_PORT"
    write_targets_file fleetplane-backup "$BACKUP_METRICS_PORT"
}

render() {
    local webhooks="[]" url="${FLEETPLANE_ALERTMANAGER_WEBHOOK_URL:-}"
    [[ -n "$url" ]] && webhooks='[{url: "'"$url"'/%s", send_resolved: true}]'
    # shellcheck disable=SC2059 # the format is ours, built just above
    SCRAPE_INTERVAL="${FLEETPLANE_PROMETHEUS_SCRAPE_INTERVAL:-15s}" \
        SCRAPE_TIMEOUT="${FLEETPLANE_PROMETHEUS_SCRAPE_TIMEOUT:-10s}" \
        EVALUATION_INTERVAL="${FLEETPLANE_PROMETHEUS_EVALUATION_INTERVAL:-15s}" \
        DEPLOYMENT="${FLEETPLANE_DEPLOYMENT_NAME:-local}" \
        RULES_DIR="$CONFIG_DIR/rules" TARGETS_DIR="$TARGETS_DIR" PKI_DIR="$PKI_DIR" \
        PROMETHEUS_PORT="$PROMETHEUS_PORT" ALERTMANAGER_PORT="$ALERTMANAGER_PORT" \
        GROUP_WAIT="${FLEETPLANE_ALERTMANAGER_GROUP_WAIT:-30s}" \
        GROUP_INTERVAL="${FLEETPLANE_ALERTMANAGER_GROUP_INTERVAL:-5m}" \
        REPEAT_INTERVAL="${FLEETPLANE_ALERTMANAGER_REPEAT_INTERVAL:-4h}" \
        PAGE_WEBHOOKS="$(printf "$webhooks" page)" TICKET_WEBHOOKS="$(printf "$webhooks" ticket)" \
        bash -c '
            python3 "$1/render.py" "$1/prometheus.yml.template" "$2" &&
            python3 "$1/render.py" "$1/alertmanager.yml.template" "$3"' \
        render "$CONFIG_DIR" "$PROM_CONFIG" "$AM_CONFIG"
}

ready() { curl -sf -o /dev/null --max-time 2 "http://127.0.0.1:$1$2"; }

# launch <name> <pidfile> <pattern> <port> <ready-path> <command...>
launch() {
    local name="$1" pidfile="$2" pattern="$3" port="$4" path="$5" pid
    shift 5
    if pid="$(live_pid "$pidfile" "$pattern")"; then
        say "$name: already running (pid $pid)"
        return 0
    fi
    require_free_port "$name" "$port"
    setsid "$@" >>"$OBS_LOGS/$name.log" 2>&1 </dev/null &
    echo $! >"$pidfile"
    wait_until "$name" "$START_TIMEOUT" "$pidfile" "$pattern" "$OBS_LOGS/$name.log" ready "$port" "$path"
    say "$name: ready on http://127.0.0.1:$port in $(elapsed)"
}

start() {
    local bin
    for bin in "$PROM_BIN" "$AM_BIN" "$PGX_BIN" "$MTAIL_BIN" "$NGX_BIN"; do
        [[ -x "$bin" ]] || die "observability: $bin missing; run infra/local/setup.sh"
    done
    mkdir -p "$OBS_PIDS" "$OBS_LOGS" "$OBSERVABILITY_DIR/prometheus-data" "$OBSERVABILITY_DIR/alertmanager-data"
    write_targets
    render
    # The exporter's DSN carries the password: only in its environment, never on a command line.
    DATA_SOURCE_NAME="postgresql://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB?sslmode=disable" \
        launch postgres-exporter "$OBS_PIDS/postgres-exporter.pid" "$PGX_PATTERN" \
        "$POSTGRES_EXPORTER_PORT" /metrics \
        "$PGX_BIN" "--web.listen-address=127.0.0.1:$POSTGRES_EXPORTER_PORT"
    # mtail follows the edge's access log (also across nginx's reopen on rotation);
    # the file may not exist yet when nginx has not started: it is created empty.
    mkdir -p "$(dirname "$EDGE_ACCESS_LOG")"
    touch "$EDGE_ACCESS_LOG"
    launch edge-exporter "$OBS_PIDS/edge-exporter.pid" "$MTAIL_PATTERN" "$EDGE_EXPORTER_PORT" /metrics \
        "$MTAIL_BIN" --progs "$CONFIG_DIR/mtail" --port "$EDGE_EXPORTER_PORT" --address 127.0.0.1 \
        --logs "$EDGE_ACCESS_LOG" --emit_prog_label=false --logtostderr
    # The edge's connections from its stub_status listener (infra/nginx/edge.conf.template).
    # The exporter exits when nginx does not answer at start (after the retries);
    # later it keeps running and reports nginx_up 0.
    launch nginx-exporter "$OBS_PIDS/nginx-exporter.pid" "$NGX_PATTERN" "$NGINX_EXPORTER_PORT" /metrics \
        "$NGX_BIN" "-web.listen-address=127.0.0.1:$NGINX_EXPORTER_PORT" \
        "-nginx.scrape-uri=http://127.0.0.1:$EDGE_STATUS_PORT/stub_status" \
        -nginx.retries=5 -nginx.retry-interval=1s -nginx.timeout=2s
    # An empty cluster address turns gossip off: one Alertmanager, no extra port.
    launch alertmanager "$OBS_PIDS/alertmanager.pid" "$AM_PATTERN" "$ALERTMANAGER_PORT" /-/ready \
        "$AM_BIN" "--config.file=$AM_CONFIG" "--storage.path=$OBSERVABILITY_DIR/alertmanager-data" \
        "--web.listen-address=127.0.0.1:$ALERTMANAGER_PORT" --cluster.listen-address= \
        "--web.external-url=http://127.0.0.1:$ALERTMANAGER_PORT"
    launch prometheus "$OBS_PIDS/prometheus.pid" "$PROM_PATTERN" "$PROMETHEUS_PORT" /-/ready \
        "$PROM_BIN" "--config.file=$PROM_CONFIG" "--storage.tsdb.path=$OBSERVABILITY_DIR/prometheus-data" \
        "--web.listen-address=127.0.0.1:$PROMETHEUS_PORT" --storage.tsdb.retention.time=7d \
        --web.enable-lifecycle "--web.external-url=http://127.0.0.1:$PROMETHEUS_PORT"
}

stop() {
    stop_pid prometheus "$OBS_PIDS/prometheus.pid" "$PROM_PATTERN"
    stop_pid alertmanager "$OBS_PIDS/alertmanager.pid" "$AM_PATTERN"
    stop_pid postgres-exporter "$OBS_PIDS/postgres-exporter.pid" "$PGX_PATTERN"
    stop_pid edge-exporter "$OBS_PIDS/edge-exporter.pid" "$MTAIL_PATTERN"
    stop_pid nginx-exporter "$OBS_PIDS/nginx-exporter.pid" "$NGX_PATTERN"
}

status() {
    local rc=0
    status_line prometheus "$OBS_PIDS/prometheus.pid" "$PROM_PATTERN" "$PROMETHEUS_PORT" || rc=1
    status_line alertmanager "$OBS_PIDS/alertmanager.pid" "$AM_PATTERN" "$ALERTMANAGER_PORT" || rc=1
    status_line postgres-exporter "$OBS_PIDS/postgres-exporter.pid" "$PGX_PATTERN" "$POSTGRES_EXPORTER_PORT" || rc=1
    status_line edge-exporter "$OBS_PIDS/edge-exporter.pid" "$MTAIL_PATTERN" "$EDGE_EXPORTER_PORT" || rc=1
    status_line nginx-exporter "$OBS_PIDS/nginx-exporter.pid" "$NGX_PATTERN" "$NGINX_EXPORTER_PORT" || rc=1
    return "$rc"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
status) status ;;
targets) write_targets ;;
*) die "usage: $0 start|stop|status|targets" ;;
esac
