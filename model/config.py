"""Model configuration: one frozen dataclass, built only from a checkpoint's own files.

Three sources are understood: a Hugging Face ``config.json`` (``model_type`` ``mistral`` or
``llama``), a Mistral ``params.json`` (consolidated checkpoints) and GGUF metadata (llama
architecture). Anything else raises :class:`ConfigError` naming the offending field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from model.json_file import read_json_object


class ConfigError(ValueError):
    """A checkpoint's configuration is missing a field or holds one we cannot serve."""


SUPPORTED_HF_MODEL_TYPES = ("mistral", "llama")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and hyper-parameters of a Mistral-family (Llama-shaped) decoder."""

    architecture: str  # "mistral" or "llama"; informational only, the layers are the same
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    sliding_window: int | None  # None: full causal attention
    tie_word_embeddings: bool
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(
                    f"config field {name!r} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"config field 'num_key_value_heads' ({self.num_kv_heads}) must divide "
                f"'num_attention_heads' ({self.num_heads})"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"config field 'sliding_window' must be positive or null, "
                              f"got {self.sliding_window!r}")
        if self.head_dim % 2:
            raise ConfigError(
                f"config field 'head_dim' must be even for rotary, got {self.head_dim}")

    # Derived values -------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        """Width of the query projection: H * D."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of each of the key and value projections: KVH * D."""
        return self.num_kv_heads * self.head_dim

    def with_window(self, window: int | None) -> ModelConfig:
        """A copy whose sliding window is overridden (None: full attention)."""
        return replace(self, sliding_window=window)

    # Sources --------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, raw: Mapping[str, Any]) -> ModelConfig:
        """Build from the contents of a Hugging Face ``config.json``."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_HF_MODEL_TYPES:
            raise ConfigError(
                f"config field 'model_type' is {model_type!r}; supported: "
                + ", ".join(SUPPORTED_HF_MODEL_TYPES)
            )
        rope_scaling = raw.get("rope_scaling")
        rope_parameters = raw.get("rope_parameters") or {}
        rope_type = (rope_scaling or {}).get("rope_type") or (rope_scaling or {}).get("type")
        rope_type = rope_type or rope_parameters.get("rope_type", "default")
        if rope_type not in ("default", None):
            raise ConfigError(f"config field 'rope_scaling' type {rope_type!r} is not supported")
        rope_theta = raw.get("rope_theta", rope_parameters.get("rope_theta", 10000.0))
        num_heads = _required(raw, "num_attention_heads")
        hidden = _required(raw, "hidden_size")
        head_dim = raw.get("head_dim") or hidden // num_heads
        window = raw.get("sliding_window") if model_type == "mistral" else None
        if model_type == "mistral" and raw.get("use_sliding_window") is False:
            window = None
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=model_type,
            vocab_size=_required(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_required(raw, "intermediate_size"),
            num_layers=_required(raw, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            sliding_window=window,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_mistral_params(cls, raw: Mapping[str, Any], vocab_size: int | None = None
                            ) -> ModelConfig:
        """Build from a Mistral ``params.json`` (consolidated checkpoint)."""
        dim = _required(raw, "dim")
        num_heads = _required(raw, "n_heads")
        vocab = raw.get("vocab_size", vocab_size)
        if vocab is None:
            raise ConfigError("config field 'vocab_size' is missing from params.json")
        window = raw.get("sliding_window")
        if isinstance(window, list):  # per-layer windows are not supported; take a uniform one
            if len(set(window)) != 1:
                raise ConfigError("config field 'sliding_window' varies per layer; unsupported")
            window = window[0]
        return cls(
            architecture="mistral",
            vocab_size=int(vocab),
            hidden_size=dim,
            intermediate_size=_required(raw, "hidden_dim"),
            num_layers=_required(raw, "n_layers"),
            num_heads=num_heads,
            num_kv_heads=raw.get("n_kv_heads") or num_heads,
            head_dim=raw.get("head_dim") or dim // num_heads,
            rms_norm_eps=float(raw.get("norm_eps", 1e-5)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            max_position_embeddings=int(raw.get("max_seq_len", raw.get("max_position_embeddings",
                                                                       32768))),
            sliding_window=window,
            tie_word_embeddings=bool(raw.get("tied_embeddings", False)),
            bos_token_id=1,
            eos_token_ids=(2,),
        )

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], has_output_tensor: bool) -> ModelConfig:
        """Build from GGUF key/value metadata (``general.architecture`` must be llama)."""
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ConfigError(f"GGUF field 'general.architecture' is {arch!r}; supported: llama")

        def field(name: str, default: Any = None) -> Any:
            key = f"{arch}.{name}"
            if key in meta:
                return meta[key]
            if default is None:
                raise ConfigError(f"GGUF field {key!r} is missing")
            return default

        hidden = int(field("embedding_length"))
        num_heads = int(field("attention.head_count"))
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = meta.get(f"{arch}.vocab_size") or (len(tokens) if tokens is not None else None)
        if vocab is None:
            raise ConfigError(f"GGUF field '{arch}.vocab_size' is missing")
        head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // num_heads)
        window = meta.get(f"{arch}.attention.sliding_window")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        bos = meta.get("tokenizer.ggml.bos_token_id")
        return cls(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(field("feed_forward_length")),
            num_layers=int(field("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(field("attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            rms_norm_eps=float(field("attention.layer_norm_rms_epsilon")),
            rope_theta=float(field("rope.freq_base", 10000.0)),
            max_position_embeddings=int(field("context_length")),
            sliding_window=int(window) if window else None,
            tie_word_embeddings=not has_output_tensor,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=() if eos is None else (int(eos),),
        )

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfig:
        """Read ``config.json`` (HF) or ``params.json`` (Mistral) from a checkpoint folder."""
        hf = folder / "config.json"
        params = folder / "params.json"
        if hf.is_file():
            return cls.from_hf_config(read_json_object(hf, ConfigError))
        if params.is_file():
            return cls.from_mistral_params(read_json_object(params, ConfigError))
        raise ConfigError(f"{folder}: no config.json or params.json found")


def _required(raw: Mapping[str, Any], name: str) -> Any:
    if name not in raw or raw[name] is None:
        raise ConfigError(f"config field {name!r} is missing")
    return raw[name]

