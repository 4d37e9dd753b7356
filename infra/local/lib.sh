# shellcheck shell=bash disable=SC2034 # the variables are used by the scripts that source this
# Shared paths, ports and helpers for the native stack; sourced by the other scripts.
# Every setting can be overridden from the environment.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RUN_DIR="${FLEETPLANE_RUN_DIR:-$REPO_ROOT/.run}"
CACHE_DIR="${FLEETPLANE_CACHE:-$HOME/.cache/fleetplane}"
VENV_PYTHON="$REPO_ROOT/.venv/bin/python"

LOG_DIR="$RUN_DIR/logs"
PID_DIR="$RUN_DIR/pids"
PKI_DIR="$RUN_DIR/pki"
# The root CA's key: read only to sign issuing CAs, never by a running service.
PKI_OFFLINE_DIR="${FLEETPLANE_PKI_OFFLINE_DIR:-$RUN_DIR/pki-offline}"

KAFKA_VERSION="3.9.1"
KAFKA_LIBS="$CACHE_DIR/kafka-$KAFKA_VERSION/libs"
KAFKA_PORT="${FLEETPLANE_KAFKA_PORT:-19092}"
KAFKA_CONTROLLER_PORT="${FLEETPLANE_KAFKA_CONTROLLER_PORT:-19093}"
KAFKA_HEAP_OPTS="${FLEETPLANE_KAFKA_HEAP_OPTS:--Xms512m -Xmx1g}"

PG_BIN="${FLEETPLANE_PG_BIN:-/usr/lib/postgresql/15/bin}"
PG_PORT="${FLEETPLANE_DATABASE_PORT:-15432}"
PG_DB="${FLEETPLANE_DATABASE_NAME:-fleetplane}"
PG_USER="${FLEETPLANE_DATABASE_USER:-fleetplane}"
PG_PASSWORD="${FLEETPLANE_DATABASE_PASSWORD:-fleetplane}"

EDGE_PORT="${FLEETPLANE_EDGE_PORT:-18443}"
OPERATOR_PORT="${FLEETPLANE_OPERATOR_PORT:-18444}"
ENROLL_PORT="${FLEETPLANE_ENROLL_PORT:-18445}"
# The edge's stub_status (connection counts), plain HTTP on 127.0.0.1, read by
# prometheus-nginx-exporter (observability.sh). By default beside the edge's other
# listeners, so stacks with their own edge ports get their own status port too.
EDGE_STATUS_PORT="${FLEETPLANE_EDGE_STATUS_PORT:-$((EDGE_PORT + 3))}"
GATEWAY_AUTH_PORT="${FLEETPLANE_GATEWAY_AUTH_PORT:-18083}"
API_PORTS="${FLEETPLANE_API_PORTS:-18081 18082}"
NGINX_BIN="${FLEETPLANE_NGINX_BIN:-/usr/sbin/nginx}"
NGINX_WORKERS="${FLEETPLANE_NGINX_WORKERS:-1}"
NGINX_MODULES="${FLEETPLANE_NGINX_MODULES:-/usr/lib/nginx/modules}"

# Seconds to wait for a service to become ready, and for it to stop before SIGKILL.
START_TIMEOUT="${FLEETPLANE_START_TIMEOUT:-60}"
STOP_TIMEOUT="${FLEETPLANE_STOP_TIMEOUT:-30}"

say() { printf '%s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Elapsed time since the script started (bash 5's microsecond clock), for "ready in" lines.
_T0="${EPOCHREALTIME/./}"
elapsed() {
    local us=$((${EPOCHREALTIME/./} - _T0))
    printf '%d.%ds' $((us / 1000000)) $((us / 100000 % 10))
}

