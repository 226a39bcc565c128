"""Attention backends for grouped-query, sliding-window attention.

Three entry points, all free of any cache bookkeeping:

* :func:`prefill_attention` - a chunk of queries against the keys that precede it plus itself
  (causal, and banded when there is a window). On CPU it walks query blocks and hands each
  block only the keys its window can reach, so a long prompt costs O(T * W), not O(T^2). On
  CUDA it uses flash-attn's ``window_size`` when installed, else PyTorch SDPA with a mask.
* :func:`decode_attention` - one query per sequence against that sequence's cached keys,
  batched over sequences; which cached rows are valid comes in as a mask.
* :func:`decode_attention_per_slot` - the same straight from the cache buffers, one sequence
  at a time over just its valid rows: on CPU this beats gathering a padded batch (no copy of
  the cache, no work on padding rows; bench/decode_attention_bench.py).
* :func:`paged_decode_attention` - the same over the paged pool: each sequence's window is a
  few runs of adjacent rows (its blocks, through its block table). On CPU (fp32) one call of
  our kernel per layer (model/cpu_kernels.py), else one SDPA call per sequence.

Shape letters: B batch, T tokens, H query heads, KVH key/value heads, D head dim, W window.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model import cpu_kernels
from model.omp_threads import one_thread

# Queries per block for CPU banded attention (capped at W/2). The band's work is n * W per
# block whatever n; smaller blocks shrink the two causal triangles (n^2 of it), where the
# kernel wastes part of its tiles, and bigger ones make fewer calls. 256 measured best at
# 16K tokens, W = 4096 against 512 and 1024 (bench/paper_claims.py, --query-block).
QUERY_BLOCK = 256
# Paged decode joins a sequence's window by one cat of its runs' views when it lies in at most
# this many runs of adjacent pool rows; beyond that by one index gather (bench/paged_bench.py).
MAX_RUNS_IN_PLACE = 4
# CPU paged decode runs on one intra-op thread while no window is longer than this: measured
# side by side (2 cores), one thread took 0.55-0.75x the time at 128 rows and 1.1x at 600.
ONE_THREAD_MAX_ROWS = 256


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
    if window is None or num_k <= window or q.is_cuda or _flash_cpu() is None:
        return _sdpa(qh, kh, vh, q_start, k_start, window)[0].transpose(0, 1)
    return _banded_cpu(qh, kh, vh, q_start, k_start, window, query_block)[0].transpose(0, 1)


def _flash_cpu():
    """PyTorch's CPU flash-attention kernel that also returns the log-sum-exp, if present."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _banded_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, k_start: int,
                window: int, query_block: int) -> torch.Tensor:
    """Windowed attention that computes only the band: O(T * W) instead of O(T^2).

    q: [1, H, Tq, D]; k, v: [1, KVH, Tk, D]. Queries go in blocks of n <= W/2. For a block
    whose first query is at position a, the keys it may see split into three parts, each run
    by the CPU flash kernel without an explicit mask::

        keys:   [a-W+1 ........ a-W+n] [a-W+n+1 ..... a-1] [a ......... a+n-1]
        part:   edge (j >= i)          middle (all seen)    diagonal (j <= i)

    The edge is a causal triangle read backwards (reverse queries and keys, run causal,
    reverse back); the middle needs no mask, so grouped query heads fold into one matmul per
    KV head. The parts merge through their log-sum-exps. Work per block is n * W, the band
    exactly. Blocks at the start of a sequence (no edge yet) or straddling it use a mask.
    """
    flash = _flash_cpu()
    num_q = q.shape[2]
    group = q.shape[1] // k.shape[1]
    block = max(1, min(query_block, window // 2))
    out = torch.empty_like(q)  # [1, H, Tq, D]
    for b0 in range(0, num_q, block):
        n = min(block, num_q - b0)
        a = q_start + b0
        qb = q[:, :, b0:b0 + n]  # [1, H, n, D]

        def keys(first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
            lo, hi = first - k_start, last - k_start + 1
            return k[:, :, lo:hi], v[:, :, lo:hi]  # [1, KVH, len, D]

        edge_lo, edge_hi = a - window + 1, a - window + n
        if edge_lo < k_start <= edge_hi:  # the block straddles the sequence start: mask it
            kb, vb = keys(k_start, a + n - 1)
            out[:, :, b0:b0 + n] = _sdpa(qb, kb, vb, a, k_start, window)
            continue
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (out [1,H,n,D], lse [1,H,n])
        ke, ve = keys(a, a + n - 1)
        parts.append(_grouped_causal(flash, qb, ke, ve, group, flipped=False))
        if edge_lo >= k_start:
            ke, ve = keys(edge_lo, edge_hi)
            parts.append(_grouped_causal(flash, qb, ke, ve, group, flipped=True))
        middle_lo = max(k_start, edge_hi + 1)
        if middle_lo <= a - 1:
            km, vm = keys(middle_lo, a - 1)
            parts.append(_grouped_full(flash, qb, km, vm, group))
        out[:, :, b0:b0 + n] = _merge(parts)
    return out


def _grouped_causal(flash, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int,
                    flipped: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of n queries over n keys (both starting at the same position), or
    with ``flipped`` its mirror image (query i sees keys i..n-1: the window's trailing edge,
    run as a causal triangle on reversed queries and keys).

    q: [1, H, n, D]; k, v: [1, KVH, n, D]. Query heads are viewed as [KVH, G] and each KV head
    is broadcast over its G query heads with a stride-0 view: no copy of K or V per head.
    Returns (out [1, H, n, D], lse [1, H, n]).
    """
    _, num_heads, n, dim = q.shape
    num_kv = k.shape[1]
    q4 = q[0].view(num_kv, group, n, dim)  # [KVH, G, n, D]
    k4, v4 = k[0][:, None], v[0][:, None]  # [KVH, 1, n, D]
    if flipped:
        q4, k4, v4 = q4.flip(2), k4.flip(2), v4.flip(2)
    out, lse = flash(q4, k4.expand(num_kv, group, n, dim), v4.expand(num_kv, group, n, dim),
                     0.0, True)  # [KVH, G, n, D], [KVH, G, n]
    if flipped:
        out, lse = out.flip(2), lse.flip(2)
    return out.reshape(1, num_heads, n, dim), lse.reshape(1, num_heads, n)


def _grouped_full(flash, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked attention with the query heads of each KV head folded into its query rows."""
    _, num_heads, n, dim = q.shape
    num_kv = k.shape[1]
    folded = q.reshape(1, num_kv, group * n, dim)  # [1, KVH, G*n, D]
    out, lse = flash(folded, k, v, 0.0, False)
    return out.reshape(1, num_heads, n, dim), lse.reshape(1, num_heads, n)


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Combine attention over disjoint key sets from each part's output and log-sum-exp."""
    if len(parts) == 1:
        return parts[0][0]
    lse = torch.stack([p[1] for p in parts])  # [P, 1, H, n]
    weights = torch.softmax(lse, dim=0).unsqueeze(-1)  # [P, 1, H, n, 1]
    out = parts[0][0] * weights[0]
    for i in range(1, len(parts)):
        out.addcmul_(parts[i][0], weights[i])  # one fused pass per part
    return out


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


def _grouped_attention(qg: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       valid: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention with each KV head's query heads grouped, the decode kernel's core.

    qg: [..., KVH, G, D]; keys, values: [..., KVH, L, D]; valid: [..., L] bool or None (all
    rows valid). Returns [..., KVH, G, D].
    """
    scores = torch.matmul(qg, keys.transpose(-1, -2))  # [..., KVH, G, L]
    scores.mul_(1.0 / math.sqrt(qg.shape[-1]))
    if valid is not None:
        scores.masked_fill_(~valid[..., None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    return torch.matmul(probs, values)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     valid: torch.Tensor) -> torch.Tensor:
    """One query per sequence over its cached keys.

    q: [B, H, D]; k, v: [B, KVH, L, D] (cache rows, any order); valid: [B, L] bool.
    Returns [B, H, D].
    """
    batch, num_heads, head_dim = q.shape
    qg = q.view(batch, k.shape[1], num_heads // k.shape[1], head_dim)  # [B, KVH, G, D]
    return _grouped_attention(qg, k, v, valid).reshape(batch, num_heads, head_dim)


def decode_attention_per_slot(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              slots: tuple[int, ...], lengths: tuple[int, ...]) -> torch.Tensor:
    """One query per sequence over rows ``0 .. length-1`` of its slot, read in place.

    q: [B, H, D]; k_cache, v_cache: [S, KVH, W, D] (the layer's whole pool); slots[b] and
    lengths[b] name sequence b's slot and how many of its rows are valid. Each sequence's
    rows are a strided view, so nothing is copied and no padding row is touched.
    Returns [B, H, D].
    """
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    out = torch.empty_like(q)  # [B, H, D]
    for b, (slot, length) in enumerate(zip(slots, lengths, strict=True)):
        qg = q[b].view(num_kv_heads, num_heads // num_kv_heads, head_dim)  # [KVH, G, D]
        out[b] = _grouped_attention(qg, k_cache[slot, :, :length],  # [KVH, L, D] views
                                    v_cache[slot, :, :length]).view(num_heads, head_dim)
    return out


def run_table(runs: tuple[tuple[tuple[int, int], ...], ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs per sequence as the CPU kernel takes them: ([R, 2] int64 ``[start, stop)`` of
    every run, sequence after sequence; [B + 1] int64 offsets of each sequence's first run)."""
    bounds = torch.tensor([run for seq_runs in runs for run in seq_runs],
                          dtype=torch.long).view(-1, 2)  # [R, 2]
    offsets = torch.zeros(len(runs) + 1, dtype=torch.long)  # [B + 1]
    offsets[1:] = torch.tensor([len(seq_runs) for seq_runs in runs], dtype=torch.long).cumsum(0)
    return bounds, offsets


def _kernel_takes(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor) -> bool:
    """Whether ``ringserve::paged_decode`` handles these tensors: CPU fp32, head dim a
    multiple of 16 up to 256, at most 16 query heads per KV head, rows dense in D."""
    head_dim, num_kv_heads = q.shape[-1], k_rows.shape[0]
    return (not q.is_cuda and q.dtype == k_rows.dtype == v_rows.dtype == torch.float32
            and head_dim % 16 == 0 and head_dim <= 256 and q.shape[1] % num_kv_heads == 0
            and q.shape[1] // num_kv_heads <= 16
            and k_rows.stride(-1) == 1 and v_rows.stride(-1) == 1)


def paged_decode_attention(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor,
                           runs: tuple[tuple[tuple[int, int], ...], ...],
                           max_runs_in_place: int = MAX_RUNS_IN_PLACE,
                           table: tuple[torch.Tensor, torch.Tensor] | None = None,
                           use_kernel: bool = True) -> torch.Tensor:
    """One query per sequence over its window in the paged pool.

    q: [B, H, D]; k_rows, v_rows: [KVH, P, D] (the layer's pool as rows, P = blocks * B);
    runs[b] are sequence b's ``[start, stop)`` row ranges (``model.block_table.ring_segments``);
    ``table`` is :func:`run_table` of them when the caller has it already (once per step).
    On CPU with fp32 tensors this is one call of ``ringserve::paged_decode``
    (model/cpu_kernels.py) when it is available and ``use_kernel``; otherwise
    :func:`sdpa_paged_decode_attention`. Both compute each sequence alone, so its result never
    depends on the rest of the batch (bit for bit). Returns [B, H, D].
    """
    if use_kernel and len(runs) > 0 and _kernel_takes(q, k_rows, v_rows):
        kernel = cpu_kernels.paged_decode()
        if kernel is not None:
            bounds, offsets = table if table is not None else run_table(runs)
            return kernel(q, k_rows, v_rows, bounds, offsets, 1.0 / math.sqrt(q.shape[-1]))
    return sdpa_paged_decode_attention(q, k_rows, v_rows, runs, max_runs_in_place)


def sdpa_paged_decode_attention(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor,
                                runs: tuple[tuple[tuple[int, int], ...], ...],
                                max_runs_in_place: int = MAX_RUNS_IN_PLACE) -> torch.Tensor:
    """:func:`paged_decode_attention` through PyTorch: one SDPA call per sequence.

    q: [B, H, D]; k_rows, v_rows: [KVH, P, D]; runs as there.
    A window of one run is a [KVH, L, D] view of the pool, read in place; one of a few runs
    (at most ``max_runs_in_place``) is joined by one ``cat`` of its views, one scattered over
    more (a crowded pool) by one ``index_select``. Each sequence is then one SDPA call (the
    CPU flash kernel: one op where a matmul/softmax/matmul chain took five; side by side
    0.53-0.84x the chain's time at 128 rows, bench/README.md), computed alone, so its result never
    depends on the rest of the batch (bit for bit). On CPU, while every window is at most
    :data:`ONE_THREAD_MAX_ROWS` rows, the loop runs on one thread (:func:`one_thread`): each
    call is then a few microseconds of work, and a second thread's fork and join cost more
    than it saves. Returns [B, H, D].
    """
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_rows.shape[0]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)  # [B, H, D]
    longest = max((sum(hi - lo for lo, hi in r) for r in runs), default=0)
    with one_thread(not q.is_cuda and longest <= ONE_THREAD_MAX_ROWS):
        for b, seq_runs in enumerate(runs):
            if len(seq_runs) == 1:
                lo, hi = seq_runs[0]
                keys, values = k_rows[:, lo:hi], v_rows[:, lo:hi]  # [KVH, L, D] views
            elif len(seq_runs) <= max_runs_in_place:
                keys = torch.cat([k_rows[:, lo:hi] for lo, hi in seq_runs], 1)  # [KVH, L, D]
                values = torch.cat([v_rows[:, lo:hi] for lo, hi in seq_runs], 1)
            else:
                index = torch.cat([torch.arange(lo, hi) for lo, hi in seq_runs])
                index = index.to(k_rows.device)
                keys, values = k_rows.index_select(1, index), v_rows.index_select(1, index)
            qg = q[b].view(1, num_kv_heads, group, head_dim)  # [1, KVH, G, D]: G query rows
            out[b] = F.scaled_dot_product_attention(qg, keys[None], values[None]).view(
                num_heads, head_dim)
    return out

