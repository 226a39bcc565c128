"""Paged rolling KV cache, the tensor half: the block pool's K/V tensors and each step's plan.

Per layer, K and V are ``[KVH, num_blocks, B, D]``, viewed by the kernels as
``[KVH, num_blocks * B, D]`` pool rows: the rows of adjacent blocks are adjacent, so a run of
positions from :func:`model.block_table.ring_segments` is one slice ``[KVH, L, D]`` whose
rows are contiguous per head, exactly what a slot of the old design gave the CPU decode
kernel. (With ``[num_blocks, B, KVH, D]``, flash-attn's layout, the same slice strides by
KVH*D per row and the CPU decode matmuls ran ~6x slower: bench/paged_bench.py.) Keys are
stored after rotary embedding, so the order of rows does not matter to attention, only which
positions are present.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from model.attention import (
    decode_attention,
    paged_decode_attention,
    prefill_attention,
    run_table,
)
from model.block_table import (
    BlockPool,
    blocks_per_table,
    ring_segments,
    rows_of,
    visible_history,
)
from model.config import ModelConfig

# Positions per block on CPU: bench/paged_bench.py --block-sizes measures decode step time
# (fewer, longer runs per sequence) against memory held (a partly filled last block).
DEFAULT_CPU_BLOCK_SIZE = 16
# flash-attn's paged KV wants a block size that is a multiple of 16 (256 for some kernels)
DEFAULT_CUDA_BLOCK_SIZE = 16


@dataclass(frozen=True)
class PagedChunk:
    """One sequence's share of a forward pass: tokens start_pos .. start_pos+num_tokens-1,
    cached through ``block_table`` (which already covers them)."""

    block_table: tuple[int, ...]
    start_pos: int
    num_tokens: int
    # the sequence's prompt length when known: rows below it are prompt tokens (int4's
    # dense prefill path; see model.transformer.prompt_row_mask)
    prompt_len: int | None = None


@dataclass(frozen=True)
class PagedGeometry:
    """Shape of the paged pool, computable without allocating anything."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    table_len: int  # R: the most blocks one sequence holds
    dtype_bytes: int

    @classmethod
    def for_model(cls, config: ModelConfig, max_model_len: int, dtype: torch.dtype,
                  block_size: int) -> PagedGeometry:
        """Geometry for ``config`` with its (possibly overridden) window and context limit."""
        return cls(
            num_layers=config.num_layers, num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim, block_size=block_size,
            table_len=blocks_per_table(config.sliding_window, max_model_len, block_size),
            dtype_bytes=torch.empty((), dtype=dtype).element_size())

    @property
    def bytes_per_block(self) -> int:
        """K and V of one block in every layer: 2 * layers * B * KVH * D * bytes."""
        return (2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim
                * self.dtype_bytes)

    def blocks_for_budget(self, budget_bytes: int) -> int:
        """How many blocks fit in ``budget_bytes``."""
        return budget_bytes // self.bytes_per_block


