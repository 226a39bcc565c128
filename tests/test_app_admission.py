"""Admission control and micro-batching, pure Python (no Ray, no model)."""

from __future__ import annotations

import asyncio

import pytest

from app.admission import (
    Accepted,
    AdmissionLimits,
    LoadBoard,
    NoReplica,
    Shed,
)
from app.batcher import MicroBatcher
from app.load import ReplicaLoad
from tests.conftest import replica_load


def snap(rid: str, *, waiting: int = 0, tokens: int = 0, running: int = 0, slots: int = 4,
         rate: float = 200.0, prefill_rate: float = 0.0, healthy: bool = True
         ) -> ReplicaLoad:
    """A replica report; prefill_rate 0 means not measured yet (the drain rate stands in)."""
    return replica_load(rid, waiting_sequences=waiting, waiting_tokens=tokens,
                        running_sequences=running, free_slots=slots - running,
                        total_slots=slots, tokens_per_s=rate, prefill_tokens_per_s=prefill_rate,
                        healthy=healthy)


def board(*snaps: ReplicaLoad, **limits: object) -> LoadBoard:
    b = LoadBoard(AdmissionLimits(**limits))  # type: ignore[arg-type]
    b.set_replicas(s.replica_id for s in snaps)
    for s in snaps:
        b.report(s, polled_at=0.0)
    return b


def test_docstring_example_predicts_wait() -> None:
    b = board(snap("a", waiting=2, tokens=60, running=4, slots=4, rate=200.0,
                   prefill_rate=600.0))
    b.finished("x", [100])  # measured sequence length 100 tokens
    wait = b.predicted_wait(b.estimate("a"))
    assert wait == pytest.approx(60 / 600.0 + 3 * 100 / 200.0)
    # before a prefill rate is measured the (slower) drain rate stands in for it
    unmeasured = board(snap("a", waiting=2, tokens=60, running=4, slots=4, rate=200.0))
    unmeasured.finished("x", [100])
    assert unmeasured.predicted_wait(unmeasured.estimate("a")) == pytest.approx(
        (60 + 3 * 100) / 200.0)


def test_burst_into_free_slots_is_admitted_at_the_prefill_rate() -> None:
    # 16 free slots, decode-bound drain rate 30 tokens/s, prefill 1000 prompt tokens/s: a
    # burst of 16 requests of 140 prompt tokens each fits; at the drain rate alone the last
    # ones would have been predicted to wait over a minute and been shed.
    b = board(snap("a", slots=16, rate=30.0, prefill_rate=1000.0), max_queue_wait_s=10.0)
    waits = []
    for i in range(16):
        d = b.admit(f"r{i}", prompt_tokens=140)
        assert isinstance(d, Accepted), d
        waits.append(d.predicted_wait_s)
    assert waits[-1] == pytest.approx(15 * 140 / 1000.0)
    # the 17th finds no slot: it also waits for a sequence of ~400 tokens to finish at the
    # drain rate, 2.4 s + 13.3 s > 10 s -> shed
    b.finished("old", [400])
    shed = b.admit("r16", prompt_tokens=140)
    assert isinstance(shed, Shed) and shed.predicted_wait_s == pytest.approx(
        16 * 140 / 1000.0 + 400 / 30.0)


def test_idle_replica_wins_over_busy_one() -> None:
    b = board(snap("a", running=4, waiting=3, tokens=30), snap("b"))
    decision = b.admit("r1", prompt_tokens=10)
    assert isinstance(decision, Accepted) and decision.replica_id == "b"
    assert decision.predicted_wait_s == 0.0


def test_burst_spreads_over_replicas_before_any_new_report() -> None:
    b = board(snap("a"), snap("b"))
    chosen = []
    for i in range(8):
        d = b.admit(f"r{i}", prompt_tokens=10)
        assert isinstance(d, Accepted)
        chosen.append(d.replica_id)
    assert chosen.count("a") == 4 and chosen.count("b") == 4


def test_queue_full_sheds_with_retry_after_from_drain_rate() -> None:
    b = board(snap("a", running=4, waiting=4, slots=4, rate=100.0), max_waiting=4)
    b.finished("old", [250])
    d = b.admit("r", prompt_tokens=10)
    assert isinstance(d, Shed) and d.reason == "queue_full"
    # one sequence too many; a slot frees after ~250 tokens at 100 tokens/s -> 3 s
    assert d.retry_after_s == 3
    faster = board(snap("a", running=4, waiting=4, slots=4, rate=1000.0), max_waiting=4)
    faster.finished("old", [250])
    d2 = faster.admit("r", prompt_tokens=10)
    assert isinstance(d2, Shed) and d2.retry_after_s == 1


