"""Engine settings: a frozen dataclass of every knob an engine is built with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# none | int8 | int8x2 | int4 | auto (see EngineArgs.quantization). The library default is
# the checkpoint's own weights; what serves (`ringserve serve`, AppConfig, `ringserve
# generate`) defaults to auto: on CPU int4 since it meets the accuracy goals (2026-12-02)
DEFAULT_QUANTIZATION: Final = "none"
SERVING_QUANTIZATION: Final = "auto"


@dataclass(frozen=True)
class EngineArgs:
    """How to build an engine. Defaults suit the embedded default model on a small CPU box."""

    model: str | None = None  # checkpoint folder or .gguf file; None/"default": embedded model
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA; or float32/bfloat16/float16
    # int8: projections and LM head as int8 (CPU, fbgemm); int8x2: as two int8 planes each
    # (~15-bit weights); int4: 4-bit groups of 32 (LM head int8), bf16 activations, CPU
    # (model/int4.py); auto: on CPU with fp32 activations the fastest form that meets the
    # accuracy goals (model.quantization.resolve_quantization), none otherwise (CUDA runs
    # bf16 unquantized); none: as the checkpoint's dtype
    quantization: str = DEFAULT_QUANTIZATION
    # int4 only: prompt tokens run through a bf16 copy of each decoder projection (2-3x the
    # int4 kernel's prefill speed here; 2 bytes per weight more, ~210 MB for the default
    # model); generated tokens always take the int4 kernel. False: int4 weights only
    dense_prefill: bool = True
    device: str = "auto"  # auto: cuda when available, else cpu
    window: int | None = None  # override the checkpoint's sliding window (tokens)
    full_attention: bool = False  # ignore the checkpoint's window entirely
    max_model_len: int | None = None  # prompt + output limit; default min(config limit, 4096)
    kv_cache_memory: int | None = None  # bytes for the KV pool; default 2 GiB CPU, 90% free GPU
    max_num_seqs: int = 32  # sequences running at once
    block_size: int | None = None  # positions per KV cache block; None: 16 (CPU and CUDA)
    max_num_batched_tokens: int = 512  # tokens per engine step (prefill chunks + decodes)
    prefill_chunk: int | None = None  # max tokens of one prompt per step; default the budget
    torch_threads: int | None = None  # torch intra-op threads; None leaves torch's default
    progress: bool = True  # show progress while loading weights
