"""Rolling-buffer KV cache: the tensor pool and the plan of which rows a step reads/writes.

Each sequence owns one *slot*. A slot holds, for every layer, K and V buffers of
``buffer_len = min(window, max_model_len)`` positions (``max_model_len`` when there is no
window). Token position i of a sequence lives at row ``i % buffer_len`` of its slot, so a
sequence never holds more than ``buffer_len`` cached positions however long it runs: the
Mistral 7B paper's rolling buffer. The arithmetic and the slot allocator are torch-free, in
:mod:`model.cache_layout`.

The engine no longer uses slots: it runs on the paged rolling cache (:mod:`model.block_table`,
:mod:`model.paged_cache`), whose memory follows each sequence's length. The slot pool stays
as the reference design: the exactness tests run the model on both, and bench/paged_bench.py
times the paged decode kernel against this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.cache_layout import (
    SlotAllocator,
    buffer_len_for,
    is_decode,
    rolling_rows,
    visible_history,
)
from model.config import ModelConfig


@dataclass(frozen=True)
class CacheGeometry:
    """Shape of the KV pool, computable without allocating anything."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    buffer_len: int
    dtype_bytes: int

    @classmethod
    def for_model(cls, config: ModelConfig, max_model_len: int, dtype: torch.dtype
                  ) -> CacheGeometry:
        """Geometry for ``config`` with its (possibly overridden) window and context limit."""
        return cls(
            num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            buffer_len=buffer_len_for(config.sliding_window, max_model_len),
            dtype_bytes=torch.empty((), dtype=dtype).element_size(),
        )

    @property
    def bytes_per_slot(self) -> int:
        """K and V for every layer of one sequence: 2 * layers * KVH * W * D * bytes."""
        return (2 * self.num_layers * self.num_kv_heads * self.buffer_len * self.head_dim
                * self.dtype_bytes)

    def slots_for_budget(self, budget_bytes: int) -> int:
        """How many slots fit in ``budget_bytes``."""
        return budget_bytes // self.bytes_per_slot


