"""The Mistral 7B paper's two serving claims, measured on ringserve's own code.

1. Cache memory: with W = 4096 the rolling buffer holds 8x less than a full cache at 32K
   tokens (Mistral-7B shape: 32 layers, 8 KV heads, head dim 128, bf16). Computed from the
   allocator's geometry, nothing allocated.
2. Attention speed: windowed attention over a 16K-token prompt with W = 4096 against full
   causal attention (PyTorch SDPA, is_causal) on the same tensors, timed side by side in this
   run; optionally also against "vanilla" attention (materialized scores + explicit mask).

    python -m bench.paper_claims [--tokens 16384] [--window 4096] [--heads 8] [--kv-heads 2]

Head counts are per-run knobs: attention cost is linear in heads, so the ratio holds for
Mistral's 32/8; fewer heads keep the run short on a 2-core CPU. Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from model.attention import QUERY_BLOCK, prefill_attention
from model.block_table import blocks_per_table
from model.paged_cache import PagedGeometry

GIB = 1024**3


def cache_memory(tokens: int, window: int, block_size: int = 16) -> None:
    """Claim 1: bytes per sequence of the rolling buffer vs a full cache, from the paged
    cache's geometry (a sequence holds R = ceil((W-1)/B) + 1 blocks once its ring rolls)."""
    def geometry(window_or_none: int | None) -> PagedGeometry:
        return PagedGeometry(num_layers=32, num_kv_heads=8, head_dim=128,
                             block_size=block_size,
                             table_len=blocks_per_table(window_or_none, tokens, block_size),
                             dtype_bytes=2)

    rolling_geometry, full_geometry = geometry(window), geometry(None)
    rolling = rolling_geometry.table_len * rolling_geometry.bytes_per_block
    full = full_geometry.table_len * full_geometry.bytes_per_block
    print(f"KV cache per sequence at {tokens} tokens, Mistral-7B shape, bf16, "
          f"blocks of {block_size}")
    print(f"  full cache        {full / GIB:8.2f} GiB")
    print(f"  rolling, W={window:<5d} {rolling / GIB:8.2f} GiB  "
          f"({rolling_geometry.table_len} blocks = {rolling_geometry.table_len * block_size} "
          "ring rows)")
    print(f"  ratio full/rolling: {full / rolling:.1f}x  (paper: 8x)")


def _best_time(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def vanilla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None
                      ) -> torch.Tensor:
    """Textbook attention: full [T, T] scores per head, explicit mask, softmax."""
    num_tokens, num_heads, dim = q.shape
    group = num_heads // k.shape[1]
    pos = torch.arange(num_tokens)
    diff = pos[:, None] - pos[None, :]
    allowed = diff >= 0 if window is None else (diff >= 0) & (diff < window)
    out = torch.empty_like(q)
    for head in range(num_heads):
        scores = q[:, head] @ k[:, head // group].T / math.sqrt(dim)  # [T, T]
        scores.masked_fill_(~allowed, float("-inf"))
        out[:, head] = scores.softmax(-1) @ v[:, head // group]
    return out


def attention_speed(tokens: int, window: int, heads: int, kv_heads: int, dim: int,
                    repeats: int, vanilla: bool, query_block: int) -> None:
    """Claim 2: banded windowed attention vs full causal SDPA at the same length."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(tokens, heads, dim, generator=gen)  # [T, H, D]
    k = torch.randn(tokens, kv_heads, dim, generator=gen)  # [T, KVH, D]
    v = torch.randn(tokens, kv_heads, dim, generator=gen)
    qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, T, D]

    def full_causal() -> torch.Tensor:
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)

    def windowed() -> torch.Tensor:
        return prefill_attention(q, k, v, 0, window, query_block=query_block)

    t_full = _best_time(full_causal, repeats)
    t_ours = _best_time(windowed, repeats)
    print(f"attention over {tokens} tokens, W={window}, {heads} query / {kv_heads} KV heads, "
          f"D={dim}, fp32, {torch.get_num_threads()} threads, query block {query_block}, "
          f"best of {repeats}")
    print(f"  full causal SDPA          {t_full * 1e3:9.1f} ms")
    print(f"  ringserve windowed (band) {t_ours * 1e3:9.1f} ms")
    print(f"  speedup vs full causal SDPA: {t_full / t_ours:.2f}x  (paper: ~2x vs vanilla)")
    if vanilla:
        t_vanilla = _best_time(lambda: vanilla_attention(q, k, v, None), 1)
        print(f"  vanilla (scores + mask)   {t_vanilla * 1e3:9.1f} ms")
        print(f"  speedup vs vanilla: {t_vanilla / t_ours:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--cache-tokens", type=int, default=32768)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--query-block", type=int, default=QUERY_BLOCK,
                        help="queries per block of the banded CPU attention")
    parser.add_argument("--vanilla", action="store_true",
                        help="also time textbook attention (slow: full T x T scores)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    cache_memory(args.cache_tokens, args.window)
    print()
    attention_speed(args.tokens, args.window, args.heads, args.kv_heads, args.head_dim,
                    args.repeats, args.vanilla, args.query_block)


if __name__ == "__main__":
    main()
