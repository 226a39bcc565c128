"""Scheduler (admission by blocks, preemption) and slot allocator: pure Python, no torch."""

from __future__ import annotations

import pytest

from model.block_table import BlockManager, BlockPool
from model.cache_layout import SlotAllocator, rolling_rows, visible_history
from model.scheduler import Scheduler, SchedulerConfig


def make(blocks: int = 64, seqs: int = 4, budget: int = 16, chunk: int = 8,
         block_size: int = 4, table_len: int = 16) -> Scheduler:
    return Scheduler(SchedulerConfig(seqs, budget, chunk),
                     BlockManager(BlockPool(blocks), block_size, table_len))


def run_step(s: Scheduler) -> list:
    chunks = s.schedule()
    s.on_step_done(chunks)
    return chunks


def test_rolling_rows_worked_example() -> None:
    assert rolling_rows(6, 3, 4) == [2, 3, 0]
    assert rolling_rows(5, 4, 4) == [1, 2, 3, 0]
    assert visible_history(10, 4) == 3
    assert visible_history(2, 4) == 2
    assert visible_history(10, None) == 10


def test_allocator_hands_out_lowest_and_refuses_when_full() -> None:
    alloc = SlotAllocator(2)
    assert alloc.allocate() == 0
    assert alloc.allocate() == 1
    assert alloc.allocate() is None
    alloc.release(0)
    assert alloc.num_free == 1
    assert alloc.allocate() == 0
    with pytest.raises(ValueError):
        alloc.release(5)
    alloc.release(1)
    with pytest.raises(ValueError):
        alloc.release(1)


def test_long_prompt_is_chunked_and_samples_only_at_its_end() -> None:
    s = make(budget=16, chunk=8)
    s.add("a", 20)
    steps = [run_step(s) for _ in range(3)]
    assert [(c.start_pos, c.num_tokens, c.samples) for st in steps for c in st] == [
        (0, 8, False), (8, 8, False), (16, 4, True)]
    # now decoding: one token per step at the next position
    (decode,) = run_step(s)
    assert (decode.start_pos, decode.num_tokens, decode.samples) == (20, 1, True)


def test_decodes_never_stall_behind_a_long_prompt() -> None:
    s = make(budget=10, chunk=100)
    s.add("short", 3)
    run_step(s)  # prefill short
    s.add("long", 1000)
    for _ in range(5):
        chunks = run_step(s)
        by_id = {c.seq_id: c for c in chunks}
        assert by_id["short"].num_tokens == 1  # a decode every step
        assert sum(c.num_tokens for c in chunks) <= 10  # budget respected
        assert by_id["long"].num_tokens == 9


def test_fifo_admission_waits_for_free_blocks_and_abort_frees_them() -> None:
    s = make(blocks=4, seqs=8, budget=64, table_len=2)
    for name in "abc":
        s.add(name, 8)  # two blocks each
    first = run_step(s)
    assert {c.seq_id for c in first} == {"a", "b"}
    assert [w.seq_id for w in s.waiting] == ["c"]
    assert s.waiting_tokens == 8
    assert s.abort("a")
    assert s.free_blocks == 2
    chunks = run_step(s)
    assert {c.seq_id for c in chunks} == {"b", "c"}
    assert s.free_blocks == 0
    assert not s.abort("zzz")


def test_prompt_blocks_are_capped_at_r() -> None:
    s = make(blocks=5, table_len=5, budget=64, chunk=64)
    s.add("long", 60)  # 15 blocks' worth of positions, but the ring holds 5
    (chunk,) = run_step(s)
    assert len(chunk.block_table) == 5 and s.free_blocks == 0


def test_decode_takes_a_block_every_b_tokens_until_r() -> None:
    s = make(blocks=10, table_len=5, block_size=4)
    s.add("a", 3)
    held = []
    for _ in range(30):
        (chunk,) = run_step(s)
        held.append(len(chunk.block_table))
        assert len(chunk.block_table) * 4 > chunk.start_pos or len(chunk.block_table) == 5
    assert held[:8] == [1, 1, 2, 2, 2, 2, 3, 3]  # positions 0-2, 3, 4..7, 8..
    assert max(held) == 5 and s.free_blocks == 5


def test_preemption_frees_the_newest_and_requeues_it_first() -> None:
    s = make(blocks=4, seqs=4, budget=64, block_size=4, table_len=4)
    s.add("old", 4)
    s.add("new", 4)
    s.add("later", 4)
    run_step(s)  # one block each: 3 of 4 taken
    assert list(s.running) == ["old", "new", "later"]
    # every decode needs a second block at position 4: old gets the last free one, new
    # preempts later (the newest), then new itself fits
    chunks = run_step(s)
    assert [c.seq_id for c in chunks] == ["old", "new"]
    assert [w.seq_id for w in s.waiting] == ["later"]
    assert s.preemptions_total == 1
    later = s.waiting[0]
    assert later.num_computed == 0 and later.num_tokens == 5  # its sampled token is kept
    s.finish("old")
    chunks = run_step(s)  # later comes back first and recomputes its 5 known tokens
    assert [(c.seq_id, c.start_pos, c.num_tokens, c.samples) for c in chunks] == [
        ("new", 5, 1, True), ("later", 0, 5, True)]
    s.finish("new")
    s.finish("later")
    assert s.free_blocks == 4


def test_a_sequence_preempts_itself_when_it_is_the_newest() -> None:
    s = make(blocks=3, seqs=2, budget=64, block_size=4, table_len=2)
    s.add("a", 8)  # two blocks: a full table, it rolls from now on
    s.add("b", 4)  # the last block
    run_step(s)
    chunks = run_step(s)  # b's position 4 needs a block: b is the newest, so b goes
    assert [c.seq_id for c in chunks] == ["a"]
    assert [w.seq_id for w in s.waiting] == ["b"]
    assert s.free_blocks == 1 and s.preemptions_total == 1


def test_max_num_seqs_caps_running() -> None:
    s = make(blocks=64, seqs=2, budget=64)
    for i in range(5):
        s.add(str(i), 2)
    run_step(s)
    assert len(s.running) == 2 and len(s.waiting) == 3


def test_finish_releases_blocks_and_has_work_turns_false() -> None:
    s = make(blocks=1, table_len=1)
    s.add("x", 2)
    run_step(s)
    assert s.has_work
    s.finish("x")
    assert not s.has_work and s.free_blocks == 1


def test_config_rejects_budget_below_sequence_cap() -> None:
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4, prefill_chunk=4)
