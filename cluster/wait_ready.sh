#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Wait until every node has joined the Ray cluster and, unless told `nodes`, until /health
# reports every LLM replica healthy; bounded by RINGSERVE_NODES_TIMEOUT_S / READY_TIMEOUT_S.
#
#   cluster/wait_ready.sh [nodes]       (run on the head)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"

address="$(head_ip):$RINGSERVE_RAY_PORT"
cd "$here/.."
if [ "${1:-}" = nodes ]; then
    exec python -m cluster.ready --ray "$address" --nodes "$(num_nodes)" \
        --timeout "$RINGSERVE_NODES_TIMEOUT_S"
fi
exec python -m cluster.ready --ray "$address" --nodes "$(num_nodes)" \
    --health "http://127.0.0.1:$RINGSERVE_API_PORT" \
    --replicas "${RINGSERVE_REPLICAS:-$(num_replicas)}" --timeout "$RINGSERVE_READY_TIMEOUT_S"
