"""Tiny checkpoint builders shared by the tests: HF folders, Mistral consolidated folders, GGUF.

Every builder writes real files in the format's own layout (transformers' ``save_pretrained``,
Meta/Mistral's interleaved q/k rows, llama.cpp's GGUF naming and q/k permutation), so loaders
are tested against what the tools they mirror produce. Weights are random but deterministic.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

MISTRAL_TOKENIZER_VOCAB = 32000  # pieces in mistral-common's tokenizer.model.v1


def mistral_tokenizer_model() -> Path:
    """mistral-common's sentencepiece ``tokenizer.model.v1`` (32000 pieces, Mistral 7B v0.1)."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def make_tiny_hf_checkpoint(
    tmp_path: Path,
    model_type: str = "mistral",
    sliding_window: int | None = None,
    *,
    vocab_size: int = MISTRAL_TOKENIZER_VOCAB,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    max_position_embeddings: int = 512,
    rope_theta: float = 10000.0,
    tie_word_embeddings: bool = False,
    max_shard_size: str | None = None,
    seed: int = 0,
    name: str | None = None,
) -> Path:
    """Save a random tiny ``MistralForCausalLM`` / ``LlamaForCausalLM`` and return its folder.

    The folder (``tmp_path / name``, default ``tiny-<model_type>``) holds config.json,
    model.safetensors (or shards plus an index when ``max_shard_size`` is given, e.g. "40KB")
    and a copy of mistral-common's ``tokenizer.model`` (32000 pieces: keep the default
    ``vocab_size`` when tokenizing real text; a smaller vocab is fine for weight-only tests).
    ``sliding_window`` applies to mistral only (llama has none).

    Weights are random with unit-scale activations: linear layers ~ N(0, 1/fan_in), norm
    weights ~ 1 + N(0, 0.1), so every tensor differs and logits are far from uniform.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim or hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
    )
    model: MistralForCausalLM | LlamaForCausalLM
    if model_type == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=sliding_window, **common))
    elif model_type == "llama":
        if sliding_window is not None:
            raise ValueError("llama checkpoints have no sliding window")
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(f"model_type must be 'mistral' or 'llama', got {model_type!r}")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() == 1:
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5)
    folder = tmp_path / (name or f"tiny-{model_type}")
    if max_shard_size is None:
        model.save_pretrained(folder)
    else:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    shutil.copyfile(mistral_tokenizer_model(), folder / "tokenizer.model")
    return folder


def hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """A saved HF checkpoint's tensors under canonical names (no ``model.`` prefix)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("model*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        for name, tensor in load_file(str(file)).items():
            tensors[name.removeprefix("model.")] = tensor
    return tensors


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def rotate_half_to_interleaved(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """HF q/k rows to Meta's interleaved rotary order (inverse of the HF converter's permute).

    Within each head, rotate-half row c*D/2 + j (c in {0, 1}) becomes interleaved row 2j + c.
    """
    rows, cols = weight.shape
    # [H*D, hidden] -> [H, 2, D/2, hidden] -> [H, D/2, 2, hidden] -> [H*D, hidden]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, cols).transpose(1, 2).reshape(
        rows, cols)


