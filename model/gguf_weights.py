"""GGUF checkpoints: dequantized (or re-quantized to int8 / int4) once, then read from a cache.

The first load of a GGUF file converts it tensor by tensor (fp32, int8 rows under
``quantization="int8"``, int4 groups under ``"int4"``; never a whole fp32 model in memory)
into a safetensors file in the cache described in :mod:`model.gguf_file`; later loads read
that file.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from model import gguf_file
from model.config import ModelConfig
from model.int4 import GROUP_SIZE
from model.quantization import Quantization, is_int4_weight, is_quantized_weight
from model.weight_plan import (
    GGUF_NAMES,
    LoadedWeights,
    WeightsError,
    interleaved_to_rotate_half,
    plan_tensors,
    store_tensor,
    table_renamer,
)

logger = logging.getLogger(__name__)


def has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


def load_gguf(path: Path, progress: bool, quantization: Quantization) -> LoadedWeights:
    entry = gguf_file.cache_entry(path)
    weights_file = entry / gguf_file.weights_file_name(quantization)
    cached = _read_gguf_cache(entry, weights_file)
    if cached is None:
        return _convert_gguf(path, entry, weights_file, progress, quantization)
    meta, stored = cached
    tensors, scales, zeros = _split_scales(stored)
    config = ModelConfig.from_gguf_metadata(meta, "lm_head.weight" in tensors)
    plan_tensors({name: (weights_file, tuple(t.shape)) for name, t in tensors.items()},
          lambda name: name, config, weights_file)
    _check_quantized(tensors, scales, zeros, quantization, weights_file)
    return LoadedWeights(config=config, tensors=tensors, source=path, scales=scales,
                         zeros=zeros)


# A quantized cache file stores each quantized weight's scales (int8: per row; int4: per group)
# under its name plus this suffix, and int4's group zeros under the zero suffix.
_SCALE_SUFFIX = "#scale"
_ZERO_SUFFIX = "#zero"


def _split_scales(stored: dict[str, torch.Tensor]) -> tuple[
        dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    def suffixed(suffix: str) -> dict[str, torch.Tensor]:
        return {name.removesuffix(suffix): t for name, t in stored.items()
                if name.endswith(suffix)}

    tensors = {name: t for name, t in stored.items()
               if not name.endswith((_SCALE_SUFFIX, _ZERO_SUFFIX))}
    return tensors, suffixed(_SCALE_SUFFIX), suffixed(_ZERO_SUFFIX)


def _check_quantized(tensors: Mapping[str, torch.Tensor], scales: Mapping[str, torch.Tensor],
                     zeros: Mapping[str, torch.Tensor], quantization: Quantization, file: Path
                     ) -> None:
    """A cache file holds int8 (one scale per row) or int4 codes (a scale and a zero per
    group) exactly where the quantization says."""
    for name, tensor in tensors.items():
        want = {"int8": torch.int8 if is_quantized_weight(name) else None,
                "int4": torch.uint8 if is_int4_weight(name) else None}.get(quantization)
        scale, zero = scales.get(name), zeros.get(name)
        if ((tensor.dtype == want) != (want is not None) or (want is None) != (scale is None)
                or (want == torch.uint8) != (zero is not None)):
            raise WeightsError(f"{file}: tensor {name!r} is {tensor.dtype} "
                               f"{'with' if scale is not None else 'without'} scales, which "
                               f"quantization {quantization} does not store (delete the file)")
        rows = tensor.shape[0]
        expected = (rows,) if want == torch.int8 else (rows, tensor.shape[-1] // GROUP_SIZE)
        for kind, part in (("scales", scale), ("zeros", zero)):
            if part is not None and tuple(part.shape) != expected:
                raise WeightsError(f"{file}: {kind} of {name!r} have shape "
                                   f"{list(part.shape)}, expected {list(expected)}")


def _read_gguf_cache(entry: Path, weights_file: Path
                     ) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    if not weights_file.is_file():
        return None
    meta = gguf_file.read_cached_metadata(entry)
    if meta is None:
        return None
    try:
        return meta, load_file(str(weights_file))
    except (SafetensorError, OSError) as exc:
        logger.warning("ignoring unreadable cache file %s (%s); converting again",
                       weights_file, exc)
        return None


def _convert_gguf(path: Path, entry: Path, weights_file: Path, progress: bool,
                  quantization: Quantization) -> LoadedWeights:
    form = quantization if quantization in ("int8", "int4") else "float32"
    message = f"ringserve: converting {path.name} to {form} once; cache: {entry}"
    if progress:
        print(message, file=sys.stderr)
    else:
        logger.info(message)
    try:
        reader = gguf_file.open_gguf(path)
        meta = gguf_file.reader_metadata(reader)
        stored = {tensor.name: tensor for tensor in reader.tensors}
        config = ModelConfig.from_gguf_metadata(meta, "output.weight" in stored)
        plan = plan_tensors({name: (path, gguf_file.tensor_shape(t)) for name, t in stored.items()},
                     table_renamer(GGUF_NAMES), config, path, interleaved=True)
        for source in plan.values():  # fail on an unknown type before converting anything
            gguf_file.check_dequantizable(stored[source.name], path)
        tensors: dict[str, torch.Tensor] = {}
        scales: dict[str, torch.Tensor] = {}
        zeros: dict[str, torch.Tensor] = {}
        for canonical, source in tqdm(plan.items(), desc="dequantizing", unit="tensor",
                                      file=sys.stderr, disable=not progress):
            # one tensor at a time in fp32: under int8 it is re-quantized before the next
            tensor = torch.from_numpy(gguf_file.dequantize(stored[source.name], path))
            if source.rotary_heads is not None:
                tensor = interleaved_to_rotate_half(tensor, source.rotary_heads)
            store_tensor(canonical, tensor, quantization, tensors, scales, zeros)
            del tensor
    except gguf_file.GGUFError as exc:
        raise WeightsError(str(exc)) from exc
    to_save = {**tensors, **{name + _SCALE_SUFFIX: scale for name, scale in scales.items()},
               **{name + _ZERO_SUFFIX: zero for name, zero in zeros.items()}}
    try:
        gguf_file.save_cached_metadata(entry, meta)
        gguf_file.write_atomically(
            weights_file,
            lambda temp: save_file(to_save, str(temp), metadata={"source": str(path)}))
    except OSError as exc:  # a read-only cache costs speed on the next load, not correctness
        print(f"ringserve: cannot write the GGUF cache in {entry}: {exc}", file=sys.stderr)
    return LoadedWeights(config=config, tensors=tensors, source=path, scales=scales,
                         zeros=zeros)
