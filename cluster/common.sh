# shellcheck shell=bash
# Shared settings and helpers of ringserve's cluster scripts (sourced, not run).
#
# Every setting is an environment variable with a default, so the same scripts run under
# SkyPilot (which sets SKYPILOT_NODE_RANK, SKYPILOT_NODE_IPS, SKYPILOT_NUM_NODES and
# SKYPILOT_NUM_GPUS_PER_NODE on every node) and by hand on any machines.

RINGSERVE_RAY_PORT=${RINGSERVE_RAY_PORT:-6379}          # ours; SkyPilot's own Ray uses 6380
RINGSERVE_DASHBOARD_PORT=${RINGSERVE_DASHBOARD_PORT:-8265}  # on 127.0.0.1 only; SkyPilot's: 8266
RINGSERVE_API_PORT=${RINGSERVE_API_PORT:-8000}
RINGSERVE_API_HOST=${RINGSERVE_API_HOST:-0.0.0.0}       # the head's Serve HTTP proxy
RINGSERVE_VENV=${RINGSERVE_VENV:-$HOME/ringserve-venv}
RINGSERVE_MODELS=${RINGSERVE_MODELS:-$HOME/ringserve-models}
RINGSERVE_RAY_TMPDIR=${RINGSERVE_RAY_TMPDIR:-}          # empty: Ray's default (/tmp/ray)
RINGSERVE_NODE_CPUS=${RINGSERVE_NODE_CPUS:-}            # empty: all of the machine's CPUs
RINGSERVE_HEAD_WAIT_S=${RINGSERVE_HEAD_WAIT_S:-300}     # a worker waits this long for the head
RINGSERVE_NODES_TIMEOUT_S=${RINGSERVE_NODES_TIMEOUT_S:-600}
RINGSERVE_READY_TIMEOUT_S=${RINGSERVE_READY_TIMEOUT_S:-1800}
export RAY_USAGE_STATS_ENABLED=0 SKYPILOT_DISABLE_USAGE_COLLECTION=1
unset RAY_ADDRESS  # every Ray call here names our cluster; never SkyPilot's own Ray
# Serve's HTTP proxy enforces ringserve's body/header limits and the stalled-stream timeout
# before a body is buffered (app/edge.py): Ray's processes inherit this from `ray start`.
# Limits other than the defaults: RINGSERVE_MAX_BODY_BYTES / RINGSERVE_MAX_HEADER_BYTES /
# RINGSERVE_STREAM_STALL_TIMEOUT_S in the task's envs.
export RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=app.edge:proxy_middlewares
PATH="$RINGSERVE_VENV/bin:$PATH"
export PATH

log() { echo "ringserve-cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

# The Nth line (0-based) of SKYPILOT_NODE_IPS; the head is line 0.
node_ip() {
    local ip
    ip=$(printf '%s\n' "${SKYPILOT_NODE_IPS:-}" | sed -n "$(( $1 + 1 ))p" | tr -d '[:space:]')
    [ -n "$ip" ] || die "SKYPILOT_NODE_IPS has no line $(( $1 + 1 )) (rank $1): set it to the nodes' IPs, one a line, head first"
    echo "$ip"
}
head_ip() { node_ip 0; }
this_ip() { node_ip "${SKYPILOT_NODE_RANK:-0}"; }
num_nodes() { echo "${SKYPILOT_NUM_NODES:-1}"; }
gpus_per_node() { echo "${SKYPILOT_NUM_GPUS_PER_NODE:-0}"; }

# LLM replicas: one per GPU of the whole cluster; one per node where nodes have no GPU.
num_replicas() {
    local gpus
    gpus=$(gpus_per_node)
    echo $(( $(num_nodes) * (gpus > 0 ? gpus : 1) ))
}

# The weights folder for MODEL_ID: itself when it is a local path, else where setup put it;
# empty for the embedded default model.
model_dir() {
    local id=${MODEL_ID:-}
    if [ -z "$id" ]; then
        echo ""
    elif [ -e "$id" ]; then
        echo "$id"
    else
        echo "$RINGSERVE_MODELS/${id//\//--}"
    fi
}

# ray start flags both kinds of node share.
ray_node_flags() {
    local flags=(--node-ip-address="$1" --num-gpus="$(gpus_per_node)" --disable-usage-stats)
    [ -z "$RINGSERVE_NODE_CPUS" ] || flags+=(--num-cpus="$RINGSERVE_NODE_CPUS")
    [ -z "$RINGSERVE_RAY_TMPDIR" ] || flags+=(--temp-dir="$RINGSERVE_RAY_TMPDIR")
    printf '%s\n' "${flags[@]}"
}

# SkyPilot kills what is left of a job's process tree when the job ends; `ray start` needs a
# moment to detach its daemons first (SkyPilot's own distributed Ray example sleeps 5 s).
settle_after_ray_start() { sleep "${RINGSERVE_RAY_SETTLE_S:-5}"; }

# True when something accepts TCP connections at $1:$2 within 3 s.
port_open() { timeout 3 bash -c ": </dev/tcp/$1/$2" 2>/dev/null; }

# True when a Ray GCS answers at $1 (IP:PORT).
ray_up() { timeout 60 ray status --address="$1" >/dev/null 2>&1; }

# True when a raylet of this machine with node IP $1 belongs to the cluster at $2 (IP:PORT).
raylet_joined() {
    local pid args
    for pid in $(pgrep -f -- "--gcs-address=$2" 2>/dev/null); do
        args=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || continue
        case "$args" in
            *raylet*"--node_ip_address=$1 "*|*raylet*"--node-ip-address=$1 "*) return 0 ;;
        esac
    done
    return 1
}
