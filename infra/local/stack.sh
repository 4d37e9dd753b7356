#!/usr/bin/env bash
# Kafka, PostgreSQL and the nginx edge together (the Python services run separately).
# Usage: stack.sh up|down|status
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
HERE="$REPO_ROOT/infra/local"

up() {
    bash "$HERE/kafka.sh" start
    bash "$HERE/postgres.sh" start
    bash "$HERE/nginx.sh" start
    bash "$HERE/s3.sh" start
    say "stack: up in $(elapsed)"
}

down() {
    bash "$HERE/s3.sh" stop
    bash "$HERE/nginx.sh" stop
    bash "$HERE/postgres.sh" stop
    bash "$HERE/kafka.sh" stop
    local port busy=0
    for port in "$EDGE_PORT" "$PG_PORT" "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "$S3_PORT"; do
        if port_open "$port"; then
            say "stack: 127.0.0.1:$port is still listening"
            busy=1
        fi
    done
    ((busy == 0)) || die "stack: down, but ports are still in use"
    say "stack: down"
}

status() {
    local rc=0
    bash "$HERE/kafka.sh" status || rc=1
    bash "$HERE/postgres.sh" status || rc=1
    bash "$HERE/nginx.sh" status || rc=1
    bash "$HERE/s3.sh" status || rc=1
    return "$rc"
}

case "${1:-}" in
up) up ;;
down) down ;;
status) status ;;
*) die "usage: $0 up|down|status" ;;
esac