port_open() {
    # bash's /dev/tcp avoids depending on nc or ss just to probe a port.
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# True while any thread of the process is still running. An exited process can
# linger as a zombie (PID 1 here reaps late), where kill -0 still succeeds; and a
# multi-threaded one (the JVM) shows its main thread as a zombie while the other
# threads, which still hold its sockets, are being torn down.
alive() {
    local stat
    for stat in /proc/"$1"/task/*/stat; do
        stat="$(cat "$stat" 2>/dev/null)" || continue
        stat="${stat##*) }"
        [[ "${stat%% *}" != Z ]] && return 0
    done
    return 1
}

# The pid in a pid file, if that process is alive and its command line contains
# the pattern (so a recycled pid is never mistaken for our service).
live_pid() {
    local pidfile="$1" pattern="$2" pid
    [[ -s "$pidfile" ]] || return 1
    pid="$(head -n1 "$pidfile")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    alive "$pid" || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$pattern" || return 1
    printf '%s' "$pid"
}

# wait_until <what> <timeout> <pidfile> <pattern> <logfile> <command...>
# Polls the command until it succeeds; fails early, with the log's tail, when the
# process dies, and fails after the timeout.
# The pid was written just now, so it cannot be a recycled one: only whether it
# is alive counts. Its command line may not show the pattern yet (a loaded
# machine can poll before the forked shell has exec'd the service), and
# live_pid's pattern check would call a process that is starting dead.
wait_until() {
    local what="$1" timeout="$2" pidfile="$3" pattern="$4" logfile="$5"
    shift 5
    local deadline=$((SECONDS + timeout)) pid
    pid="$(head -n1 "$pidfile" 2>/dev/null)"
    [[ "$pid" =~ ^[0-9]+$ ]] || die "$what: no pid in $pidfile"
    until "$@"; do
        if ! alive "$pid"; then
            tail -n 30 "$logfile" >&2 || true
            die "$what: process exited during start-up (log: $logfile)"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 30 "$logfile" >&2 || true
            die "$what: not ready after ${timeout}s (log: $logfile)"
        fi
        sleep 0.2
    done
}

# stop_pid <name> <pidfile> <pattern> [signal]
# Sends the signal (default TERM), waits STOP_TIMEOUT, then SIGKILLs the process
# group: nginx workers share their master's group and go with it (PostgreSQL
# backends lead their own groups but exit by themselves when the postmaster dies).
stop_pid() {
    local name="$1" pidfile="$2" pattern="$3" signal="${4:-TERM}" pid deadline
    if ! pid="$(live_pid "$pidfile" "$pattern")"; then
        rm -f "$pidfile"
        say "$name: not running"
        return 0
    fi
    kill "-$signal" "$pid"
    deadline=$((SECONDS + STOP_TIMEOUT))
    while alive "$pid" && ((SECONDS < deadline)); do
        sleep 0.2
    done
    if alive "$pid"; then
        say "$name: still running after ${STOP_TIMEOUT}s, sending SIGKILL"
        if [[ "$(ps -o pgid= -p "$pid" | tr -d ' ')" == "$pid" ]]; then
            kill -KILL -- "-$pid" 2>/dev/null || true
        else
            kill -KILL "$pid" 2>/dev/null || true
        fi
        while alive "$pid"; do sleep 0.1; done
    fi
    rm -f "$pidfile"
    say "$name: stopped"
}

# status_line <name> <pidfile> <pattern> <port>; returns 0 when running.
status_line() {
    local name="$1" pidfile="$2" pattern="$3" port="$4" pid
    if pid="$(live_pid "$pidfile" "$pattern")"; then
        if port_open "$port"; then
            say "$name: running (pid $pid, 127.0.0.1:$port)"
        else
            say "$name: running (pid $pid), 127.0.0.1:$port not listening"
        fi
        return 0
    fi
    say "$name: stopped"
    return 3
}

# Refuse to start when something else already holds one of our ports.
require_free_port() {
    if port_open "$2"; then
        die "$1: 127.0.0.1:$2 is already in use by another process"
    fi
}

mkdir -p "$LOG_DIR" "$PID_DIR"

# What the Python services read (services/shared/settings.py and friends), kept in
# step with the ports above so an overridden stack is used consistently.
export FLEETPLANE_KAFKA_BOOTSTRAP="${FLEETPLANE_KAFKA_BOOTSTRAP:-127.0.0.1:$KAFKA_PORT}"
export FLEETPLANE_DATABASE_PORT="$PG_PORT" FLEETPLANE_DATABASE_NAME="$PG_DB"
export FLEETPLANE_DATABASE_USER="$PG_USER" FLEETPLANE_DATABASE_PASSWORD="$PG_PASSWORD"
export FLEETPLANE_PKI_DIR="$PKI_DIR"
export FLEETPLANE_GATEWAY_AUTH_PORT="$GATEWAY_AUTH_PORT"
export FLEETPLANE_CONTROLLER_DATA_DIR="${FLEETPLANE_CONTROLLER_DATA_DIR:-$RUN_DIR/controller}"

# Edge limits (infra/nginx/edge.conf.template). Per agent identity: sustained
# requests/s, the burst above it, and requests in flight (a long poll counts
# while it waits). Operators: the same per client address. EDGE_CONN bounds the
# requests in flight on the whole edge.
EDGE_AGENT_RATE="${FLEETPLANE_EDGE_AGENT_RATE:-10}"
EDGE_AGENT_BURST="${FLEETPLANE_EDGE_AGENT_BURST:-40}"
EDGE_AGENT_CONN="${FLEETPLANE_EDGE_AGENT_CONN:-8}"
EDGE_OPERATOR_RATE="${FLEETPLANE_EDGE_OPERATOR_RATE:-20}"
EDGE_OPERATOR_BURST="${FLEETPLANE_EDGE_OPERATOR_BURST:-40}"
EDGE_OPERATOR_CONN="${FLEETPLANE_EDGE_OPERATOR_CONN:-16}"
EDGE_CONN="${FLEETPLANE_EDGE_CONN:-3000}"
# Requests in flight to each API instance (every route but the long poll); beyond
# it the edge answers 503 with Retry-After at once (infra/nginx/render.py,
# EdgeLimits). Above what each API admits and lets wait (services/api/admission.py):
# the API decides, this only guards against a process that stopped answering.
EDGE_API_CONNS="${FLEETPLANE_EDGE_API_CONNS:-1024}"
# The OWASP CRS as Debian's modsecurity-crs package installs it.
CRS_SETUP="${FLEETPLANE_CRS_SETUP:-/etc/modsecurity/crs/crs-setup.conf}"
CRS_RULES="${FLEETPLANE_CRS_RULES:-/usr/share/modsecurity-crs/rules}"
# First of five ports for the extra nginx instances that tests and benchmarks
# start and stop themselves (tests/support/edge_probe.py EdgeProbe: the edge template's agent
# and operator listeners, a no-op upstream, the enrollment listener, stub_status): the GoTestWAF probe and
# `make bench ONLY=edge`.
EDGE_PROBE_BASE_PORT="${FLEETPLANE_EDGE_PROBE_BASE_PORT:-18450}"

# S3-compatible object storage for backups: Versity Gateway (Apache-2.0) with its
# posix backend, built once with `go install` and cached (infra/local/s3.sh).
VERSITYGW_VERSION="1.7.0"
VERSITYGW_BIN="$CACHE_DIR/versitygw-$VERSITYGW_VERSION/versitygw"
S3_PORT="${FLEETPLANE_S3_PORT:-18900}"
S3_BUCKET="${FLEETPLANE_S3_BUCKET:-fleetplane-backups}"
S3_ACCESS_KEY="${FLEETPLANE_S3_ACCESS_KEY:-fleetplane}"
S3_SECRET_KEY="${FLEETPLANE_S3_SECRET_KEY:-fleetplane-secret}"
S3_URL="${FLEETPLANE_S3_ENDPOINT:-http://127.0.0.1:$S3_PORT}"
export FLEETPLANE_S3_PORT="$S3_PORT" FLEETPLANE_S3_BUCKET="$S3_BUCKET"
export FLEETPLANE_S3_ACCESS_KEY="$S3_ACCESS_KEY"
export FLEETPLANE_S3_SECRET_KEY="$S3_SECRET_KEY"
# The backup schedule (services.sh: python -m services.backup schedule): its
# metrics port, and the age key its backups are encrypted to (made once; the
# identity sits with the root CA's key, away from the running services' folder).
BACKUP_METRICS_PORT="${FLEETPLANE_BACKUP_METRICS_PORT:-18990}"
export FLEETPLANE_BACKUP_AGE_IDENTITY_FILE="${FLEETPLANE_BACKUP_AGE_IDENTITY_FILE:-$PKI_OFFLINE_DIR/backup-age.key}"

# Monitoring (infra/local/observability.sh): Prometheus, Alertmanager, the
# PostgreSQL exporter and mtail (the edge's access log), from Debian's packages, on 127.0.0.1. Alertmanager's
# default is 19094, not its usual 9093 shape, because 19093 is Kafka's controller.
PROMETHEUS_PORT="${FLEETPLANE_PROMETHEUS_PORT:-19090}"
ALERTMANAGER_PORT="${FLEETPLANE_ALERTMANAGER_PORT:-19094}"
POSTGRES_EXPORTER_PORT="${FLEETPLANE_POSTGRES_EXPORTER_PORT:-19187}"
EDGE_EXPORTER_PORT="${FLEETPLANE_EDGE_EXPORTER_PORT:-19903}"
# prometheus-nginx-exporter over the edge's stub_status (connections); by default
# beside Prometheus (19113: the exporter's usual 9113 shape).
NGINX_EXPORTER_PORT="${FLEETPLANE_NGINX_EXPORTER_PORT:-$((PROMETHEUS_PORT + 23))}"
# The broker's metrics: the Prometheus JMX exporter, as a Java agent in Kafka's JVM
# (kafka.sh adds it when setup.sh has fetched the jar).
KAFKA_METRICS_PORT="${FLEETPLANE_KAFKA_METRICS_PORT:-19095}"
JMX_EXPORTER_VERSION="1.0.1"
JMX_EXPORTER_JAR="$CACHE_DIR/jmx_prometheus_javaagent-$JMX_EXPORTER_VERSION.jar"
OBSERVABILITY_DIR="${FLEETPLANE_OBSERVABILITY_DIR:-$RUN_DIR/observability}"
