#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Join this machine to a ringserve Ray cluster, unless it has joined already.
#
#   cluster/start_worker.sh [HEAD_IP [NODE_IP]]   (defaults: SKYPILOT_NODE_IPS line 1 / own line)
#
# Waits up to RINGSERVE_HEAD_WAIT_S (300) seconds for the head's GCS port (all nodes start at
# once under SkyPilot), then fails with a message naming the head.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"

head=${1:-$(head_ip)}
ip=${2:-$(this_ip)}
address="$head:$RINGSERVE_RAY_PORT"
if raylet_joined "$ip" "$address"; then
    log "this node ($ip) is already in the Ray cluster at $address: keeping it"
    exit 0
fi
log "waiting up to ${RINGSERVE_HEAD_WAIT_S}s for the Ray head at $address"
deadline=$(( SECONDS + RINGSERVE_HEAD_WAIT_S ))
until port_open "$head" "$RINGSERVE_RAY_PORT"; do
    if (( SECONDS >= deadline )); then
        die "the Ray head at $address is unreachable after ${RINGSERVE_HEAD_WAIT_S}s: is rank 0 up, and may this node reach it on port $RINGSERVE_RAY_PORT (same network; the firewall allows traffic between the cluster's nodes)?"
    fi
    sleep 2
done
mapfile -t flags < <(ray_node_flags "$ip")
log "joining the Ray cluster at $address as $ip ($(gpus_per_node) GPUs)"
timeout "$RINGSERVE_HEAD_WAIT_S" ray start --address="$address" "${flags[@]}" \
    || die "ray start could not join the Ray cluster at $address"
settle_after_ray_start
