#!/bin/sh
# Starts the compose edge on infra/compose/edge.conf, which render_edge.py makes
# from the native template. The image's own entrypoint is bypassed: it renders a
# configuration of its own from environment variables, which we do not use.
set -eu
# The template keeps logs and temp files under its run folder (/tmp/edge here,
# see render_edge.py); in a container the logs belong on stdout and stderr,
# where `docker compose logs edge` finds them.
run=/tmp/edge
mkdir -p "$run/logs" "$run/temp"
ln -sf /dev/stderr "$run/logs/error.log"
ln -sf /dev/stdout "$run/logs/access.log"
# The ModSecurity audit log (one JSON line per WAF refusal) goes with the access log.
ln -sf /dev/stdout "$run/logs/modsec_audit.log"
exec nginx -e stderr -c /etc/fleetplane/edge.conf -g 'daemon off;'