def make_tiny_consolidated_checkpoint(hf_folder: Path, out: Path,
                                      dtype: torch.dtype = torch.bfloat16) -> Path:
    """Rewrite a tiny HF checkpoint as a Mistral consolidated folder (params.json +
    consolidated.safetensors, Meta names, interleaved q/k rows); returns ``out``."""
    from safetensors.torch import save_file

    config = _config(hf_folder)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    renames = {
        "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
        "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
        "mlp.up_proj": "feed_forward.w3",
    }
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in hf_state_dict(hf_folder).items():
        if name == "embed_tokens.weight":
            new = "tok_embeddings.weight"
        elif name == "lm_head.weight":
            new = "output.weight"
        elif name == "norm.weight":
            new = name
        else:
            _, index, part = name.split(".", 2)
            module = part.removesuffix(".weight")
            new = f"layers.{index}.{renames[module]}.weight"
            if module == "self_attn.q_proj":
                tensor = rotate_half_to_interleaved(tensor, heads)
            elif module == "self_attn.k_proj":
                tensor = rotate_half_to_interleaved(tensor, kv_heads)
        tensors[new] = tensor.to(dtype).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "consolidated.safetensors"))
    params = {
        "dim": config["hidden_size"], "n_layers": config["num_hidden_layers"],
        "head_dim": _head_dim(config), "hidden_dim": config["intermediate_size"],
        "n_heads": heads, "n_kv_heads": kv_heads, "norm_eps": config["rms_norm_eps"],
        "vocab_size": config["vocab_size"], "rope_theta": config.get("rope_theta", 10000.0),
    }
    if config.get("sliding_window"):
        params["sliding_window"] = config["sliding_window"]
    (out / "params.json").write_text(json.dumps(params))
    return out


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf ``LlamaModel.permute`` (HF rows -> GGUF rows), verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def make_tiny_gguf(hf_folder: Path, out: Path, qtype: str = "F32", *,
                   tensor_types: dict[str, str] | None = None,
                   extra_tensors: dict[str, np.ndarray] | None = None) -> Path:
    """Convert a tiny HF checkpoint to a llama-architecture GGUF file as llama.cpp would.

    Matrices are stored as ``qtype`` (a GGMLQuantizationType name: F32, F16, BF16, Q8_0, Q4_0,
    Q4_1, ...) unless ``tensor_types`` names another type for a GGUF tensor name (a type
    gguf cannot quantize, such as Q8_1, is written as zero bytes); norms stay F32; q/k rows are
    permuted with :func:`llama_cpp_permute`; a tied checkpoint gets no ``output.weight``.
    ``extra_tensors`` are added as F32 (for error tests). A minimal tokenizer (tokens ``<t0>``,
    ``<t1>``, ...) is included, and a mistral checkpoint's sliding window is recorded as
    ``llama.attention.sliding_window`` (llama.cpp's own converter drops it).
    """
    import gguf
    from gguf.quants import quant_shape_to_byte_shape, quantize

    config = _config(hf_folder)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    writer.add_rope_dimension_count(_head_dim(config))
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>" for i in range(config["vocab_size"])])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if config.get("sliding_window"):
        writer.add_sliding_window(config["sliding_window"])
    for name, tensor in hf_state_dict(hf_folder).items():
        array = tensor.float().numpy()
        if name == "embed_tokens.weight":
            new = "token_embd.weight"
        elif name == "lm_head.weight":
            new = "output.weight"
        elif name == "norm.weight":
            new = "output_norm.weight"
        else:
            _, index, part = name.split(".", 2)
            module = part.removesuffix(".weight")
            new = f"blk.{index}.{_GGUF_LAYER_NAMES[module]}.weight"
            if module == "self_attn.q_proj":
                array = llama_cpp_permute(array, heads, heads)
            elif module == "self_attn.k_proj":
                array = llama_cpp_permute(array, heads, kv_heads)
        kind = gguf.GGMLQuantizationType[(tensor_types or {}).get(new, qtype)]
        if array.ndim == 1 and new not in (tensor_types or {}):
            kind = gguf.GGMLQuantizationType.F32
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(new, np.ascontiguousarray(array, dtype=np.float32))
        elif kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(new, array.astype(np.float16))
        else:
            try:
                data = quantize(array, kind)
            except NotImplementedError:
                data = np.zeros(quant_shape_to_byte_shape(array.shape, kind), dtype=np.uint8)
            writer.add_tensor(new, data, raw_dtype=kind)
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def make_tiny_swa_checkpoint(folder: Path, window: int) -> Path:
    """The engine and cache tests' small sliding-window Mistral (4 layers, 8 heads, 2 KV
    heads), big enough that kernels and batching differences would show in the logits."""
    return make_tiny_hf_checkpoint(folder, model_type="mistral", sliding_window=window,
                                   hidden_size=256, intermediate_size=512, num_layers=4,
                                   num_heads=8, num_kv_heads=2)
