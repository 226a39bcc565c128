"""Scheduler and slot allocator: pure Python, no torch, no model."""

from __future__ import annotations

import pytest

from model.cache_layout import SlotAllocator, rolling_rows, visible_history
from model.scheduler import Scheduler, SchedulerConfig


def make(slots: int = 4, seqs: int = 4, budget: int = 16, chunk: int = 8) -> Scheduler:
    return Scheduler(SchedulerConfig(seqs, budget, chunk), SlotAllocator(slots))


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


def test_fifo_admission_waits_for_free_slot_and_abort_frees_it() -> None:
    s = make(slots=2, seqs=8, budget=64)
    for name in "abc":
        s.add(name, 4)
    first = run_step(s)
    assert {c.seq_id for c in first} == {"a", "b"}
    assert [w.seq_id for w in s.waiting] == ["c"]
    assert s.waiting_tokens == 4
    assert s.abort("a")
    chunks = run_step(s)
    assert {c.seq_id for c in chunks} == {"b", "c"}
    assert s.allocator.num_free == 0
    assert not s.abort("zzz")


def test_max_num_seqs_caps_running() -> None:
    s = make(slots=8, seqs=2, budget=64)
    for i in range(5):
        s.add(str(i), 2)
    run_step(s)
    assert len(s.running) == 2 and len(s.waiting) == 3


def test_finish_releases_slot_and_has_work_turns_false() -> None:
    s = make(slots=1)
    s.add("x", 2)
    run_step(s)
    assert s.has_work
    s.finish("x")
    assert not s.has_work and s.allocator.num_free == 1


def test_config_rejects_budget_below_sequence_cap() -> None:
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4, prefill_chunk=4)
