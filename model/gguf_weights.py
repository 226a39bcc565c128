"""GGUF checkpoints: dequantized (or re-quantized to int8) once, then read from a cache.

The first load of a GGUF file converts it tensor by tensor (fp32, or int8 rows under
``quantization="int8"``, never a whole fp32 model in memory) into a safetensors file in the
cache described in :mod:`model.gguf_file`; later loads read that file.
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
from model.quantization import Quantization, is_quantized_weight
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
    tensors, scales = _split_scales(stored)
    config = ModelConfig.from_gguf_metadata(meta, "lm_head.weight" in tensors)
    plan_tensors({name: (weights_file, tuple(t.shape)) for name, t in tensors.items()},
          lambda name: name, config, weights_file)
    _check_quantized(tensors, scales, quantization, weights_file)
    return LoadedWeights(config=config, tensors=tensors, source=path, scales=scales)


# An int8 cache file stores each quantized weight's row scales under its name plus this suffix.
_SCALE_SUFFIX = "#scale"


def _split_scales(stored: dict[str, torch.Tensor]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    scales = {name.removesuffix(_SCALE_SUFFIX): t for name, t in stored.items()
              if name.endswith(_SCALE_SUFFIX)}
    tensors = {name: t for name, t in stored.items() if not name.endswith(_SCALE_SUFFIX)}
    return tensors, scales


def _check_quantized(tensors: Mapping[str, torch.Tensor], scales: Mapping[str, torch.Tensor],
                     quantization: Quantization, file: Path) -> None:
    """A cache file holds int8 exactly where the quantization says, with one scale per row."""
    for name, tensor in tensors.items():
        want_int8 = quantization == "int8" and is_quantized_weight(name)
        scale = scales.get(name)
        if want_int8 != (tensor.dtype == torch.int8) or want_int8 != (scale is not None):
            raise WeightsError(f"{file}: tensor {name!r} is {tensor.dtype} "
                               f"{'with' if scale is not None else 'without'} scales, which "
                               f"quantization {quantization} does not store (delete the file)")
        if scale is not None and tuple(scale.shape) != (tensor.shape[0],):
            raise WeightsError(f"{file}: scales of {name!r} have shape {list(scale.shape)}, "
                               f"expected [{tensor.shape[0]}]")


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
    form = "int8" if quantization == "int8" else "float32"
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
        for canonical, source in tqdm(plan.items(), desc="dequantizing", unit="tensor",
                                      file=sys.stderr, disable=not progress):
            # one tensor at a time in fp32: under int8 it is re-quantized before the next
            tensor = torch.from_numpy(gguf_file.dequantize(stored[source.name], path))
            if source.rotary_heads is not None:
                tensor = interleaved_to_rotate_half(tensor, source.rotary_heads)
            store_tensor(canonical, tensor, quantization, tensors, scales)
            del tensor
    except gguf_file.GGUFError as exc:
        raise WeightsError(str(exc)) from exc
    to_save = {**tensors, **{name + _SCALE_SUFFIX: scale for name, scale in scales.items()}}
    try:
        gguf_file.save_cached_metadata(entry, meta)
        gguf_file.write_atomically(
            weights_file,
            lambda temp: save_file(to_save, str(temp), metadata={"source": str(path)}))
    except OSError as exc:  # a read-only cache costs speed on the next load, not correctness
        print(f"ringserve: cannot write the GGUF cache in {entry}: {exc}", file=sys.stderr)
    return LoadedWeights(config=config, tensors=tensors, source=path, scales=scales)
