#!/usr/bin/env bash
# Ends a running `make run` (its own traps then stop what it started).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
STOP_TIMEOUT=60 stop_pid "make run" "$PID_DIR/run.pid" "infra/local/run.sh"
