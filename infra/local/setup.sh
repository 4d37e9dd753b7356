#!/usr/bin/env bash
# Installs everything the native stack needs; idempotent, and quick when all is present.
# Usage: setup.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

APT_PACKAGES=(
    nginx libnginx-mod-http-modsecurity modsecurity-crs postgresql
    openjdk-17-jre-headless maven python3-venv curl
    # Monitoring (infra/local/observability.sh): promtool and amtool come with them.
    prometheus prometheus-alertmanager prometheus-postgres-exporter mtail
    # The edge's connections, from nginx's stub_status (observability.sh).
    prometheus-nginx-exporter
)

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed'
}

step_apt() {
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        installed "$pkg" || missing+=("$pkg")
    done
    if ((${#missing[@]} == 0)); then
        say "apt: all packages present"
        return 0
    fi
    ((EUID == 0)) || die "apt: missing ${missing[*]}; run this script as root to install them"
    say "apt: installing ${missing[*]}"
    # Exit code 101 from policy-rc.d stops the packages from starting their own
    # services (nginx on port 80, the distribution's PostgreSQL cluster): the
    # stack runs its own instances on 127.0.0.1.
    local own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    } || rc=$?
    ((own_policy)) && rm -f /usr/sbin/policy-rc.d
    ((rc == 0)) || die "apt: installation failed"
}

step_venv() {
    local python="${FLEETPLANE_PYTHON:-python3}" stamp="$REPO_ROOT/.venv/.fleetplane-installed" want
    if [[ ! -x "$VENV_PYTHON" ]]; then
        say "venv: creating .venv with $("$python" --version)"
        "$python" -m venv "$REPO_ROOT/.venv"
    fi
    if [[ ! -f "$REPO_ROOT/requirements.lock" ]]; then
        say "venv: requirements.lock missing, packages not installed"
        return 0
    fi
    # Reinstall only when the lock or the project metadata changed.
    want="$(cat "$REPO_ROOT/requirements.lock" "$REPO_ROOT/pyproject.toml" | sha256sum)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        say "venv: up to date"
        return 0
    fi
    say "venv: installing requirements.lock"
    "$VENV_PYTHON" -m pip install -q -r "$REPO_ROOT/requirements.lock"
    "$VENV_PYTHON" -m pip install -q -e "$REPO_ROOT" --no-deps
    printf '%s\n' "$want" >"$stamp"
}

step_kafka() {
    if [[ -f "$KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar" ]] && compgen -G "$KAFKA_LIBS/reload4j-*.jar" >/dev/null; then
        say "kafka: $KAFKA_VERSION jars cached in $KAFKA_LIBS"
        return 0
    fi
    say "kafka: fetching $KAFKA_VERSION jars into $KAFKA_LIBS"
    mkdir -p "$CACHE_DIR"
    # Download beside the target and move it into place, so an interrupted
    # download never looks like a complete one.
    local tmp
    tmp="$(mktemp -d "$CACHE_DIR/kafka-libs.XXXXXX")"
    mvn -q -B -f "$REPO_ROOT/infra/local/kafka/pom.xml" -Dmaven.repo.local="$CACHE_DIR/m2" \
        dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" ||
        { rm -rf "$tmp"; die "kafka: maven could not fetch the jars"; }
    rm -rf "$KAFKA_LIBS"
    mkdir -p "$(dirname "$KAFKA_LIBS")"
    mv "$tmp" "$KAFKA_LIBS"
}

step_s3() {
    if [[ -x "$VERSITYGW_BIN" ]]; then
        say "s3: versitygw $VERSITYGW_VERSION cached in $(dirname "$VERSITYGW_BIN")"
        return 0
    fi
    command -v go >/dev/null || die "s3: go is needed once to build versitygw $VERSITYGW_VERSION"
    say "s3: building versitygw $VERSITYGW_VERSION (once; a few minutes)"
    mkdir -p "$CACHE_DIR"
    # Built beside the target and moved into place, so an interrupted build never
    # looks like a finished one.
    local tmp
    tmp="$(mktemp -d "$CACHE_DIR/versitygw.XXXXXX")"
    GOBIN="$tmp" go install "github.com/versity/versitygw/cmd/versitygw@v$VERSITYGW_VERSION" ||
        { rm -rf "$tmp"; die "s3: go install of versitygw failed"; }
    rm -rf "$(dirname "$VERSITYGW_BIN")"
    mv "$tmp" "$(dirname "$VERSITYGW_BIN")"
}

step_jmx_exporter() {
    if [[ -f "$JMX_EXPORTER_JAR" ]]; then
        say "jmx exporter: $JMX_EXPORTER_VERSION cached"
        return 0
    fi
    say "jmx exporter: fetching $JMX_EXPORTER_VERSION"
    local coordinate="io.prometheus.jmx:jmx_prometheus_javaagent:$JMX_EXPORTER_VERSION"
    mvn -q -B dependency:get -Dmaven.repo.local="$CACHE_DIR/m2" -Dartifact="$coordinate" \
        -Dtransitive=false || die "jmx exporter: maven could not fetch $coordinate"
    # Copied beside the target and moved: an interrupted copy never looks complete.
    cp "$CACHE_DIR/m2/io/prometheus/jmx/jmx_prometheus_javaagent/$JMX_EXPORTER_VERSION/$(basename "$JMX_EXPORTER_JAR")" \
        "$JMX_EXPORTER_JAR.tmp"
    mv "$JMX_EXPORTER_JAR.tmp" "$JMX_EXPORTER_JAR"
}

step_pki() {
    # Idempotent and quick: creates what is missing or stale, and moves a root
    # key left in the service folder by older versions to the offline folder.
    (cd "$REPO_ROOT" && "$VENV_PYTHON" -m services.gateway_auth.pki init \
        --dir "$PKI_DIR" --offline-dir "$PKI_OFFLINE_DIR")
}

mkdir -p "$RUN_DIR"/{kafka,postgres,nginx,pki,logs,pids,s3}
step_apt
step_venv
step_kafka
step_s3
step_jmx_exporter
step_pki
say "setup: done in $(elapsed)"
