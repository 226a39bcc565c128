"""Weight loaders: HF, Mistral consolidated and GGUF checkpoints as canonical float32 tensors.

Whatever the source, :func:`load_weights` returns the Hugging Face Mistral/Llama naming without
the ``model.`` prefix, every tensor float32 on the CPU:

    embed_tokens.weight                          [V, hidden]
    layers.{i}.input_layernorm.weight            [hidden]
    layers.{i}.self_attn.q_proj.weight           [H*D, hidden]   rows in rotate-half order
    layers.{i}.self_attn.k_proj.weight           [KVH*D, hidden] rows in rotate-half order
    layers.{i}.self_attn.v_proj.weight           [KVH*D, hidden]
    layers.{i}.self_attn.o_proj.weight           [hidden, H*D]
    layers.{i}.post_attention_layernorm.weight   [hidden]
    layers.{i}.mlp.gate_proj.weight              [I, hidden]
    layers.{i}.mlp.up_proj.weight                [I, hidden]
    layers.{i}.mlp.down_proj.weight              [hidden, I]
    norm.weight                                  [hidden]
    lm_head.weight                               [V, hidden]     only when not tied

Mistral consolidated checkpoints and GGUF files keep each head's q/k rows in Meta's interleaved
rotary order (rows 2j and 2j+1 rotate together); HF rotates rows j and j + D/2 together.
:func:`interleaved_to_rotate_half` converts, as transformers' ``convert_mistral_weights_to_hf``
and its GGUF loader do.

Names and shapes are checked against the config before any tensor data is read, so a wrong or
foreign checkpoint fails at once with :class:`WeightsError` naming the tensor and file.
GGUF files are dequantized once into the cache described in :mod:`model.gguf_file`.

With ``quantization="int8"`` every projection and the LM head (see
:func:`model.quantization.is_quantized_weight`) is quantized per output row as it is read, one
tensor at a time: its entry in ``tensors`` is then int8 and ``scales`` holds its fp32 row
scales. No fp32 copy of the whole model is ever held (a bf16 or GGUF checkpoint is widened
one tensor at a time). A GGUF file's int8 form is cached beside its fp32 form.
``quantization="int8x2"`` loads float32: its two planes per weight are built from the fp32
weights, one tensor at a time, by :meth:`model.transformer.Transformer.from_tensors`.
``quantization="int4"`` stores every projection as 4-bit group codes with group scales and
zeros (:mod:`model.int4`) as it is read, one tensor at a time (GGUF: cached beside the fp32
form); the embedding stays fp32 and the LM head is built from it (or from ``lm_head.weight``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from model.config import ConfigError, ModelConfig
from model.default_model import default_model_path
from model.gguf_weights import has_gguf_magic, load_gguf
from model.json_file import read_json_object
from model.quantization import Quantization
from model.weight_plan import (
    CONSOLIDATED_NAMES,
    LoadedWeights,
    TensorSource,
    WeightsError,
    expected_shapes,
    hf_rename,
    interleaved_to_rotate_half,
    plan_tensors,
    store_tensor,
    table_renamer,
)

__all__ = ["LoadedWeights", "WeightsError", "expected_shapes", "interleaved_to_rotate_half",
           "load_weights"]

logger = logging.getLogger(__name__)


# Entry point ----------------------------------------------------------------------------------
def load_weights(path: Path | None = None, *, progress: bool = True,
                 quantization: Quantization = "none") -> LoadedWeights:
    """Load a checkpoint: a HF folder, a Mistral consolidated folder, or a GGUF file.

    ``path=None`` loads the embedded default model. ``progress`` shows a tqdm bar on stderr
    while tensors are read or dequantized. ``quantization="int8"`` returns the projections
    as int8 with row scales (see :class:`LoadedWeights`); ``"int8x2"`` returns float32
    tensors, from which :meth:`~model.transformer.Transformer.from_tensors` builds the two
    int8 planes (the second plane needs the float32 weight); ``"int4"`` returns the projections