class PagedKVCache:
    """Per-layer K/V block tensors plus the :class:`BlockPool` that hands the blocks out."""

    def __init__(self, geometry: PagedGeometry, num_blocks: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.geometry = geometry
        self.dtype = dtype
        self.pool = BlockPool(num_blocks)
        shape = (geometry.num_kv_heads, num_blocks, geometry.block_size, geometry.head_dim)
        # [KVH, num_blocks, B, D] per layer
        self.k = [torch.zeros(shape, dtype=dtype, device=device)
                  for _ in range(geometry.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device)
                  for _ in range(geometry.num_layers)]

    @property
    def block_size(self) -> int:
        """Positions per block (B)."""
        return self.geometry.block_size

    @property
    def table_len(self) -> int:
        """R: blocks per full table; the ring is R*B rows."""
        return self.geometry.table_len

    @property
    def num_blocks(self) -> int:
        """Blocks in the pool."""
        return self.pool.num_blocks

    @property
    def total_bytes(self) -> int:
        """Bytes held by all K and V tensors."""
        return self.geometry.bytes_per_block * self.num_blocks

    @property
    def used_bytes(self) -> int:
        """Bytes of the blocks currently handed out."""
        return self.geometry.bytes_per_block * self.pool.num_used

    def rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s K and V as pool rows: [KVH, num_blocks * B, D] views."""
        k, v = self.k[layer], self.v[layer]
        return k.flatten(1, 2), v.flatten(1, 2)


@dataclass(frozen=True)
class PagedPrefill:
    """Where one prefill chunk reads its visible history and writes itself, in pool rows."""

    start_pos: int
    token_lo: int  # the chunk's tokens are [token_lo, token_hi) of the flat batch
    token_hi: int
    history: tuple[tuple[int, int], ...]  # runs of the visible history, oldest first
    write_rows: torch.Tensor  # [keep] rows for the chunk's last keep = min(T, R*B) tokens


@dataclass(frozen=True)
class PagedDecode:
    """Batched single-token steps: the row each writes and the runs each then reads."""

    token_index: torch.Tensor  # [Bd] position of each decode token in the flat batch
    write_rows: torch.Tensor  # [Bd] pool row of each new token
    runs: tuple[tuple[tuple[int, int], ...], ...]  # [Bd] pool-row runs of each visible window
    covers_batch: bool  # every token of the batch is a decode

    @cached_property
    def run_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``runs`` as the CPU kernel takes them (built once a step, shared by the layers)."""
        return run_table(self.runs)

    def gather_index(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """([Bd, L] pool rows, [Bd, L] valid) padded to the longest window, for kernels
        that want one padded batch (CUDA SDPA) rather than slices."""
        rows = [rows_of(r) for r in self.runs]
        length = max(len(r) for r in rows)
        index = torch.zeros(len(rows), length, dtype=torch.long)
        valid = torch.zeros(len(rows), length, dtype=torch.bool)
        for b, r in enumerate(rows):
            index[b, :len(r)] = torch.tensor(r)
            valid[b, :len(r)] = True
        return index.to(device), valid.to(device)


@dataclass(frozen=True)
class PagedPlan:
    """Everything the layers need to read and write the paged cache, computed once a step."""

    prefills: tuple[PagedPrefill, ...]
    decode: PagedDecode | None


def plan_paged_access(chunks: Sequence[PagedChunk], block_size: int, table_len: int,
                      window: int | None, device: torch.device | str = "cpu") -> PagedPlan:
    """Turn a step's chunks into pool rows (all the arithmetic goes through
    :func:`~model.block_table.ring_segments`). A chunk of one token past position 0 is a
    decode: it writes first, then reads its window. A longer chunk reads its visible history
    first, then writes its last min(T, R*B) tokens: earlier ones would be overwritten in the
    same step."""
    ring = table_len * block_size
    prefills: list[PagedPrefill] = []
    decode_index: list[int] = []
    decode_rows: list[int] = []
    decode_runs: list[tuple[tuple[int, int], ...]] = []
    offset = 0
    for chunk in chunks:
        lo, hi = offset, offset + chunk.num_tokens
        offset = hi
        table, start = chunk.block_table, chunk.start_pos
        if chunk.num_tokens == 1 and start > 0:
            seen = visible_history(start, window) + 1  # itself included
            decode_index.append(lo)
            decode_rows.append(ring_segments(table, start, 1, block_size, table_len)[0][0])
            decode_runs.append(tuple(ring_segments(table, start + 1 - seen, seen, block_size,
                                                   table_len)))
            continue
        history = visible_history(start, window)
        keep = min(chunk.num_tokens, ring)
        first = start + chunk.num_tokens - keep
        prefills.append(PagedPrefill(
            start_pos=start, token_lo=lo, token_hi=hi,
            history=tuple(ring_segments(table, start - history, history, block_size,
                                        table_len)),
            write_rows=torch.tensor(rows_of(ring_segments(table, first, keep, block_size,
                                                          table_len)), device=device)))
    decode = None
    if decode_index:
        decode = PagedDecode(
            token_index=torch.tensor(decode_index, device=device),
            write_rows=torch.tensor(decode_rows, device=device),
            runs=tuple(decode_runs), covers_batch=len(decode_index) == offset)
    return PagedPlan(tuple(prefills), decode)


def paged_layer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PagedPlan,
                          cache: PagedKVCache, layer: int, window: int | None) -> torch.Tensor:
    """One layer's attention for a step through the paged cache; caches the step's K/V.

    q: [N, H, D]; k, v: [N, KVH, D] for all chunks' tokens in chunk order. Returns [N, H, D].
    """
    k_rows, v_rows = cache.rows(layer)  # [KVH, num_blocks * B, D] views
    decode = plan.decode
    if decode is not None and decode.covers_batch:
        return _decode(q, k, v, decode, k_rows, v_rows)
    out = torch.empty_like(q)  # [N, H, D]
    for prefill in plan.prefills:
        lo, hi = prefill.token_lo, prefill.token_hi
        kc, vc = k[lo:hi], v[lo:hi]  # [T, KVH, D]
        if prefill.history:  # [hist + T, KVH, D]: the visible history through the table
            keys = torch.cat([k_rows[:, a:b] for a, b in prefill.history], 1).transpose(0, 1)
            values = torch.cat([v_rows[:, a:b] for a, b in prefill.history], 1).transpose(0, 1)
            keys, values = torch.cat((keys, kc)), torch.cat((values, vc))
        else:
            keys, values = kc, vc
        out[lo:hi] = prefill_attention(q[lo:hi], keys, values, prefill.start_pos, window)
        keep = prefill.write_rows.numel()
        k_rows[:, prefill.write_rows] = kc[-keep:].transpose(0, 1)  # [KVH, keep, D]
        v_rows[:, prefill.write_rows] = vc[-keep:].transpose(0, 1)
    if decode is not None:
        index = decode.token_index
        out[index] = _decode(q[index], k[index], v[index], decode, k_rows, v_rows)
    return out


def _decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PagedDecode,
            k_rows: torch.Tensor, v_rows: torch.Tensor) -> torch.Tensor:
    """Write each new token's K/V, then attend to each sequence's window."""
    k_rows[:, plan.write_rows] = k.transpose(0, 1)  # k: [Bd, KVH, D] -> [KVH, Bd, D]
    v_rows[:, plan.write_rows] = v.transpose(0, 1)
    if not k_rows.is_cuda:  # CPU: each sequence's runs read in place, no gather
        return paged_decode_attention(q, k_rows, v_rows, plan.runs, table=plan.run_table)
    return gathered_decode(q, k_rows, v_rows, plan)  # pragma: no cover - CUDA only


def gathered_decode(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor,
                    plan: PagedDecode) -> torch.Tensor:
    """Decode over each sequence's window gathered into one padded batch (the CUDA path:
    one batched kernel beats a loop of small ones there). Returns [Bd, H, D]."""
    index, valid = plan.gather_index(k_rows.device)  # [Bd, L]
    k_seq = k_rows[:, index].transpose(0, 1)  # [KVH, Bd, L, D] -> [Bd, KVH, L, D]
    v_seq = v_rows[:, index].transpose(0, 1)
    return decode_attention(q, k_seq, v_seq, valid)
