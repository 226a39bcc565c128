#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Deploy ringserve's Serve config on the running cluster, or redeploy it (Serve updates the
# application in place: a new model or knob rolls out replica by replica).
#
#   cluster/deploy.sh          (run on the head, after start_head.sh)
#
# LLM replicas: RINGSERVE_REPLICAS, default one per GPU of the cluster (one per node without
# GPUs). Model: MODEL_ID (a local path, or an HF repo id setup_node.sh fetched). Knobs:
# SERVED_MODEL_NAME, MAX_MODEL_LEN, MAX_NUM_SEQS, RINGSERVE_REPLICA_CPUS, RINGSERVE_SERVE_ARGS
# (more KNOB=VALUE, space-separated). API keys: RINGSERVE_API_KEYS (comma-separated); with the
# API on a public address (RINGSERVE_API_HOST 0.0.0.0, the default) deploying without keys is
# refused unless RINGSERVE_ALLOW_NO_AUTH=1.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"

if [ -z "${RINGSERVE_API_KEYS:-}" ] && [ "$RINGSERVE_API_HOST" != 127.0.0.1 ] \
        && [ "${RINGSERVE_ALLOW_NO_AUTH:-0}" != 1 ]; then
    die "no API key: the API listens on $RINGSERVE_API_HOST:$RINGSERVE_API_PORT; set RINGSERVE_API_KEYS (sky launch ... --secret RINGSERVE_API_KEYS=sk-...) or RINGSERVE_ALLOW_NO_AUTH=1"
fi
replicas=${RINGSERVE_REPLICAS:-$(num_replicas)}
gpus_per_replica=$(( $(gpus_per_node) > 0 ? 1 : 0 ))
model=$(model_dir)
if [ -n "$model" ] && [ ! -e "$model" ]; then
    die "model $MODEL_ID is not on this machine ($model): run cluster/setup_node.sh first"
fi
read -r -a extra <<<"${RINGSERVE_SERVE_ARGS:-}"
sets=(--set "model=$model" --set "served_model_name=${SERVED_MODEL_NAME:-}"
      --set "max_model_len=${MAX_MODEL_LEN:-}" --set "max_num_seqs=${MAX_NUM_SEQS:-}"
      --set "replica_num_cpus=${RINGSERVE_REPLICA_CPUS:-}")
for knob in "${extra[@]}"; do
    sets+=(--set "$knob")
done
config=${RINGSERVE_SERVE_CONFIG:-$HOME/.ringserve/serve_config.yaml}
(cd "$here/.." && python -m cluster.render_config --out "$config" --replicas "$replicas" \
    --gpus-per-replica "$gpus_per_replica" --host "$RINGSERVE_API_HOST" \
    --port "$RINGSERVE_API_PORT" "${sets[@]}")
log "deploying ${model:-the embedded default model} with $replicas LLM replicas ($config)"
(cd "$here/.." && serve deploy "$config" --address "http://127.0.0.1:$RINGSERVE_DASHBOARD_PORT")
