"""Fetch a model's weights to local disk once (cloud set-up; never at serve time).

    python -m cluster.fetch_model MODEL_ID DEST

``MODEL_ID`` is a Hugging Face repo id (``mistralai/Mistral-7B-Instruct-v0.3``); the HF
format files only (config, tokenizer, ``model*.safetensors``: a repo that also ships
Mistral's ``consolidated.safetensors`` is not fetched twice). ``HF_TOKEN`` from the
environment for gated repos. A folder already complete (``.ringserve-complete``) is kept.
"""

from __future__ import annotations

import sys
from pathlib import Path

HF_FILES = ["config.json", "generation_config.json", "model*.safetensors",
            "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json",
            "params.json"]
DONE_MARKER = ".ringserve-complete"


def fetch(model_id: str, dest: Path) -> Path:
    """Download ``model_id`` into ``dest`` unless it is already complete there."""
    if (dest / DONE_MARKER).exists():
        print(f"fetch_model: {model_id} already in {dest}", file=sys.stderr)
        return dest
    from huggingface_hub import snapshot_download

    print(f"fetch_model: downloading {model_id} to {dest}", file=sys.stderr, flush=True)
    snapshot_download(repo_id=model_id, local_dir=str(dest), allow_patterns=HF_FILES)
    if not list(dest.glob("*.safetensors")):
        raise SystemExit(f"fetch_model: error: {model_id} has no model*.safetensors files")
    (dest / DONE_MARKER).touch()
    return dest


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    fetch(args[0], Path(args[1]).expanduser())
    return 0


if __name__ == "__main__":
    sys.exit(main())
