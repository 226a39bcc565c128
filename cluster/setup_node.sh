#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Set a node up once: install ringserve (with the `gpu` extra where there is a GPU) into
# RINGSERVE_VENV, and fetch MODEL_ID's weights to local disk (HF_TOKEN for gated repos).
# Both steps are skipped when already done, so a second `sky launch` is quick.
#
#   cluster/setup_node.sh          (run from anywhere; installs the checkout it is part of)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"
repo=$(cd "$here/.." && pwd)

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
    fi
fi

model=$(model_dir)
if [ -n "$model" ] && [ "$model" != "${MODEL_ID:-}" ]; then
    (cd "$repo" && python -m cluster.fetch_model "$MODEL_ID" "$model")
fi
