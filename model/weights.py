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
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from model import gguf_file
from model.config import ConfigError, ModelConfig
from model.default_model import default_model_path
from model.json_file import read_json_object
from model.quantization import Quantization, is_quantized_weight, quantize_rows

logger = logging.getLogger(__name__)


class WeightsError(ValueError):
    """A checkpoint's weights are missing, unreadable, or do not fit its config."""


@dataclass(frozen=True)
class LoadedWeights:
    """A checkpoint's config and its tensors under canonical names (float32, CPU).

    Under int8 quantization the projection weights are int8 [out, in] and ``scales`` maps
    each of their names to its float32 row scales [out]; otherwise ``scales`` is empty.
    """

    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    source: Path  # the folder or GGUF file the weights came from
    scales: dict[str, torch.Tensor] = field(default_factory=dict)


# Canonical names ------------------------------------------------------------------------------
def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor the config implies, with its shape."""
    hidden, inter = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (config.vocab_size, hidden)}
    for i in range(config.num_layers):
        p = f"layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "self_attn.q_proj.weight"] = (config.q_size, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (config.kv_size, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (config.kv_size, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, config.q_size)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
    shapes["norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


# Source name -> canonical name, "{i}" standing for the layer index.
_CONSOLIDATED_NAMES = {
    "tok_embeddings.weight": "embed_tokens.weight",
    "norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention_norm.weight": "layers.{i}.input_layernorm.weight",
    "layers.{i}.attention.wq.weight": "layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.ffn_norm.weight": "layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.feed_forward.w1.weight": "layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "layers.{i}.mlp.down_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "layers.{i}.mlp.up_proj.weight",
}
_GGUF_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.down_proj.weight",
}
# Extras that carry nothing a forward pass needs (precomputed rotary tables).
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$|(^|\.)attn_rot_embd(\.weight)?$")
_LAYER_INDEX = re.compile(r"^(?:layers|blk)\.(\d+)\.")


def _table_renamer(table: Mapping[str, str]) -> Callable[[str], str | None]:
    """Rename through a ``{i}`` table; None for names the table does not know."""

    def rename(name: str) -> str | None:
        match = _LAYER_INDEX.match(name)
        if match is None:
            return table.get(name)
        pattern = table.get(name[: match.start(1)] + "{i}" + name[match.end(1):])
        return None if pattern is None else pattern.replace("{i}", match.group(1))

    return rename


def _hf_rename(name: str) -> str:
    return name.removeprefix("model.")


def interleaved_to_rotate_half(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from Meta's interleaved rotary layout to HF's rotate-half.

    Within each head of D rows, interleaved row 2j + c (c in {0, 1}) moves to row c*D/2 + j;
    llama.cpp's converter applies the inverse when it writes GGUF files.
    """
    rows, cols = weight.shape
    half = rows // num_heads // 2
    # [H*D, hidden] -> [H, D/2, 2, hidden] -> [H, 2, D/2, hidden] -> [H*D, hidden]
    return weight.reshape(num_heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)


# Planning: names and shapes, checked before reading data --------------------------------------
@dataclass(frozen=True)
class _Source:
    """Where one canonical tensor is stored and how to bring it to canonical layout."""

    file: Path
    name: str  # name inside the file
    shape: tuple[int, ...]  # as stored (torch order)
    rotary_heads: int | None = None  # interleaved q/k rows to reorder, over this many heads


def _plan(found: Mapping[str, tuple[Path, tuple[int, ...]]],
          rename: Callable[[str], str | None], config: ModelConfig, checkpoint: Path,
          interleaved: bool = False) -> dict[str, _Source]:
    """Map stored tensors to canonical names and check them against the config's shapes.

    ``found`` maps each stored name to its file and shape. Raises WeightsError on a missing,
    misshapen or unexpected tensor; ignores rotary tables and a tied checkpoint's lm_head.
    """
    expected = expected_shapes(config)
    plan: dict[str, _Source] = {}
    for name, (file, shape) in found.items():
        canonical = rename(name)
        if canonical is None or canonical not in expected:
            if _IGNORED.search(name) or (canonical == "lm_head.weight"
                                         and config.tie_word_embeddings):
                continue
            raise WeightsError(_unexpected(name, file, config))
        if canonical in plan:
            raise WeightsError(f"{file}: tensor {name!r} is stored twice "
                               f"(also in {plan[canonical].file})")
        if shape != expected[canonical]:
            raise WeightsError(f"{file}: tensor {name!r} has shape {list(shape)}, the config "
                               f"implies {list(expected[canonical])} for {canonical!r}")
        heads = None
        if interleaved and canonical.endswith("q_proj.weight"):
            heads = config.num_heads
        elif interleaved and canonical.endswith("k_proj.weight"):
            heads = config.num_kv_heads
        plan[canonical] = _Source(file, name, shape, heads)
    missing = [name for name in expected if name not in plan]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"{checkpoint}: tensor {missing[0]!r} is missing{more}")
    return plan


