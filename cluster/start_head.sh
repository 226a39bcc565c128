#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Start the Ray head of a ringserve cluster on this machine, unless ours is already up there.
#
#   cluster/start_head.sh [NODE_IP]      (default: line SKYPILOT_NODE_RANK of SKYPILOT_NODE_IPS)
#
# Ray's GCS listens on NODE_IP:RINGSERVE_RAY_PORT (6379) for the workers; the dashboard (which
# `serve deploy` talks to) only on 127.0.0.1. The Serve HTTP proxy is started by deploy.sh.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"

ip=${1:-$(this_ip)}
address="$ip:$RINGSERVE_RAY_PORT"
if port_open "$ip" "$RINGSERVE_RAY_PORT" && ray_up "$address"; then
    log "Ray head already up at $address: keeping it"
    exit 0
fi
mapfile -t flags < <(ray_node_flags "$ip")
log "starting the Ray head at $address ($(gpus_per_node) GPUs)"
ray start --head --port="$RINGSERVE_RAY_PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$RINGSERVE_DASHBOARD_PORT" "${flags[@]}"
settle_after_ray_start
