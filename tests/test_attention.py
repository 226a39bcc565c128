"""Attention backends against a naive masked softmax, and the rolling buffer's bound."""

from __future__ import annotations

import math

import pytest
import torch

from model.attention import (
    band_mask,
    decode_attention,
    decode_attention_per_slot,
    prefill_attention,
)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int,
                    window: int | None) -> torch.Tensor:
    """q [Tq, H, D], k/v [Tk, KVH, D] ending at the last query; explicit mask, fp64."""
    num_q, num_heads, dim = q.shape
    num_k, num_kv = k.shape[0], k.shape[1]
    group = num_heads // num_kv
    k_full = k.repeat_interleave(group, dim=1).double()  # [Tk, H, D]
    v_full = v.repeat_interleave(group, dim=1).double()
    scores = torch.einsum("qhd,khd->hqk", q.double(), k_full) / math.sqrt(dim)
    q_pos = torch.arange(q_start, q_start + num_q)
    k_pos = torch.arange(q_start + num_q - num_k, q_start + num_q)
    diff = q_pos[:, None] - k_pos[None, :]
    allowed = diff >= 0
    if window is not None:
        allowed &= diff < window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v_full).float()


@pytest.mark.parametrize(("num_q", "history", "window", "block"), [
    (100, 0, 16, 7), (100, 0, None, 32), (33, 15, 16, 8), (64, 31, 32, 256),
    (5, 0, 3, 2), (40, 10, None, 16), (257, 0, 64, 64), (1, 15, 16, 4),
])
def test_prefill_attention_matches_explicit_mask(num_q: int, history: int, window: int | None,
                                                 block: int) -> None:
    gen = torch.Generator().manual_seed(num_q * 31 + history)
    q = torch.randn(num_q, 8, 16, generator=gen)
    k = torch.randn(num_q + history, 2, 16, generator=gen)
    v = torch.randn(num_q + history, 2, 16, generator=gen)
    q_start = history + 5  # keys start at position 5: positions, not indices, decide the mask
    ours = prefill_attention(q, k, v, q_start, window, query_block=block)
    ref = naive_attention(q, k, v, q_start, window)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_decode_attention_ignores_invalid_rows_and_key_order() -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 16, generator=gen)
    k = torch.randn(3, 2, 10, 16, generator=gen)
    v = torch.randn(3, 2, 10, 16, generator=gen)
    lengths = torch.tensor([10, 4, 1])
    valid = torch.arange(10)[None, :] < lengths[:, None]
    ours = decode_attention(q, k, v, valid)
    for b, n in enumerate(lengths.tolist()):
        kk = k[b, :, :n].transpose(0, 1)  # [n, KVH, D]
        vv = v[b, :, :n].transpose(0, 1)
        ref = naive_attention(q[b:b + 1], kk, vv, n - 1, None)[0]
        torch.testing.assert_close(ours[b], ref, atol=1e-5, rtol=1e-4)
    # garbage in invalid rows changes nothing; permuting valid rows changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 4:] = 1e4
    perm = torch.tensor([3, 1, 0, 2] + list(range(4, 10)))
    k2[1] = k2[1][:, perm]
    v2[1] = v2[1][:, perm]
    torch.testing.assert_close(decode_attention(q, k2, v2, valid), ours, atol=1e-5, rtol=1e-4)


def test_band_mask_is_causal_and_windowed() -> None:
    mask = band_mask(torch.arange(5, 8), torch.arange(0, 8), window=3)
    assert mask.tolist() == [
        [False, False, False, True, True, True, False, False],
        [False, False, False, False, True, True, True, False],
        [False, False, False, False, False, True, True, True],
    ]


def test_decode_attention_per_slot_reads_only_each_slots_valid_rows() -> None:
    gen = torch.Generator().manual_seed(1)
    k_cache = torch.randn(6, 2, 12, 16, generator=gen)  # [S, KVH, W, D]
    v_cache = torch.randn(6, 2, 12, 16, generator=gen)
    q = torch.randn(3, 8, 16, generator=gen)
    slots, lengths = (4, 0, 2), (12, 5, 1)
    ours = decode_attention_per_slot(q, k_cache, v_cache, slots, lengths)
    index = torch.tensor(slots)
    valid = torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]
    padded = decode_attention(q, k_cache[index], v_cache[index], valid)
    torch.testing.assert_close(ours, padded, atol=1e-5, rtol=1e-4)
    # rows past a slot's length and other slots do not matter
    k_cache[0, :, 5:] = 1e4
    k_cache[1] = 1e4
    torch.testing.assert_close(decode_attention_per_slot(q, k_cache, v_cache, slots, lengths),
                               ours)
