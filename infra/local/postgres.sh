#!/usr/bin/env bash
# PostgreSQL 15 on 127.0.0.1 with its data and socket under the run folder.
# Usage: postgres.sh start|stop|status
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PG_DIR="$RUN_DIR/postgres"
# The server runs as the postgres user, who cannot reach a run folder below a
# private parent (a checkout under /root, say). Then the data lives in a folder
# of its own, named after the run folder so two checkouts never share one.
if ((EUID == 0)) && ! runuser -u postgres -- test -x "$RUN_DIR" 2>/dev/null; then
    PG_DIR="/var/tmp/fleetplane-postgres-$(printf '%s' "$RUN_DIR" | sha256sum | cut -c1-12)"
    PG_OUTSIDE_RUN_DIR=1
fi
DATA_DIR="$PG_DIR/data"
SOCKET_DIR="$PG_DIR/socket"
PIDFILE="$PID_DIR/postgres.pid"
LOGFILE="$LOG_DIR/postgres.log"
# The server writes its log itself, as the postgres user.
[[ -n "${PG_OUTSIDE_RUN_DIR:-}" ]] && LOGFILE="$PG_DIR/postgres.log"
PATTERN="postgres -D $DATA_DIR"

# initdb and pg_ctl refuse to run as root, so root runs them as the postgres user.
as_pg() {
    if ((EUID == 0)); then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

prepare_dirs() {
    mkdir -p "$PG_DIR" "$SOCKET_DIR"
    touch "$LOGFILE"
    if ((EUID == 0)); then
        chown postgres:postgres "$PG_DIR" "$SOCKET_DIR" "$LOGFILE"
    fi
    as_pg test -w "$PG_DIR" ||
        die "postgres: the postgres user cannot write $PG_DIR (a parent folder is not searchable?)"
}

init_cluster() {
    [[ -f "$DATA_DIR/PG_VERSION" ]] && return 0
    say "postgres: initdb $DATA_DIR"
    # peer on the socket (only the OS user that owns the cluster gets in as
    # superuser); passwords over TCP, which is how the services connect.
    as_pg "$PG_BIN/initdb" -D "$DATA_DIR" --auth-local=peer --auth-host=scram-sha-256 \
        --encoding=UTF8 --locale=C >>"$LOGFILE" 2>&1 ||
        die "postgres: initdb failed (log: $LOGFILE)"
    echo "include_if_exists = 'fleetplane.conf'" | as_pg tee -a "$DATA_DIR/postgresql.conf" >/dev/null
}

write_config() {
    # Rewritten on every start so port and paths follow the environment.
    as_pg tee "$DATA_DIR/fleetplane.conf" >/dev/null <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$SOCKET_DIR'
max_connections = 200
shared_buffers = 128MB
password_encryption = scram-sha-256
timezone = 'UTC'
log_line_prefix = '%m [%p] %q%u@%d '
CONF
}

psql_admin() {
    as_pg "$PG_BIN/psql" -h "$SOCKET_DIR" -p "$PG_PORT" -d postgres -X -q -v ON_ERROR_STOP=1 "$@"
}

ensure_role_and_database() {
    # CREATEDB lets tests make scratch databases; the password is reset on every
    # start so a changed FLEETPLANE_DATABASE_PASSWORD takes effect.
    psql_admin -v user="$PG_USER" -v password="$PG_PASSWORD" -v db="$PG_DB" <<'SQL'
SELECT format('CREATE ROLE %I', :'user')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'user') \gexec
SELECT format('ALTER ROLE %I LOGIN CREATEDB PASSWORD %L', :'user', :'password') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'user')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
SQL
}

tcp_login() {
    PGPASSWORD="$PG_PASSWORD" PGCONNECT_TIMEOUT=5 "$PG_BIN/psql" -X -q -At \
        -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d "$PG_DB" -c 'SELECT 1' >/dev/null
}

start() {
    if pid="$(live_pid "$PIDFILE" "$PATTERN")"; then
        say "postgres: already running (pid $pid)"
        return 0
    fi
    [[ -x "$PG_BIN/pg_ctl" ]] || die "postgres: $PG_BIN/pg_ctl missing; run infra/local/setup.sh"
    require_free_port postgres "$PG_PORT"
    prepare_dirs
    init_cluster
    write_config
    say "postgres: starting (log $LOGFILE)"
    # pg_ctl -w returns once the server accepts connections, or fails after -t seconds.
    as_pg "$PG_BIN/pg_ctl" start -D "$DATA_DIR" -l "$LOGFILE" -w -t "$START_TIMEOUT" -s ||
        { tail -n 30 "$LOGFILE" >&2; die "postgres: did not start (log: $LOGFILE)"; }
    head -n1 "$DATA_DIR/postmaster.pid" >"$PIDFILE"
    ensure_role_and_database
    tcp_login || die "postgres: $PG_USER cannot log in over TCP on 127.0.0.1:$PG_PORT"
    say "postgres: ready on 127.0.0.1:$PG_PORT (db $PG_DB, user $PG_USER) in $(elapsed)"
}

case "${1:-}" in
start) start ;;
# SIGINT is PostgreSQL's fast shutdown; SIGTERM ("smart") would wait for every
# client, such as a test's idle pool, to disconnect.
stop) stop_pid postgres "$PIDFILE" "$PATTERN" INT ;;
status) status_line postgres "$PIDFILE" "$PATTERN" "$PG_PORT" ;;
*) die "usage: $0 start|stop|status" ;;
esac
