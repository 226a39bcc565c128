"""Decode attention on CPU: reading each slot's valid rows in place vs a padded, gathered batch.

Both compute one query per sequence against its rolling-buffer slot, for the default model's
shape (9 query heads, 3 KV heads, head dim 64) in a pool of 32 slots of W = 1024 rows, with
the sequences in scattered slots and valid lengths drawn from a seeded RNG. ``padded`` is
:func:`model.attention.decode_attention` over ``k_cache[slots, :, :max_len]`` (what a batched
kernel needs: a copy, padded to the longest sequence); ``per slot`` is
:func:`model.attention.decode_attention_per_slot`. Timed side by side in one run; prints the
per-layer time and the ratio; asserts nothing.

    python -m bench.decode_attention_bench [--batch 1,4,16,32] [--max-len 700] [--rounds 30]
"""

from __future__ import annotations

import argparse
import random

import torch

from bench.timing import best_ms
from model.attention import decode_attention, decode_attention_per_slot

SLOTS, KV_HEADS, GROUP, ROWS, HEAD_DIM = 32, 3, 3, 1024, 64


def _measure(batch: int, k_cache: torch.Tensor, v_cache: torch.Tensor, rng: random.Random,
             max_len: int, rounds: int) -> tuple[float, float]:
    """(padded ms, per-slot ms) for ``batch`` sequences in scattered slots."""
    slots = tuple(sorted(rng.sample(range(SLOTS), batch)))
    lengths = tuple(rng.randint(16, max_len) for _ in range(batch))
    q = torch.randn(batch, KV_HEADS * GROUP, HEAD_DIM)  # [B, H, D]
    index = torch.tensor(slots)
    longest = max(lengths)
    valid = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]  # [B, L]

    def padded() -> torch.Tensor:
        return decode_attention(q, k_cache[index, :, :longest], v_cache[index, :, :longest],
                                valid)

    def per_slot() -> torch.Tensor:
        return decode_attention_per_slot(q, k_cache, v_cache, slots, lengths)

    torch.testing.assert_close(per_slot(), padded(), atol=1e-5, rtol=1e-4)
    return best_ms(padded, rounds, warmups=3), best_ms(per_slot, rounds, warmups=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="1,4,16,32")
    parser.add_argument("--max-len", type=int, default=700)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    k_cache = torch.randn(SLOTS, KV_HEADS, ROWS, HEAD_DIM)  # [S, KVH, W, D]
    v_cache = torch.randn(SLOTS, KV_HEADS, ROWS, HEAD_DIM)
    print(f"decode attention per layer, fp32 CPU, {torch.get_num_threads()} threads, "
          f"lengths uniform in 16..{args.max_len}, best of {args.rounds}")
    print(f"{'batch':>5} {'padded ms':>10} {'per slot ms':>12} {'speed-up':>9}")
    for batch in (int(b) for b in args.batch.split(",")):
        padded_ms, per_slot_ms = _measure(batch, k_cache, v_cache, rng, args.max_len,
                                          args.rounds)
        print(f"{batch:>5} {padded_ms:>10.3f} {per_slot_ms:>12.3f} "
              f"{padded_ms / per_slot_ms:>8.2f}x")


if __name__ == "__main__":
    main()