class KVCachePool:
    """Per-layer K/V tensors for ``num_slots`` sequences plus their allocator.

    Buffers: ``k[layer]`` and ``v[layer]`` are [num_slots, KVH, W, D] where W = buffer_len.
    Keys are stored after rotary embedding, so row order inside a slot does not matter for
    attention (softmax over a set of keys is order-free); only which positions are present does.
    """

    def __init__(self, geometry: CacheGeometry, num_slots: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.geometry = geometry
        self.dtype = dtype
        self.allocator = SlotAllocator(num_slots)
        shape = (num_slots, geometry.num_kv_heads, geometry.buffer_len, geometry.head_dim)
        # [slots, KVH, W, D] per layer
        self.k = [torch.zeros(shape, dtype=dtype, device=device)
                  for _ in range(geometry.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device)
                  for _ in range(geometry.num_layers)]

    @property
    def buffer_len(self) -> int:
        """Rows per slot per layer (the W of i mod W)."""
        return self.geometry.buffer_len

    @property
    def num_slots(self) -> int:
        """Sequences the pool can hold at once."""
        return self.allocator.num_slots

    @property
    def total_bytes(self) -> int:
        """Bytes held by all K and V buffers."""
        return self.geometry.bytes_per_slot * self.num_slots

    @property
    def used_bytes(self) -> int:
        """Bytes of the slots currently handed out."""
        return self.geometry.bytes_per_slot * (self.num_slots - self.allocator.num_free)


@dataclass(frozen=True)
class SequenceChunk:
    """One sequence's share of a forward pass: tokens start_pos .. start_pos+num_tokens-1."""

    slot: int
    start_pos: int
    num_tokens: int
    # the sequence's prompt length when known: rows below it are prompt tokens (int4's
    # dense prefill path; see model.transformer.prompt_row_mask)
    prompt_len: int | None = None


@dataclass(frozen=True)
class PrefillPlan:
    """Where one prefill chunk reads its history from and writes itself to, in its slot."""

    chunk: SequenceChunk
    token_lo: int  # the chunk's tokens are [token_lo, token_hi) of the flat batch
    token_hi: int
    history_rows: torch.Tensor | None  # [hist] rows of the visible history, oldest first
    write_rows: torch.Tensor  # [keep] rows for the chunk's last keep = min(T, W) tokens


@dataclass(frozen=True)
class DecodePlan:
    """Batched single-token steps: their slots, the row each writes, which rows each reads."""

    token_index: torch.Tensor  # [B] position of each decode token in the flat batch
    slots: torch.Tensor  # [B]
    write_rows: torch.Tensor  # [B] row = pos % W
    valid: torch.Tensor  # [B, L] rows 0..min(pos+1, W)-1 are valid after the write
    slot_ids: tuple[int, ...]  # [B] the same slots as plain ints, for per-sequence loops
    valid_lens: tuple[int, ...]  # [B] min(pos+1, W): how many rows of each slot are valid
    covers_batch: bool  # every token of the batch is a decode (no gather/scatter needed)
    slot_range: tuple[int, int] | None  # (first, last+1) when the slots are consecutive


@dataclass(frozen=True)
class CachePlan:
    """Everything the layers need to read and write the rolling cache, computed once a step."""

    prefills: tuple[PrefillPlan, ...]
    decode: DecodePlan | None


def plan_cache_access(chunks: Sequence[SequenceChunk], buffer_len: int, window: int | None,
                      device: torch.device | str = "cpu") -> CachePlan:
    """Turn a step's chunks into cache rows (all the i mod W arithmetic goes through
    :func:`rolling_rows`). A chunk of one token past position 0 is a decode: it writes
    first, then reads the valid rows. A longer chunk reads its visible history first, then
    writes its last min(T, W) tokens: earlier ones would be overwritten in the same step."""
    prefills: list[PrefillPlan] = []
    decode_index: list[int] = []
    decode_chunks: list[SequenceChunk] = []
    offset = 0
    for chunk in chunks:
        lo, hi = offset, offset + chunk.num_tokens
        offset = hi
        if is_decode(chunk.start_pos, chunk.num_tokens):
            decode_index.append(lo)
            decode_chunks.append(chunk)
            continue
        history = visible_history(chunk.start_pos, window)
        history_rows = (torch.tensor(rolling_rows(chunk.start_pos - history, history,
                                                  buffer_len), device=device)
                        if history else None)
        keep = min(chunk.num_tokens, buffer_len)
        first = chunk.start_pos + chunk.num_tokens - keep
        write_rows = torch.tensor(rolling_rows(first, keep, buffer_len), device=device)
        prefills.append(PrefillPlan(chunk, lo, hi, history_rows, write_rows))
    decode = None
    if decode_chunks:
        valid_len = [min(c.start_pos + 1, buffer_len) for c in decode_chunks]
        length = max(valid_len)
        valid = (torch.arange(length, device=device)[None, :]
                 < torch.tensor(valid_len, device=device)[:, None])  # [B, L]
        slot_ids = [c.slot for c in decode_chunks]
        consecutive = slot_ids == list(range(slot_ids[0], slot_ids[0] + len(slot_ids)))
        decode = DecodePlan(
            token_index=torch.tensor(decode_index, device=device),
            slots=torch.tensor(slot_ids, device=device),
            write_rows=torch.tensor([rolling_rows(c.start_pos, 1, buffer_len)[0]
                                     for c in decode_chunks], device=device),
            valid=valid,
            slot_ids=tuple(slot_ids),
            valid_lens=tuple(valid_len),
            covers_batch=len(decode_chunks) == offset,
            slot_range=(slot_ids[0], slot_ids[-1] + 1) if consecutive else None,
        )
    return CachePlan(tuple(prefills), decode)
