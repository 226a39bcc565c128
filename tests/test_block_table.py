"""Paged rolling cache arithmetic, block pool and block manager: pure Python, no torch."""

from __future__ import annotations

import random

import pytest

from model.block_table import (
    BlockManager,
    BlockPool,
    blocks_for,
    blocks_per_table,
    ring_segments,
    rows_of,
)


def test_docstring_example_wraps_the_ring() -> None:
    assert blocks_per_table(6, 1000, 2) == 4
    assert ring_segments([7, 3, 4, 5], 9, 1, 2, 4) == [(15, 16)]
    assert ring_segments([7, 3, 4, 5], 4, 6, 2, 4) == [(8, 12), (14, 16)]


def test_w16_b4_gives_r5_and_position_i_sits_at_ring_row_i_mod_20() -> None:
    window, block, table_len = 16, 4, 5
    assert blocks_per_table(window, 4096, block) == table_len
    table = [11, 2, 30, 7, 19]  # scattered blocks: rows never merge across entries
    for pos in range(200):
        ((row, stop),) = ring_segments(table, pos, 1, block, table_len)
        assert stop == row + 1
        ring_row = pos % (table_len * block)
        assert row == table[ring_row // block] * block + ring_row % block


def test_window_read_after_wrap_holds_exactly_the_window() -> None:
    block, table_len = 4, 5  # W = 16
    table = [0, 1, 2, 3, 4]  # adjacent blocks: the ring is pool rows 0..19
    # a query at 57 sees 42..57; 42 is ring row 2, 57 is ring row 17: one run, 16 rows
    assert ring_segments(table, 42, 16, block, table_len) == [(2, 18)]
    # a query at 63 sees 48..63: ring rows 8..19 then 0..3 (the wrap)
    runs = ring_segments(table, 48, 16, block, table_len)
    assert runs == [(8, 20), (0, 4)]
    # each visible position is in the ring exactly once, none outside the window
    assert sorted(rows_of(runs)) == sorted({p % 20 for p in range(48, 64)})


def test_no_window_never_rolls() -> None:
    assert blocks_per_table(None, 4096, 16) == 256
    assert blocks_per_table(8192, 4096, 16) == 256  # window longer than the context
    assert blocks_per_table(4096, 32768, 16) == 257  # Mistral: 256 whole blocks + 1


def test_a_ten_token_sequence_holds_three_blocks_and_never_more_than_r() -> None:
    assert blocks_for(10, 4, 5) == 3
    manager = BlockManager(BlockPool(64), block_size=4, table_len=5)
    assert manager.grow("s", 10)
    assert manager.num_blocks_of("s") == 3
    for length in range(11, 200):
        assert manager.grow("s", length)
        assert manager.num_blocks_of("s") == min(-(-length // 4), 5)
    assert manager.pool.num_used == 5
    manager.release("s")
    assert manager.pool.num_free == 64


def test_reading_past_the_ring_or_the_table_raises() -> None:
    with pytest.raises(ValueError):
        ring_segments([0, 1, 2, 3, 4], 0, 21, 4, 5)
    with pytest.raises(ValueError):
        ring_segments([0, 1], 8, 1, 4, 5)  # entry 2 not allocated yet


def test_pool_says_no_room_and_takes_nothing() -> None:
    pool = BlockPool(4)
    first = pool.allocate(3)
    assert first is not None and len(set(first)) == 3
    assert pool.allocate(2) is None
    assert pool.num_free == 1
    pool.free(first)
    assert pool.num_free == 4
    with pytest.raises(ValueError):
        pool.free([first[0]])  # twice
    with pytest.raises(ValueError):
        pool.free([9])


def test_manager_grow_is_all_or_nothing() -> None:
    manager = BlockManager(BlockPool(6), block_size=4, table_len=5)
    assert manager.grow("a", 16)  # 4 blocks
    assert not manager.grow("b", 12)  # needs 3, 2 free
    assert manager.num_blocks_of("b") == 0
    assert manager.pool.num_free == 2
    with pytest.raises(ValueError):
        BlockManager(BlockPool(4), block_size=4, table_len=5)  # one full table must fit


def test_placement_keeps_growing_sequences_in_one_run() -> None:
    """Sequences growing in turn (a decoding batch) each stay one run while the pool has room."""
    pool = BlockPool(400)
    manager = BlockManager(pool, block_size=4, table_len=100)
    lengths = dict.fromkeys("abcdefgh", 8)
    for seq in lengths:
        assert manager.grow(seq, lengths[seq])
    for _ in range(80):  # 80 tokens each, interleaved
        for seq in lengths:
            lengths[seq] += 1
            assert manager.grow(seq, lengths[seq])
    for seq in lengths:
        runs = ring_segments(manager.table(seq), 0, lengths[seq], 4, 100)
        assert len(runs) <= 2, (seq, runs)


def test_random_alloc_free_never_double_hands_a_block() -> None:
    rng = random.Random(0)
    pool = BlockPool(50)
    held: list[list[int]] = []
    for _ in range(500):
        if held and rng.random() < 0.4:
            pool.free(held.pop(rng.randrange(len(held))))
        else:
            got = pool.allocate(rng.randint(1, 6),
                                after=held[-1][-1] if held and rng.random() < 0.5 else None)
            if got is not None:
                held.append(got)
        owned = [b for blocks in held for b in blocks]
        assert len(owned) == len(set(owned)) == pool.num_used
