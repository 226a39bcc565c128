"""GGUF files: metadata as plain Python values, dequantized tensors, and the conversion cache.

The ``gguf`` package's reader parses every metadata array element by element when it opens a
file (5-15 s for a model with a 50k-token vocabulary), so each GGUF file is converted once into
a cache entry and later uses read that instead::

    $RINGSERVE_CACHE_DIR (default ~/.cache/ringserve)/gguf/<file name>-<size>-<mtime_ns>-v1/
        metadata.json         every key/value field, tokenizer arrays included
        weights.safetensors   float32 tensors under canonical names (written by model.weights)
        weights-int8.safetensors  the same with projections as int8 plus row scales
                              (``<name>#scale``), written when int8 quantization is asked for
        weights-int4.safetensors  the same with projections as 4-bit codes (uint8) plus group
                              scales and zeros (``<name>#scale``, ``<name>#zero``), for int4

The entry is keyed by the file's name, size and modification time, so replacing the file
invalidates it. Every cache file is written under a temporary name and renamed into place:
an interrupted conversion leaves only a temporary file, which no later run reads.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from gguf import GGUFReader
    from gguf.gguf_reader import ReaderTensor

CACHE_ENV = "RINGSERVE_CACHE_DIR"
CACHE_FORMAT = "v1"  # bump when what a cache entry holds changes; old entries are then unused
METADATA_FILE = "metadata.json"
WEIGHTS_FILE = "weights.safetensors"
INT8_WEIGHTS_FILE = "weights-int8.safetensors"
INT4_WEIGHTS_FILE = "weights-int4.safetensors"
_STALE_TEMP_S = 3600.0  # temporary files older than this belong to an interrupted conversion
# GGML types stored as plain numpy arrays; BF16 is stored as raw bytes and goes through
# gguf.quants like the block quantizations.
_FLOAT_TYPES = ("F32", "F16", "F64")
_INT_TYPES = ("I8", "I16", "I32", "I64")


class GGUFError(ValueError):
    """A GGUF file cannot be read, or holds a tensor type we cannot dequantize."""


# Cache ----------------------------------------------------------------------------------------
def cache_root() -> Path:
    """Root of ringserve's cache: ``$RINGSERVE_CACHE_DIR``, else ``~/.cache/ringserve``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "ringserve"


def cache_entry(path: Path) -> Path:
    """The cache folder for one GGUF file (not created); raises FileNotFoundError if missing."""
    path = Path(path)
    stat = path.stat()
    key = f"{path.name}-{stat.st_size}-{stat.st_mtime_ns}-{CACHE_FORMAT}"
    return cache_root() / "gguf" / key


def weights_file_name(quantization: str) -> str:
    """The cache file holding a GGUF file's converted weights for this quantization."""
    return {"int8": INT8_WEIGHTS_FILE, "int4": INT4_WEIGHTS_FILE}.get(quantization, WEIGHTS_FILE)


def write_atomically(target: Path, write: Callable[[Path], object]) -> None:
    """Run ``write(temp_path)`` on a temporary file beside ``target``, then rename it there.

    Readers see either no ``target`` or a complete one; concurrent writers (two replicas
    converting the same file) each rename a complete file and the last one wins.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    temp = Path(temp_name)
    try:
        write(temp)
        temp.chmod(0o644)  # mkstemp makes 0600; the cache is as readable as a download
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def _remove_stale_temps(target: Path) -> None:
    now = time.time()
    for temp in target.parent.glob(f".{target.name}.*.tmp"):
        try:
            if now - temp.stat().st_mtime > _STALE_TEMP_S:
                temp.unlink()
        except OSError:
            pass  # another process removed or renamed it first


def read_cached_metadata(entry: Path) -> dict[str, Any] | None:
    """The metadata saved in a cache entry, or None when absent or unreadable."""
    try:
        data = json.loads((entry / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def save_cached_metadata(entry: Path, meta: dict[str, Any]) -> None:
    """Write ``metadata.json`` into a cache entry (atomically)."""
    text = json.dumps(meta, ensure_ascii=True)
    write_atomically(entry / METADATA_FILE, lambda temp: temp.write_text(text, encoding="utf-8"))


# Reading --------------------------------------------------------------------------------------
def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """Every key/value field of a GGUF file as Python values (str, int, float, bool, lists).

    Served from the cache after the first call for a file (tens of milliseconds instead of
    seconds). The reader's own ``GGUF.*`` header fields are left out.
    """
    entry = cache_entry(Path(path))
    cached = read_cached_metadata(entry)
    if cached is not None:
        return cached
    meta = reader_metadata(open_gguf(Path(path)))
    try:
        save_cached_metadata(entry, meta)
    except OSError as exc:  # a read-only cache only costs speed
        print(f"ringserve: cannot cache GGUF metadata in {entry}: {exc}", file=sys.stderr)
    return meta


def open_gguf(path: Path) -> GGUFReader:
    """Open a GGUF file with the ``gguf`` reader (slow: parses all metadata arrays)."""
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise GGUFError(f"{path}: not a readable GGUF file ({exc})") from exc


def reader_metadata(reader: GGUFReader) -> dict[str, Any]:
    """The metadata fields of an open reader as plain Python values."""
    return {key: _plain(field.contents()) for key, field in reader.fields.items()
            if not key.startswith("GGUF.")}


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def tensor_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    """A tensor's shape in PyTorch order (GGUF stores dimensions fastest-varying first)."""
    return tuple(int(dim) for dim in reversed(tensor.shape.tolist()))


def check_dequantizable(tensor: ReaderTensor, path: Path) -> None:
    """Raise GGUFError, naming the tensor, its type and file, unless it can be dequantized.

    Float types convert directly; quantized types are whatever ``gguf.quants`` implements
    (Q4_0, Q4_1, Q5_x, Q8_0, the K-quants and more). Integer tensors are not weights.
    """
    from gguf import GGML_QUANT_SIZES, quants

    kind = tensor.tensor_type
    if kind.name in _FLOAT_TYPES:
        return
    if kind.name in _INT_TYPES:
        raise GGUFError(f"{path}: tensor {tensor.name!r} has integer type {kind.name}; "
                        "expected float or quantized weights")
    one_block = np.zeros((1, GGML_QUANT_SIZES[kind][1]), dtype=np.uint8)
    try:
        quants.dequantize(one_block, kind)
    except NotImplementedError as exc:
        raise GGUFError(f"{path}: tensor {tensor.name!r} uses quantization type "
                        f"{kind.name}, which ringserve cannot dequantize") from exc


def dequantize(tensor: ReaderTensor, path: Path) -> np.ndarray:
    """A GGUF tensor as a new float32 array in PyTorch order (see check_dequantizable)."""
    from gguf import quants

    check_dequantizable(tensor, path)
    shape = tensor_shape(tensor)
    if tensor.tensor_type.name in _FLOAT_TYPES:
        # tensor.data is a read-only view into the file: copy it out
        return np.array(tensor.data, dtype=np.float32).reshape(shape)
    # tensor.data is [rows, bytes per row]; the dequantized array is [rows, cols]
    out = quants.dequantize(tensor.data, tensor.tensor_type)
    return np.ascontiguousarray(out, dtype=np.float32).reshape(shape)

