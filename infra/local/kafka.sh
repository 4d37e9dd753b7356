#!/usr/bin/env bash
# Single-node Kafka (KRaft, broker and controller in one JVM) on 127.0.0.1.
# Usage: kafka.sh start|stop|status
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

KAFKA_DIR="$RUN_DIR/kafka"
DATA_DIR="$KAFKA_DIR/data"
PROPS="$KAFKA_DIR/server.properties"
LOG4J="$KAFKA_DIR/log4j.properties"
PIDFILE="$PID_DIR/kafka.pid"
LOGFILE="$LOG_DIR/kafka.log"
PATTERN="kafka.Kafka $PROPS"

write_config() {
    mkdir -p "$DATA_DIR" "$KAFKA_DIR/logs"
    cat >"$PROPS" <<EOF
# Written by infra/local/kafka.sh on every start; edit the script, not this file.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$DATA_DIR
num.partitions=12
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=12
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=12
auto.create.topics.enable=false
# Tests rebalance often: no delay before the first one, and short consumer
# session timeouts must be accepted for fast failover.
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
# After an unclean stop the new incarnation cannot register until the old
# one's session expires (default 9 s); tests that kill the broker restart faster.
broker.heartbeat.interval.ms=500
broker.session.timeout.ms=3000
num.network.threads=2
num.io.threads=4
EOF
    cat >"$LOG4J" <<EOF
# Broker details go to kafka/logs/server.log; warnings also reach the console
# (captured in logs/kafka.log next to JVM crashes and start-up errors).
log4j.rootLogger=INFO, file, console
log4j.appender.file=org.apache.log4j.RollingFileAppender
log4j.appender.file.File=$KAFKA_DIR/logs/server.log
log4j.appender.file.MaxFileSize=20MB
log4j.appender.file.MaxBackupIndex=3
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.appender.console=org.apache.log4j.ConsoleAppender
log4j.appender.console.Threshold=WARN
log4j.appender.console.layout=org.apache.log4j.PatternLayout
log4j.appender.console.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.state.change.logger=WARN
EOF
}

java_opts() {
    # shellcheck disable=SC2086 # the heap options are a word list on purpose
    printf '%s\n' $KAFKA_HEAP_OPTS -XX:+UseG1GC -Djava.awt.headless=true -Djava.net.preferIPv4Stack=true \
        "-Dlog4j.configuration=file:$LOG4J" "-Dkafka.logs.dir=$KAFKA_DIR/logs"
}

format_storage() {
    [[ -f "$DATA_DIR/meta.properties" ]] && return 0
    local cluster_id
    # Same shape as StorageTool random-uuid (URL-safe base64 of 16 random bytes),
    # without paying for a JVM start; Kafka rejects ids that start with "-".
    cluster_id="$(python3 -c 'import base64, uuid
while (i := base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")).startswith("-"):
    pass
print(i)')"
    say "kafka: formatting storage (cluster id $cluster_id)"
    mapfile -t opts < <(java_opts)
    java "${opts[@]}" -cp "$KAFKA_LIBS/*" kafka.tools.StorageTool format \
        -t "$cluster_id" -c "$PROPS" --ignore-formatted >>"$LOGFILE" 2>&1 ||
        die "kafka: storage format failed (log: $LOGFILE)"
}

broker_ready() {
    "$VENV_PYTHON" "$REPO_ROOT/infra/local/kafka_ready.py" \
        --bootstrap "127.0.0.1:$KAFKA_PORT" --timeout 5 2>/dev/null
}

start() {
    if pid="$(live_pid "$PIDFILE" "$PATTERN")"; then
        say "kafka: already running (pid $pid)"
        return 0
    fi
    [[ -f "$KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar" ]] ||
        die "kafka: jars missing in $KAFKA_LIBS; run infra/local/setup.sh"
    require_free_port kafka "$KAFKA_PORT"
    require_free_port "kafka controller" "$KAFKA_CONTROLLER_PORT"
    require_free_port "kafka metrics" "$KAFKA_METRICS_PORT"
    write_config
    format_storage
    mapfile -t opts < <(java_opts)
    # The broker's metrics for Prometheus (infra/local/observability.sh scrapes them).
    if [[ -f "$JMX_EXPORTER_JAR" ]]; then
        opts+=("-javaagent:$JMX_EXPORTER_JAR=127.0.0.1:$KAFKA_METRICS_PORT:$REPO_ROOT/infra/observability/kafka-jmx.yml")
    fi
    # setsid: the broker leads its own process group, away from the caller's
    # terminal signals, and stop_pid can kill the whole group if it must.
    setsid java "${opts[@]}" -cp "$KAFKA_LIBS/*" kafka.Kafka "$PROPS" \
        >>"$LOGFILE" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    say "kafka: starting (pid $!, log $LOGFILE)"
    wait_until kafka "$START_TIMEOUT" "$PIDFILE" "$PATTERN" "$LOGFILE" port_open "$KAFKA_PORT"
    wait_until kafka "$START_TIMEOUT" "$PIDFILE" "$PATTERN" "$LOGFILE" broker_ready
    say "kafka: ready on 127.0.0.1:$KAFKA_PORT in $(elapsed)"
}

case "${1:-}" in
start) start ;;
stop) stop_pid kafka "$PIDFILE" "$PATTERN" ;;
status) status_line kafka "$PIDFILE" "$PATTERN" "$KAFKA_PORT" ;;
*) die "usage: $0 start|stop|status" ;;
esac
