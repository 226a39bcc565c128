"""Attention backends for grouped-query, sliding-window attention.

Two entry points, both free of any cache bookkeeping:

* :func:`prefill_attention` - a chunk of queries against the keys that precede it plus itself
  (causal, and banded when there is a window). On CPU it walks query blocks and hands each
  block only the keys its window can reach, so a long prompt costs O(T * W), not O(T^2). On
  CUDA it uses flash-attn's ``window_size`` when installed, else PyTorch SDPA with a mask.
* :func:`decode_attention` - one query per sequence against that sequence's cached keys,
  batched over sequences; which cached rows are valid comes in as a mask.

Shape letters: B batch, T tokens, H query heads, KVH key/value heads, D head dim, W window.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Queries per block for CPU banded attention. Each block reads W + QUERY_BLOCK - 1 keys, so
# smaller blocks waste less on the band's edges while larger ones make bigger matmuls; 256
# balances the two on AVX2 CPUs for W = 4096 (see bench/attention_bench.py).
QUERY_BLOCK = 256


def _flash_attn_func():  # pragma: no cover - only on CUDA machines with flash-attn
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def band_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[Tq, Tk] bool: query at position p may see key at position j iff j <= p and p - j < W."""
    diff = q_pos[:, None] - k_pos[None, :]  # [Tq, Tk]
    allowed = diff >= 0
    if window is not None:
        allowed &= diff < window
    return allowed


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int,
                      window: int | None, query_block: int = QUERY_BLOCK) -> torch.Tensor:
    """Causal (optionally windowed) attention of a chunk of queries over contiguous keys.

    q: [Tq, H, D] at positions q_start .. q_start+Tq-1.
    k, v: [Tk, KVH, D] at positions q_start+Tq-Tk .. q_start+Tq-1 (history, then the chunk).
    Returns [Tq, H, D].
    """
    num_q, num_heads, head_dim = q.shape
    num_k = k.shape[0]
    k_start = q_start + num_q - num_k
    if q.is_cuda:  # pragma: no cover - exercised by the gpu-marked tests
        flash = _flash_attn_func()
        if flash is not None and q.dtype in (torch.float16, torch.bfloat16):
            left = -1 if window is None else window - 1
            # flash-attn aligns the causal mask bottom-right, which is exactly our layout.
            out = flash(q[None], k[None], v[None], causal=True, window_size=(left, 0))
            return out[0]
    qh = q.transpose(0, 1)[None]  # [1, H, Tq, D]
    kh = k.transpose(0, 1)[None]  # [1, KVH, Tk, D]
    vh = v.transpose(0, 1)[None]  # [1, KVH, Tk, D]
    if window is None or num_k <= window or q.is_cuda:
        return _sdpa(qh, kh, vh, q_start, k_start, window)[0].transpose(0, 1)
    out = torch.empty_like(qh)  # [1, H, Tq, D]
    for block_start in range(0, num_q, query_block):
        block_end = min(block_start + query_block, num_q)
        first_pos = q_start + block_start
        # Keys this block can reach: positions first_pos-W+1 .. q_start+block_end-1.
        key_lo = max(0, first_pos - window + 1 - k_start)
        key_hi = block_end + (num_k - num_q)
        out[:, :, block_start:block_end] = _sdpa(
            qh[:, :, block_start:block_end], kh[:, :, key_lo:key_hi], vh[:, :, key_lo:key_hi],
            first_pos, k_start + key_lo, window)
    return out[0].transpose(0, 1)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, k_start: int,
          window: int | None) -> torch.Tensor:
    """SDPA over [1, H, Tq, D] x [1, KVH, Tk, D] with the causal/window mask for these positions."""
    num_q, num_k = q.shape[2], k.shape[2]
    aligned = q_start == k_start and num_q == num_k
    if aligned and (window is None or num_k <= window):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    q_pos = torch.arange(q_start, q_start + num_q, device=q.device)
    k_pos = torch.arange(k_start, k_start + num_k, device=q.device)
    mask = band_mask(q_pos, k_pos, window)  # [Tq, Tk]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     valid: torch.Tensor) -> torch.Tensor:
    """One query per sequence over its cached keys.

    q: [B, H, D]; k, v: [B, KVH, L, D] (cache rows, any order); valid: [B, L] bool.
    Returns [B, H, D].
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    qg = q.view(batch, num_kv_heads, group, head_dim)  # [B, KVH, G, D]
    scores = torch.matmul(qg, k.transpose(-1, -2))  # [B, KVH, G, L]
    scores.mul_(1.0 / math.sqrt(head_dim))
    scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    out = torch.matmul(probs, v)  # [B, KVH, G, D]
    return out.reshape(batch, num_heads, head_dim)
