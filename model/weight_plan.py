"""Checkpoint planning: canonical tensor names and shapes, checked before any data is read.

Every loader (HF and Mistral folders in :mod:`model.weights`, GGUF in
:mod:`model.gguf_weights`) maps its stored names to the canonical HF naming through a rename
function, and :func:`plan_tensors` checks the result against the shapes the config implies,
so a wrong or foreign checkpoint fails at once with :class:`WeightsError` naming the tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.config import ModelConfig
from model.int4 import Int4ShapeError, quantize_int4
from model.quantization import (
    Quantization,
    is_int4_weight,
    is_quantized_weight,
    quantize_rows,
)


class WeightsError(ValueError):
    """A checkpoint's weights are missing, unreadable, or do not fit its config."""


@dataclass(frozen=True)
class LoadedWeights:
    """A checkpoint's config and its tensors under canonical names (float32, CPU).

    Under int8 quantization the projection weights are int8 [out, in] and ``scales`` maps
    each of their names to its float32 row scales [out]; under int4 they are 4-bit codes
    (uint8 [out, in], see :mod:`model.int4`) with group scales and zeros [out, in / 32] in
    ``scales`` and ``zeros``; otherwise both are empty.
    """

    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    source: Path  # the folder or GGUF file the weights came from
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    zeros: dict[str, torch.Tensor] = field(default_factory=dict)


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
CONSOLIDATED_NAMES = {
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
GGUF_NAMES = {
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


def table_renamer(table: Mapping[str, str]) -> Callable[[str], str | None]:
    """Rename through a ``{i}`` table; None for names the table does not know."""

    def rename(name: str) -> str | None:
        match = _LAYER_INDEX.match(name)
        if match is None:
            return table.get(name)
        pattern = table.get(name[: match.start(1)] + "{i}" + name[match.end(1):])
        return None if pattern is None else pattern.replace("{i}", match.group(1))

    return rename


def hf_rename(name: str) -> str:
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
class TensorSource:
    """Where one canonical tensor is stored and how to bring it to canonical layout."""

    file: Path
    name: str  # name inside the file
    shape: tuple[int, ...]  # as stored (torch order)
    rotary_heads: int | None = None  # interleaved q/k rows to reorder, over this many heads


def plan_tensors(found: Mapping[str, tuple[Path, tuple[int, ...]]],
          rename: Callable[[str], str | None], config: ModelConfig, checkpoint: Path,
          interleaved: bool = False) -> dict[str, TensorSource]:
    """Map stored tensors to canonical names and check them against the config's shapes.

    ``found`` maps each stored name to its file and shape. Raises WeightsError on a missing,
    misshapen or unexpected tensor; ignores rotary tables and a tied checkpoint's lm_head.
    """
    expected = expected_shapes(config)
    plan: dict[str, TensorSource] = {}
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
        plan[canonical] = TensorSource(file, name, shape, heads)
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


def store_tensor(canonical: str, tensor: torch.Tensor, quantization: Quantization,
                 tensors: dict[str, torch.Tensor], scales: dict[str, torch.Tensor],
                 zeros: dict[str, torch.Tensor]) -> None:
    """Keep one fp32 tensor, quantized first where the quantization says so: int8 rows, or
    int4 groups (projections only: the LM head is built from its fp32 weight at load)."""
    if quantization == "int8" and is_quantized_weight(canonical):
        quantized = quantize_rows(tensor)
        tensors[canonical], scales[canonical] = quantized.values, quantized.scale
    elif quantization == "int4" and is_int4_weight(canonical):
        try:
            groups = quantize_int4(tensor)
        except ValueError as exc:
            raise Int4ShapeError(f"{canonical}: {exc}") from exc
        tensors[canonical], scales[canonical] = groups.codes, groups.scale
        zeros[canonical] = groups.zero
    else:
        tensors[canonical] = tensor.contiguous()
