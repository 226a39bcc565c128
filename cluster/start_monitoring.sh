#!/usr/bin/env bash
# Start ringserve's monitoring on a Ray head node: Prometheus on 127.0.0.1:9090 with
# cluster/prometheus.yml and, when grafana-server is installed, Grafana on 127.0.0.1:3000 with
# cluster/grafana/provisioning (datasource + dashboards/json). Both listen on loopback only:
# reach them with an SSH tunnel (ssh -L 3000:127.0.0.1:3000 -L 9090:127.0.0.1:9090 HEAD).
# Safe to run twice (a server already running is left alone). Env knobs:
#   RINGSERVE_MONITORING_DIR  data and logs (default ~/.cache/ringserve/monitoring)
#   RAY_TEMP_DIR              Ray's temp dir when not /tmp/ray
#   PROMETHEUS_PORT, GRAFANA_PORT (defaults 9090, 3000)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
data="${RINGSERVE_MONITORING_DIR:-$HOME/.cache/ringserve/monitoring}"
prom_port="${PROMETHEUS_PORT:-9090}"
grafana_port="${GRAFANA_PORT:-3000}"
mkdir -p "$data/prometheus" "$data/grafana"

running() {  # running NAME: true when NAME's pid file names a live process
    local pidfile="$data/$1.pid"
    [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

if ! command -v prometheus >/dev/null 2>&1; then
    echo "start_monitoring: installing prometheus (Debian package)"
    if [[ "$(id -u)" -eq 0 ]]; then
        apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus
    else
        sudo -n apt-get update -qq && sudo -n apt-get install -y -qq --no-install-recommends prometheus
    fi
fi

config="$here/prometheus.yml"
if [[ -n "${RAY_TEMP_DIR:-}" ]]; then
    config="$data/prometheus.yml"
    sed "s#/tmp/ray/#${RAY_TEMP_DIR%/}/#" "$here/prometheus.yml" > "$config"
fi

if running prometheus; then
    echo "start_monitoring: prometheus already running (pid $(cat "$data/prometheus.pid"))"
else
    nohup prometheus --config.file="$config" --storage.tsdb.path="$data/prometheus" \
        --web.listen-address="127.0.0.1:$prom_port" >"$data/prometheus.log" 2>&1 &
    echo $! >"$data/prometheus.pid"
    echo "start_monitoring: prometheus on http://127.0.0.1:$prom_port (log $data/prometheus.log)"
fi

if ! command -v grafana-server >/dev/null 2>&1; then
    echo "start_monitoring: grafana-server not installed; Prometheus only" \
        "(push the dashboards to another Grafana: ringserve dashboards push --url URL --token T)"
    exit 0
fi
if running grafana; then
    echo "start_monitoring: grafana already running (pid $(cat "$data/grafana.pid"))"
    exit 0
fi
homepath="${GRAFANA_HOME:-/usr/share/grafana}"
RINGSERVE_DASHBOARDS="$repo/dashboards/json" \
GF_PATHS_PROVISIONING="$here/grafana/provisioning" \
GF_PATHS_DATA="$data/grafana" \
GF_PATHS_LOGS="$data/grafana" \
GF_SERVER_HTTP_ADDR=127.0.0.1 \
GF_SERVER_HTTP_PORT="$grafana_port" \
GF_ANALYTICS_REPORTING_ENABLED=false \
GF_ANALYTICS_CHECK_FOR_UPDATES=false \
    nohup grafana-server --homepath="$homepath" >"$data/grafana.log" 2>&1 &
echo $! >"$data/grafana.pid"
echo "start_monitoring: grafana on http://127.0.0.1:$grafana_port (log $data/grafana.log)"
