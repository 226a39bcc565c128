#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Set a node up once: install ringserve (with the `gpu` extra where there is a GPU) into
# RINGSERVE_VENV, fetch MODEL_ID's weights to local disk (HF_TOKEN for gated repos), and on
# rank 0, when the checkout has cluster/start_monitoring.sh, install Prometheus and Grafana
# (RINGSERVE_INSTALL_MONITORING=0 skips that). Each step is skipped when already done, so a
# second `sky launch` is quick; RINGSERVE_REINSTALL=1 reinstalls ringserve.
#
#   cluster/setup_node.sh          (run from anywhere; installs the checkout it is part of)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"
repo=$(cd "$here/.." && pwd)

# Prometheus from the distribution, Grafana from Grafana's apt repository (Debian/Ubuntu VMs).
install_monitoring() {
    command -v apt-get >/dev/null 2>&1 || { log "no apt-get: install Prometheus and Grafana yourself"; return 1; }
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    if ! command -v prometheus >/dev/null 2>&1; then
        $sudo apt-get update -qq
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus
    fi
    if ! command -v grafana-server >/dev/null 2>&1 && [ ! -x /usr/sbin/grafana-server ]; then
        $sudo mkdir -p /etc/apt/keyrings
        curl -fsSL https://apt.grafana.com/gpg.key | $sudo gpg --dearmor --yes -o /etc/apt/keyrings/grafana.gpg
        echo "deb [signed-by=/etc/apt/keyrings/grafana.gpg] https://apt.grafana.com stable main" \
            | $sudo tee /etc/apt/sources.list.d/grafana.list >/dev/null
        $sudo apt-get update -qq
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq grafana
    fi
}

if [ -x "$RINGSERVE_VENV/bin/ringserve" ] && [ "${RINGSERVE_REINSTALL:-0}" != 1 ]; then
    log "ringserve is already installed in $RINGSERVE_VENV: skipping the install"
else
    log "installing ringserve from $repo into $RINGSERVE_VENV"
    python3 -m venv "$RINGSERVE_VENV"
    pip="$RINGSERVE_VENV/bin/python -m pip"
    $pip install --quiet --upgrade pip
    $pip install --quiet -e "$repo"
    if command -v nvidia-smi >/dev/null 2>&1; then
        # flash-attn builds against the torch just installed: no build isolation.
        $pip install --quiet packaging ninja
        $pip install --quiet --no-build-isolation -e "${repo}[gpu]" \
            || log "warning: flash-attn did not install: the engine uses torch attention"
    else
        # our CPU kernels (model/cpu_kernels.py), built once here rather than at first start
        "$RINGSERVE_VENV/bin/python" -m model.cpu_kernels \
            || log "warning: the CPU kernels did not build: the engine uses PyTorch's ops"
    fi
fi

model=$(model_dir)
if [ -n "$model" ] && [ "$model" != "${MODEL_ID:-}" ]; then
    (cd "$repo" && python -m cluster.fetch_model "$MODEL_ID" "$model")
fi

if [ "${SKYPILOT_NODE_RANK:-0}" = 0 ] && [ -f "$here/start_monitoring.sh" ] \
        && [ "${RINGSERVE_INSTALL_MONITORING:-1}" = 1 ]; then
    install_monitoring || log "warning: the monitoring stack did not install: serving goes on without it"
fi
