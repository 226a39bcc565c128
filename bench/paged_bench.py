"""Paged rolling cache vs the slot design: KV bytes held, and decode attention step time.

1. Memory: a mixed workload (sequence lengths log-uniform in 64..4096, seeded) on the
   embedded model's shape (30 layers, 3 KV heads, head dim 64, fp32, no window, context
   4096) in the default 2 GiB pool. A slot holds min(W, max_model_len) rows whatever the
   length; a paged sequence holds min(ceil(len / B), R) blocks. Prints how many sequences
   each design holds at once (the ratio), and the pool utilisation (positions cached over
   rows held: what the partly filled last blocks waste). Also the chat-length case (<= 1K).
2. Decode step: batch 16 (lengths uniform in 64..1024), the attention part of one decode
   step over 30 layers (plan + write the new K/V + attend), today's slot kernel
   (``decode_attention_per_slot``) against the paged kernel (``paged_decode_attention``)
   on the same sequences, with blocks placed by the real allocator after the sequences grew
   interleaved (as a decoding batch does). Timed side by side in this run, per block size;
   the block size whose step is fastest with utilisation kept high is the CPU default.
   The ``[num_blocks, B, KVH, D]`` layout (flash-attn's) is timed too.

    python -m bench.paged_bench [--block-sizes 4,8,16,32,64] [--rounds 10] [--threads 1]

Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import random

import torch

from bench.timing import best_ms
from model.attention import decode_attention_per_slot, paged_decode_attention
from model.block_table import BlockManager, BlockPool, blocks_per_table, ring_segments
from model.kv_cache import SequenceChunk, plan_cache_access
from model.paged_cache import PagedChunk, plan_paged_access

LAYERS, KV_HEADS, GROUP, HEAD_DIM, DTYPE_BYTES = 30, 3, 3, 64, 4
MAX_MODEL_LEN = 4096
POOL_BYTES = 2 * 1024**3
BYTES_PER_POSITION = 2 * LAYERS * KV_HEADS * HEAD_DIM * DTYPE_BYTES


def _lengths(rng: random.Random, count: int, low: int, high: int) -> list[int]:
    return [int(math.exp(rng.uniform(math.log(low), math.log(high)))) for _ in range(count)]


def memory(block_size: int, rng_seed: int, high: int) -> tuple[int, int, float]:
    """(sequences the slot pool holds, sequences the paged pool holds, paged utilisation)."""
    slots = POOL_BYTES // (BYTES_PER_POSITION * MAX_MODEL_LEN)
    num_blocks = POOL_BYTES // (BYTES_PER_POSITION * block_size)
    table_len = blocks_per_table(None, MAX_MODEL_LEN, block_size)
    manager = BlockManager(BlockPool(num_blocks), block_size, table_len)
    rng = random.Random(rng_seed)
    held = cached = 0
    for i, length in enumerate(_lengths(rng, 100_000, 64, high)):
        if not manager.grow(str(i), length):
            break
        held, cached = held + 1, cached + length
    utilisation = cached / (manager.pool.num_used * block_size)
    return slots, held, utilisation


def _paged_batch(lengths: list[int], block_size: int) -> tuple[BlockManager, int]:
    """A pool holding 32 sequences' worth of blocks; the batch admitted with 8-token prompts,
    then grown one token at a time, interleaved, to its lengths (where fragmentation comes
    from), next to as many sequences again that came and went."""
    table_len = blocks_per_table(None, MAX_MODEL_LEN, block_size)
    num_blocks = 32 * math.ceil(1024 / block_size)
    manager = BlockManager(BlockPool(num_blocks), block_size, table_len)
    current = dict.fromkeys(range(len(lengths)), 8)
    for seq in current:
        manager.grow(str(seq), 8)
        manager.grow(f"gone{seq}", 8)
    for step in range(max(lengths)):
        for seq, length in enumerate(lengths):
            if current[seq] < length:
                current[seq] += 1
                assert manager.grow(str(seq), current[seq])
        if step % 64 == 0:  # the others finish now and then and their blocks are reused
            for seq in range(len(lengths)):
                manager.release(f"gone{seq}")
                manager.grow(f"gone{seq}", 8 + step % 200)
    return manager, num_blocks


def decode_step(block_size: int, rounds: int, seed: int) -> dict[str, float]:
    """ms of the attention part of one batch-16 decode step, slot vs paged."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    lengths = [rng.randint(64, 1024) for _ in range(16)]
    q = torch.randn(16, KV_HEADS * GROUP, HEAD_DIM)  # [B, H, D]
    new_k = torch.randn(16, KV_HEADS, HEAD_DIM)  # [B, KVH, D]
    # slot design: 32 slots of 1024 rows (a window-1024 model), sequences in scattered slots
    slot_ids = sorted(rng.sample(range(32), 16))
    slot_k = torch.randn(32, KV_HEADS, 1024, HEAD_DIM)  # [S, KVH, W, D]
    slot_v = torch.randn(32, KV_HEADS, 1024, HEAD_DIM)
    slot_chunks = [SequenceChunk(s, n - 1, 1) for s, n in zip(slot_ids, lengths, strict=True)]

    def slot_step() -> None:
        plan = plan_cache_access(slot_chunks, 1024, 1024).decode
        assert plan is not None
        for _ in range(LAYERS):
            slot_k[plan.slots, :, plan.write_rows] = new_k
            slot_v[plan.slots, :, plan.write_rows] = new_k
            decode_attention_per_slot(q, slot_k, slot_v, plan.slot_ids, plan.valid_lens)

    manager, num_blocks = _paged_batch(lengths, block_size)
    table_len = manager.table_len
    k_rows = torch.randn(KV_HEADS, num_blocks * block_size, HEAD_DIM)  # [KVH, P, D]
    v_rows = torch.randn(KV_HEADS, num_blocks * block_size, HEAD_DIM)
    chunks = [PagedChunk(manager.table(str(i)), n - 1, 1) for i, n in enumerate(lengths)]

    def paged_step() -> None:
        plan = plan_paged_access(chunks, block_size, table_len, 1024).decode
        assert plan is not None
        for _ in range(LAYERS):
            k_rows[:, plan.write_rows] = new_k.transpose(0, 1)
            v_rows[:, plan.write_rows] = new_k.transpose(0, 1)
            paged_decode_attention(q, k_rows, v_rows, plan.runs)

    # flash-attn's layout [num_blocks, B, KVH, D] (as rows [P, KVH, D]): one run per sequence
    flat_k = torch.randn(num_blocks * block_size, KV_HEADS, HEAD_DIM)
    flat_v = torch.randn(num_blocks * block_size, KV_HEADS, HEAD_DIM)
    spans, start = [], 0
    for n in lengths:
        spans.append((start, start + n))
        start += n

    def block_major_step() -> None:
        for _ in range(LAYERS):
            for b, (lo, hi) in enumerate(spans):
                qg = q[b].view(KV_HEADS, GROUP, HEAD_DIM)
                keys, values = flat_k[lo:hi].transpose(0, 1), flat_v[lo:hi].transpose(0, 1)
                probs = torch.softmax(qg @ keys.transpose(-1, -2) / 8.0, dim=-1)
                probs @ values

    runs = [len(ring_segments(c.block_table, 0, c.start_pos + 1, block_size, table_len))
            for c in chunks]
    return {
        "slot": best_ms(slot_step, rounds, warmups=2),
        "paged": best_ms(paged_step, rounds, warmups=2),
        "block_major": best_ms(block_major_step, max(2, rounds // 3), warmups=1),
        "mean_runs": sum(runs) / len(runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block-sizes", default="4,8,16,32,64")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 steadies the small matmuls on a busy box)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(b) for b in args.block_sizes.split(",")]
    print(f"KV held in a {POOL_BYTES / 1024**3:.0f} GiB pool, embedded model shape "
          f"({BYTES_PER_POSITION // 1024} KiB per position), context {MAX_MODEL_LEN}")
    print(f"{'B':>4} {'workload':>14} {'slot seqs':>10} {'paged seqs':>11} {'ratio':>7} "
          f"{'utilisation':>12}")
    for block in sizes:
        for name, high in (("mixed 64..4K", 4096), ("chat 64..1K", 1024)):
            slots, paged, used = memory(block, args.seed, high)
            print(f"{block:>4} {name:>14} {slots:>10} {paged:>11} {paged / slots:>6.1f}x "
                  f"{used:>11.1%}")
    print(f"\ndecode step attention, batch 16, lengths 64..1024, {LAYERS} layers, fp32 CPU, "
          f"{torch.get_num_threads()} threads, best of {args.rounds}")
    print(f"{'B':>4} {'slot ms':>8} {'paged ms':>9} {'paged/slot':>11} {'runs/seq':>9} "
          f"{'[NB,B,KVH,D] ms':>16}")
    for block in sizes:
        r = decode_step(block, args.rounds, args.seed)
        print(f"{block:>4} {r['slot']:>8.2f} {r['paged']:>9.2f} {r['paged'] / r['slot']:>10.2f}x "
              f"{r['mean_runs']:>9.1f} {r['block_major']:>16.2f}")


if __name__ == "__main__":
    main()
