"""Building an engine from ``EngineArgs``: device, dtype, weights, tokenizer, paged KV pool.

Kept apart from the step loop: this runs once per replica, and everything it decides (which
device, which dtype, how many blocks the KV budget holds) is fixed afterwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from model import cpu_kernels
from model.config import ModelConfig
from model.default_model import default_model_path, model_name_for
from model.engine.types import EngineRequestError
from model.engine_args import EngineArgs
from model.int4 import Int4ShapeError
from model.omp_threads import release_omp_threads
from model.paged_cache import (
    DEFAULT_CPU_BLOCK_SIZE,
    DEFAULT_CUDA_BLOCK_SIZE,
    PagedGeometry,
    PagedKVCache,
)
from model.quantization import Quantization, resolve_quantization
from model.scheduler import SchedulerConfig
from model.tokenizers import Tokenizer, load_tokenizer
from model.transformer import Transformer
from model.weights import load_weights

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 2 * 1024**3
DEFAULT_MAX_MODEL_LEN = 4096


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is fp32 on CPU (bf16 matmuls are much slower on AVX2) and bf16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be auto or one of {', '.join(dtypes)}, got {name!r}")
    return dtypes[name]


def default_kv_budget(device: torch.device) -> int:
    """Bytes for the KV pool when the args name none: 90% of free memory on CUDA, 2 GiB on CPU."""
    if device.type == "cuda":  # pragma: no cover - CUDA only
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    return DEFAULT_CPU_KV_BYTES


@dataclass(frozen=True)
class EngineParts:
    """Everything an engine is built from (what ``EngineCore.__init__`` takes)."""

    model: Transformer
    tokenizer: Tokenizer
    cache: PagedKVCache
    scheduler_config: SchedulerConfig
    max_model_len: int
    model_name: str


def _load_model(path: Path, args: EngineArgs, quantization: Quantization,
                device: torch.device, dtype: torch.dtype) -> Transformer:
    loaded = load_weights(path, progress=args.progress, quantization=quantization)
    config: ModelConfig = loaded.config
    if args.full_attention:
        config = config.with_window(None)
    elif args.window is not None:
        config = config.with_window(args.window)
    return Transformer.from_tensors(config, loaded.tensors, dtype=dtype, device=device,
                                    quantization=quantization, scales=loaded.scales,
                                    zeros=loaded.zeros, dense_prefill=args.dense_prefill)


def build_engine_parts(args: EngineArgs) -> EngineParts:
    """Load weights and tokenizer from ``args.model`` (the embedded model when None) and size
    the KV pool and the scheduler for them."""
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    is_default = args.model in (None, "", "default")
    path = default_model_path() if is_default else Path(str(args.model))
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    quantization = resolve_quantization(args.quantization, device, dtype)
    try:
        model = _load_model(path, args, quantization, device, dtype)
    except Int4ShapeError as exc:
        if args.quantization != "auto":
            raise
        # auto picked int4, whose kernel needs dims in groups of 32 and tiles of 16 rows:
        # fall back to the next form that meets the accuracy goals
        quantization = resolve_quantization("auto", device, dtype, allow_int4=False)
        logger.warning("quantization auto: int4 does not fit this model (%s); using %s",
                       exc, quantization)
        model = _load_model(path, args, quantization, device, dtype)
    if args.quantization == "auto":
        logger.info("quantization auto: %s weights on %s", quantization, device.type)
    config = model.config
    tokenizer = load_tokenizer(path)
    max_model_len = args.max_model_len or min(config.max_position_embeddings,
                                              DEFAULT_MAX_MODEL_LEN)
    cache = _cache_pool(args, config, max_model_len, dtype, device)
    if device.type == "cpu" and dtype == torch.float32:
        cpu_kernels.paged_decode()  # build or load it now, not in the first request's step
    scheduler_config = SchedulerConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=max(args.max_num_batched_tokens, args.max_num_seqs),
        prefill_chunk=args.prefill_chunk or args.max_num_batched_tokens,
    )
    release_omp_threads()  # the loading thread's workers would throttle the stepping one's
    return EngineParts(model, tokenizer, cache, scheduler_config, max_model_len,
                       model_name_for(args.model))


def _cache_pool(args: EngineArgs, config: ModelConfig, max_model_len: int, dtype: torch.dtype,
                device: torch.device) -> PagedKVCache:
    """The paged pool: as many blocks as the budget holds, at least one full table (R blocks)
    so that a sequence of ``max_model_len`` tokens always fits alone, and no more than
    ``max_num_seqs`` full tables (blocks beyond those could never be held at once)."""
    block_size = args.block_size or (DEFAULT_CUDA_BLOCK_SIZE if device.type == "cuda"
                                     else DEFAULT_CPU_BLOCK_SIZE)
    if block_size < 1:
        raise EngineRequestError(f"block_size must be positive, got {block_size}")
    geometry = PagedGeometry.for_model(config, max_model_len, dtype, block_size)
    budget = args.kv_cache_memory or default_kv_budget(device)
    num_blocks = min(geometry.blocks_for_budget(budget), args.max_num_seqs * geometry.table_len)
    if num_blocks < geometry.table_len:
        raise EngineRequestError(
            f"KV cache budget {budget} bytes holds {num_blocks} blocks of {block_size} "
            f"positions; one sequence may need {geometry.table_len} "
            f"({geometry.table_len * geometry.bytes_per_block} bytes): lower max_model_len "
            "or raise kv_cache_memory")
    return PagedKVCache(geometry, num_blocks, dtype, device)
