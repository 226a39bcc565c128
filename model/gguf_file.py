"""GGUF files: metadata as plain Python values (first version; the loaders extend this)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """Every key/value field of a GGUF file as Python values (str, int, float, lists)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items()
            if not key.startswith("GGUF.")}