def test_predicted_wait_over_limit_sheds() -> None:
    b = board(snap("a", running=4, waiting=1, tokens=2000, rate=100.0), max_queue_wait_s=5.0)
    d = b.admit("r", prompt_tokens=10)
    assert isinstance(d, Shed) and d.reason == "queue_wait"
    assert d.predicted_wait_s > 5.0
    assert d.retry_after_s == pytest.approx(d.predicted_wait_s - 5.0, abs=1.0)


def test_unhealthy_or_unreachable_replicas_get_nothing() -> None:
    b = board(snap("a", healthy=False), snap("b"))
    d = b.admit("r", prompt_tokens=1)
    assert isinstance(d, Accepted) and d.replica_id == "b"
    b.unreachable("b")
    assert isinstance(b.admit("r2", prompt_tokens=1), NoReplica)
    assert isinstance(LoadBoard().admit("r", 1), NoReplica)


def test_report_after_dispatch_replaces_local_estimate() -> None:
    b = board(snap("a"))
    for i in range(3):
        b.admit(f"r{i}", prompt_tokens=5)
    b.sent(["r0", "r1", "r2"], now=1.0)
    assert b.estimate("a").waiting_sequences == 3
    b.report(snap("a", running=3), polled_at=2.0)  # the replica has them now
    est = b.estimate("a")
    assert est.waiting_sequences == 0 and est.running_sequences == 3
    b.report(snap("a"), polled_at=1.5)  # an older, slower answer is ignored
    assert b.estimate("a").running_sequences == 3


def test_finished_requests_update_sequence_length_and_in_flight() -> None:
    b = board(snap("a"))
    b.admit("r", prompt_tokens=5)
    assert b.in_flight("a") == 1
    b.finished("r", [40])
    assert b.in_flight("a") == 0 and b.seq_tokens == 40


def test_microbatcher_groups_by_window_and_replica() -> None:
    sent: list[tuple[str, list[int]]] = []

    async def send(replica: str, items: list[int]) -> None:
        sent.append((replica, items))

    async def main() -> None:
        batcher: MicroBatcher[int] = MicroBatcher(send, window_s=0.05, max_batch=3)
        batcher.add("a", 1)
        batcher.add("b", 2)
        batcher.add("a", 3)
        await asyncio.sleep(0.1)
        for i in range(4):  # the 3rd fills the batch at once; the 4th opens a new window
            batcher.add("a", 10 + i)
        await asyncio.sleep(0)
        assert ("a", [10, 11, 12]) in sent
        batcher.add("a", 20)
        assert batcher.discard("a", 20)
        await batcher.close()

    asyncio.run(main())
    assert sent[:2] == [("a", [1, 3]), ("b", [2])]
    assert sent[-1] == ("a", [13])


def blocks_snap(rid: str, *, free_blocks: int, free_slots: int = 30, waiting: int = 0,
                tokens: int = 0, block_size: int = 16, rate: float = 200.0,
                prefill_rate: float = 600.0) -> ReplicaLoad:
    """A paged replica's report: 32 slots (max_num_seqs), blocks of 16, R = 256."""
    return replica_load(rid, waiting_sequences=waiting, waiting_tokens=tokens,
                        running_sequences=32 - free_slots, free_slots=free_slots,
                        total_slots=32, tokens_per_s=rate, prefill_tokens_per_s=prefill_rate,
                        healthy=True, free_blocks=free_blocks, total_blocks=1000,
                        block_size=block_size, blocks_per_sequence_max=256)


def test_docstring_example_predicts_wait_from_blocks() -> None:
    b = board(blocks_snap("a", free_blocks=40, waiting=4, tokens=60))
    b.finished("x", [100])  # sequences average 100 tokens: 7 blocks of 16
    est = b.estimate("a")
    assert b.startable(est) == 5  # 40 // 7, under the 30 free slots
    assert b.predicted_wait(est, seqs=2) == pytest.approx(60 / 600 + 1 * 100 / 200)


def test_free_blocks_not_free_slots_decide_who_waits() -> None:
    """Two replicas with the same free slots: the one whose pool is nearly full is predicted
    to make a new request wait and loses; with no blocks left anywhere the queue fills."""
    roomy, crowded = blocks_snap("roomy", free_blocks=500), blocks_snap("crowded",
                                                                        free_blocks=3)
    b = board(crowded, roomy)
    b.finished("x", [300])  # 19 blocks a sequence
    assert b.predicted_wait(b.estimate("crowded")) > 0
    assert b.predicted_wait(b.estimate("roomy")) == 0
    decision = b.admit("r", prompt_tokens=20)
    assert isinstance(decision, Accepted) and decision.replica_id == "roomy"
    full = board(blocks_snap("a", free_blocks=0, waiting=32), max_waiting=32)
    full.finished("x", [300])
    assert isinstance(full.admit("r", prompt_tokens=20), Shed)
