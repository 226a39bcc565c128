#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# What every node of a ringserve cluster runs (the sky/ YAMLs' `run`): rank 0 starts the Ray
# head, the monitoring stack when there is one, waits for every node, deploys the Serve config
# and waits for /health; the other ranks join the head. A second run on a live cluster keeps
# Ray and redeploys. With RINGSERVE_FOLLOW=1 (SkyServe replicas) the head keeps running while
# the API answers, and exits 1 when it stops answering.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"

rank=${SKYPILOT_NODE_RANK:-0}
if [ "$rank" != 0 ]; then
    exec bash "$here/start_worker.sh"
fi
bash "$here/start_head.sh"
if [ -f "$here/start_monitoring.sh" ]; then
    # Prometheus reads the discovery file under the Ray temp dir this node's Ray uses
    RAY_TEMP_DIR="$RINGSERVE_RAY_TMPDIR" timeout 300 bash "$here/start_monitoring.sh" \
        || log "warning: the monitoring stack did not start"
else
    log "no cluster/start_monitoring.sh: monitoring not started"
fi
bash "$here/wait_ready.sh" nodes
bash "$here/deploy.sh"
bash "$here/wait_ready.sh"
log "serving at http://$(head_ip):$RINGSERVE_API_PORT/v1 (from your machine: sky status --endpoint $RINGSERVE_API_PORT CLUSTER)"
if [ "${RINGSERVE_FOLLOW:-0}" = 1 ]; then
    while timeout 10 python -c "import sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:$RINGSERVE_API_PORT/health', timeout=8).status != 200)" 2>/dev/null; do
        sleep 15
    done
    die "the API stopped answering /health"
fi