as 4-bit codes with group scales and zeros. Raises WeightsError (or ConfigError
    for a bad config file) with a one-line message naming the file and tensor at fault.
    """
    if quantization not in ("none", "int8", "int8x2", "int4"):
        raise ValueError("quantization must be none, int8, int8x2 or int4 here, got "
                         f"{quantization!r}")
    path = default_model_path() if path is None else Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"{path}: no such file or folder")
    if path.is_dir():
        return _load_folder(path, progress, quantization)
    if path.suffix.lower() == ".gguf" or has_gguf_magic(path):
        return load_gguf(path, progress, quantization)
    raise WeightsError(f"{path}: not a GGUF file; give a GGUF file, or the folder holding a "
                       "HF (config.json) or Mistral (params.json) checkpoint")


def _load_folder(folder: Path, progress: bool, quantization: Quantization) -> LoadedWeights:
    hf_files = _hf_weight_files(folder)
    consolidated = sorted(folder.glob("consolidated*.safetensors"))
    if (folder / "config.json").is_file() and hf_files:
        config = ModelConfig.from_hf_config(read_json_object(folder / "config.json", ConfigError))
        plan = plan_tensors(_scan_safetensors(hf_files), hf_rename, config, folder)
    elif (folder / "params.json").is_file() and consolidated:
        found = _scan_safetensors(consolidated)
        params = read_json_object(folder / "params.json", ConfigError)
        embed = found.get("tok_embeddings.weight")
        config = ModelConfig.from_mistral_params(params, embed[1][0] if embed else None)
        plan = plan_tensors(found, table_renamer(CONSOLIDATED_NAMES), config, folder,
                     interleaved=True)
    else:
        ggufs = sorted(folder.glob("*.gguf"))
        if len(ggufs) == 1 and not (folder / "config.json").exists():
            return load_gguf(ggufs[0], progress, quantization)
        raise WeightsError(_no_weights_message(folder))
    tensors, scales, zeros = _read_planned(plan, progress, quantization)
    return LoadedWeights(config=config, tensors=tensors, source=folder, scales=scales,
                         zeros=zeros)


def _hf_weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, ConfigError).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsError(f"{index}: no 'weight_map' object")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise WeightsError(f"{index}: names shard {file.name!r}, which is missing")
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    return sorted(folder.glob("model-*-of-*.safetensors"))


def _no_weights_message(folder: Path) -> str:
    pickles = sorted(p.name for p in [*folder.glob("*.bin"), *folder.glob("*.pth")])
    if pickles:
        return (f"{folder}: only PyTorch pickles ({', '.join(pickles[:3])}) found; "
                "ringserve reads safetensors or GGUF (convert the checkpoint first)")
    if (folder / "config.json").is_file():
        return f"{folder}: config.json but no model.safetensors or model.safetensors.index.json"
    if (folder / "params.json").is_file():
        return f"{folder}: params.json but no consolidated*.safetensors"
    return (f"{folder}: no checkpoint found (expected config.json + model.safetensors, "
            "params.json + consolidated.safetensors, or one .gguf file)")



# Safetensors ----------------------------------------------------------------------------------
def _scan_safetensors(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Every tensor's file and shape, from the headers only."""
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    if name in found:
                        raise WeightsError(f"{file}: tensor {name!r} is stored twice "
                                           f"(also in {found[name][0]})")
                    found[name] = (file, tuple(handle.get_slice(name).get_shape()))
        except (SafetensorError, OSError) as exc:
            raise WeightsError(f"{file}: unreadable safetensors file, truncated or corrupt "
                               f"({exc})") from exc
    return found


def _read_planned(plan: Mapping[str, TensorSource], progress: bool, quantization: Quantization
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                             dict[str, torch.Tensor]]:
    by_file: dict[Path, list[tuple[str, TensorSource]]] = {}
    for canonical, source in plan.items():
        by_file.setdefault(source.file, []).append((canonical, source))
    tensors: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    zeros: dict[str, torch.Tensor] = {}
    with tqdm(total=len(plan), desc="loading weights", unit="tensor", file=sys.stderr,
              disable=not progress) as bar:
        for file, items in by_file.items():
            bar.set_postfix_str(file.name)
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for canonical, source in items:
                        tensor = handle.get_tensor(source.name).to(torch.float32)
                        if source.rotary_heads is not None:
                            tensor = interleaved_to_rotate_half(tensor, source.rotary_heads)
                        store_tensor(canonical, tensor, quantization, tensors, scales, zeros)
                        bar.update()
            except (SafetensorError, OSError) as exc:
                raise WeightsError(f"{file}: unreadable safetensors file ({exc})") from exc
    return tensors, scales, zeros


