#!/usr/bin/env bash
# S3-compatible storage for backups: Versity Gateway's posix backend on 127.0.0.1,
# objects under the run folder; the backup bucket is created at start.
# Usage: s3.sh start|stop|status
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

S3_DIR="$RUN_DIR/s3"
DATA_DIR="$S3_DIR/data"
# Object metadata goes to a sidecar folder rather than extended attributes, which
# some filesystems (overlayfs, tmpfs on older kernels) do not offer.
META_DIR="$S3_DIR/meta"
PIDFILE="$PID_DIR/s3.pid"
LOGFILE="$LOG_DIR/s3.log"
PATTERN="versitygw --port 127.0.0.1:$S3_PORT"

bucket_ready() {
    (cd "$REPO_ROOT" && "$VENV_PYTHON" -m services.backup.bucket --timeout 5 2>/dev/null)
}

start() {
    if pid="$(live_pid "$PIDFILE" "$PATTERN")"; then
        say "s3: already running (pid $pid)"
        return 0
    fi
    [[ -x "$VERSITYGW_BIN" ]] || die "s3: $VERSITYGW_BIN missing; run infra/local/setup.sh"
    require_free_port s3 "$S3_PORT"
    mkdir -p "$DATA_DIR" "$META_DIR"
    # The keys go through the environment, not the command line, so ps does not show them.
    ROOT_ACCESS_KEY="$S3_ACCESS_KEY" ROOT_SECRET_KEY="$S3_SECRET_KEY" \
        setsid "$VERSITYGW_BIN" --port "127.0.0.1:$S3_PORT" --quiet \
        posix --sidecar "$META_DIR" "$DATA_DIR" >>"$LOGFILE" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    say "s3: starting (pid $!, log $LOGFILE)"
    wait_until s3 "$START_TIMEOUT" "$PIDFILE" "$PATTERN" "$LOGFILE" port_open "$S3_PORT"
    wait_until s3 "$START_TIMEOUT" "$PIDFILE" "$PATTERN" "$LOGFILE" bucket_ready
    say "s3: ready on $S3_URL (bucket $S3_BUCKET) in $(elapsed)"
}

case "${1:-}" in
start) start ;;
stop) stop_pid s3 "$PIDFILE" "$PATTERN" ;;
status) status_line s3 "$PIDFILE" "$PATTERN" "$S3_PORT" ;;
*) die "usage: $0 start|stop|status" ;;
esac