def _unexpected(name: str, file: Path, config: ModelConfig) -> str:
    if name.endswith(".bias"):
        return f"{file}: tensor {name!r} is a bias; biased projections are not supported"
    if name == "rope_freqs.weight":
        return f"{file}: tensor {name!r} holds rope scaling factors, which are not supported"
    return (f"{file}: unexpected tensor {name!r}; not part of a {config.num_layers}-layer "
            "Mistral/Llama decoder")


# Entry point ----------------------------------------------------------------------------------
def load_weights(path: Path | None = None, *, progress: bool = True,
                 quantization: Quantization = "none") -> LoadedWeights:
    """Load a checkpoint: a HF folder, a Mistral consolidated folder, or a GGUF file.

    ``path=None`` loads the embedded default model. ``progress`` shows a tqdm bar on stderr
    while tensors are read or dequantized. ``quantization="int8"`` returns the projections
    as int8 with row scales (see :class:`LoadedWeights`); ``"int8x2"`` returns float32
    tensors, from which :meth:`~model.transformer.Transformer.from_tensors` builds the two
    int8 planes (the second plane needs the float32 weight). Raises WeightsError (or ConfigError
    for a bad config file) with a one-line message naming the file and tensor at fault.
    """
    if quantization not in ("none", "int8", "int8x2"):
        raise ValueError(f"quantization must be none, int8 or int8x2 here, got {quantization!r}")
    path = default_model_path() if path is None else Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"{path}: no such file or folder")
    if path.is_dir():
        return _load_folder(path, progress, quantization)
    if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        return _load_gguf(path, progress, quantization)
    raise WeightsError(f"{path}: not a GGUF file; give a GGUF file, or the folder holding a "
                       "HF (config.json) or Mistral (params.json) checkpoint")


def _load_folder(folder: Path, progress: bool, quantization: Quantization) -> LoadedWeights:
    hf_files = _hf_weight_files(folder)
    consolidated = sorted(folder.glob("consolidated*.safetensors"))
    if (folder / "config.json").is_file() and hf_files:
        config = ModelConfig.from_hf_config(read_json_object(folder / "config.json", ConfigError))
        plan = _plan(_scan_safetensors(hf_files), _hf_rename, config, folder)
    elif (folder / "params.json").is_file() and consolidated:
        found = _scan_safetensors(consolidated)
        params = read_json_object(folder / "params.json", ConfigError)
        embed = found.get("tok_embeddings.weight")
        config = ModelConfig.from_mistral_params(params, embed[1][0] if embed else None)
        plan = _plan(found, _table_renamer(_CONSOLIDATED_NAMES), config, folder,
                     interleaved=True)
    else:
        ggufs = sorted(folder.glob("*.gguf"))
        if len(ggufs) == 1 and not (folder / "config.json").exists():
            return _load_gguf(ggufs[0], progress, quantization)
        raise WeightsError(_no_weights_message(folder))
    tensors, scales = _read_planned(plan, progress, quantization)
    return LoadedWeights(config=config, tensors=tensors, source=folder, scales=scales)


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


def _read_planned(plan: Mapping[str, _Source], progress: bool, quantization: Quantization
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    by_file: dict[Path, list[tuple[str, _Source]]] = {}
    for canonical, source in plan.items():
        by_file.setdefault(source.file, []).append((canonical, source))
    tensors: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
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
                        _store(canonical, tensor, quantization, tensors, scales)
                        bar.update()
            except (SafetensorError, OSError) as exc:
                raise WeightsError(f"{file}: unreadable safetensors file ({exc})") from exc
    return tensors, scales


def _store(canonical: str, tensor: torch.Tensor, quantization: Quantization,
           tensors: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]) -> None:
    """Keep one fp32 tensor, quantized to int8 rows first where the quantization says so."""
    if quantization == "int8" and is_quantized_weight(canonical):
        quantized = quantize_rows(tensor)
        tensors[canonical], scales[canonical] = quantized.values, quantized.scale
    else:
        tensors[canonical] = tensor.contiguous()


# GGUF -----------------------------------------------------------------------------------------
def _has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


def _load_gguf(path: Path, progress: bool, quantization: Quantization) -> LoadedWeights:
    entry = gguf_file.cache_entry(path)
    weights_file = entry / gguf_file.weights_file_name(quantization)
    cached = _read_gguf_cache(entry, weights_file)
    if cached is None:
        return _convert_gguf(path, entry, weights_file, progress, quantization)
    meta, stored = cached
    tensors, scales = _split_scales(stored)
    config = ModelConfig.from_gguf_metadata(meta, "lm_head.weight" in tensors)
    _plan({name: (weights_file, tuple(t.shape)) for name, t in tensors.items()},
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
        plan = _plan({name: (path, gguf_file.tensor_shape(t)) for name, t in stored.items()},
                     _table_renamer(_GGUF_NAMES), config, path, interleaved=True)
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
            _store(canonical, tensor, quantization, tensors, scales)
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
