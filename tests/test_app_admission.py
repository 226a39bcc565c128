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


def test_burst_into_free_slots_waits_for_nothing_whatever_the_rates() -> None:
    # 16 free slots, a slow replica (drain 30 tokens/s, prefill unmeasured so the drain rate
    # stands in): a burst of 16 requests of 140 prompt tokens each can all start at once, so
    # none of them queues. (Before, the prompts queued ahead counted at the prefill rate and
    # the last ones predicted 15 * 140 / 30 = 70 s: a burst the replica held was shed.)
    b = board(snap("a", slots=16, rate=30.0), max_queue_wait_s=10.0)
    for i in range(16):
        d = b.admit(f"r{i}", prompt_tokens=140)
        assert isinstance(d, Accepted), d
        assert d.predicted_wait_s == 0.0
    # the 17th finds no slot: it waits for one sequence of ~400 tokens to finish at the
    # drain rate, 13.3 s > 10 s -> shed; nothing queued ahead of it is blocked, so no prefill
    b.finished("old", [400])
    shed = b.admit("r16", prompt_tokens=140)
    assert isinstance(shed, Shed) and shed.reason == "queue_wait"
    assert shed.predicted_wait_s == pytest.approx(400 / 30.0)
    assert shed.retry_after_s == 4  # ceil(13.33 - 10)


def test_only_sequences_that_cannot_start_count_their_prefill() -> None:
    # 2 free slots, 5 sequences queued with 500 prompt tokens: 2 can start, 3 are blocked
    # (their share of the prompt tokens: 300). A new request is short 5 + 1 - 2 = 4.
    b = board(snap("a", slots=6, running=4, waiting=5, tokens=500, rate=100.0,
                   prefill_rate=1000.0))
    b.finished("x", [50])
    est = b.estimate("a")
    assert b.predicted_wait(est) == pytest.approx(300 / 1000.0 + 4 * 50 / 100.0)
    # with room for all of them and the request, the same queue costs nothing
    roomy = board(snap("a", slots=10, running=4, waiting=5, tokens=500, rate=100.0,
                       prefill_rate=1000.0))
    assert roomy.predicted_wait(roomy.estimate("a")) == 0.0
    assert roomy.predicted_wait(roomy.estimate("a"), seqs=2) > 0  # 5 + 2 > 6 free


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


def test_request_ended_since_the_report_is_left_out_until_a_newer_report() -> None:
    """The race the correction closes: the report still shows a finished request running,
    so two arrivals tied onto that replica while the other stood idle."""
    b = board(snap("a", slots=1), snap("b", slots=1))
    b.admit("lone", prompt_tokens=5)
    b.sent(["lone"], now=1.0)
    b.started("lone", now=1.2)
    b.report(snap("a", running=1, slots=1), polled_at=1.5)  # polled while it ran
    b.report(snap("b", slots=1), polled_at=1.5)
    b.finished("lone", [21], now=2.0)
    est = b.estimate("a")
    assert est.running_sequences == 0 and est.free_slots == 1 and est.ended_sequences == 1
    pair = [b.admit(f"r{i}", prompt_tokens=5) for i in range(2)]  # arriving together
    assert all(isinstance(d, Accepted) and d.predicted_wait_s == 0.0 for d in pair), pair
    assert {d.replica_id for d in pair if isinstance(d, Accepted)} == {"a", "b"}
    # a report polled before the end still counts it: the correction stays
    b.report(snap("a", running=1, slots=1), polled_at=1.9)
    assert b.estimate("a").ended_sequences == 1
    # one polled after the end no longer contains it: the report stands alone again
    b.report(snap("a", running=1, slots=1), polled_at=2.1)
    est = b.estimate("a")
    assert est.ended_sequences == 0 and est.running_sequences == 1 and est.free_slots == 0


def test_ended_request_still_queued_at_the_poll_leaves_the_waiting_figures() -> None:
    b = board(snap("a", running=4))
    b.admit("q", prompt_tokens=30)
    b.sent(["q"], now=1.0)
    b.report(snap("a", running=4, waiting=1, tokens=30), polled_at=1.5)
    b.started("q", now=1.8)  # scheduled after the poll: the report has it waiting
    b.finished("q", [], now=2.0)  # e.g. cancelled
    est = b.estimate("a")
    assert est.waiting_sequences == 0 and est.waiting_tokens == 0
    assert est.running_sequences == 4 and est.free_slots == 0
    # a request sent after the latest poll was never in a report: nothing to leave out
    b.admit("late", prompt_tokens=5)
    b.sent(["late"], now=2.5)
    b.finished("late", [9], now=2.6)
    assert b.estimate("a").ended_sequences == 1


def test_ended_running_sequences_free_the_blocks_they_held() -> None:
    b = board(blocks_snap("a", free_blocks=10, free_slots=30))  # 2 running
    b.admit("r", prompt_tokens=40)
    b.sent(["r"], now=1.0)
    b.started("r", now=1.1)
    b.report(blocks_snap("a", free_blocks=5, free_slots=29), polled_at=1.5)
    b.finished("r", [70], now=2.0)  # 70 tokens in blocks of 16: 5 blocks
    est = b.estimate("a")
    assert est.free_blocks == 10 and est.free_slots == 30 and est.running_sequences == 2


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
    assert b.predicted_wait(est, seqs=1) == 0.0  # the 4 queued and this one all fit
    assert b.predicted_wait(est, seqs=2) == pytest.approx(1 * 100 / 200)
    tight = board(blocks_snap("a", free_blocks=2, waiting=4, tokens=60))
    tight.finished("x", [100])
    assert tight.startable(tight.estimate("a")) == 0
    assert tight.predicted_wait(tight.estimate("a"), seqs=2) == pytest.approx(
        60 / 600 + 6 * 100 / 200)


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


def test_burst_of_32_the_pool_holds_is_admitted_at_prior_rates_then_overload_sheds() -> None:
    """Issue #12's burst: 32 requests of ~100 prompt tokens into a fresh replica with the
    defaults (max_num_seqs 32, 2 GiB of blocks) and no measured rate yet. Each one can start
    at once, so none waits; at the 50 tokens/s prior the old prediction, counting every
    queued prompt, reached 31 * 100 / 50 = 62 s for the last one and shed it."""
    fresh = replica_load("a", waiting_sequences=0, waiting_tokens=0, running_sequences=0,
                         free_slots=32, total_slots=32, tokens_per_s=0.0,
                         prefill_tokens_per_s=0.0, healthy=True, free_blocks=8192,
                         total_blocks=8192, block_size=16, blocks_per_sequence_max=256)
    b = board(fresh, max_queue_wait_s=60.0)
    for i in range(32):
        d = b.admit(f"r{i}", prompt_tokens=100)
        assert isinstance(d, Accepted) and d.predicted_wait_s == 0.0, (i, d)
    # The 33rd finds every sequence place taken: it queues behind one finishing sequence.
    d33 = b.admit("r32", prompt_tokens=100)
    assert isinstance(d33, Accepted) and d33.predicted_wait_s == pytest.approx(64 / 50.0)
    # Real overload is still shed: a full replica with a long blocked queue.
    full = board(blocks_snap("a", free_blocks=0, free_slots=0, waiting=30, tokens=3000,
                             rate=40.0, prefill_rate=400.0), max_queue_wait_s=60.0)
    for i in range(20):
        full.finished(f"done{i}", [250])
    shed = full.admit("flood", prompt_tokens=100)
    assert isinstance(shed, Shed) and shed.reason == "queue_wait"
    assert shed.predicted_wait_s == pytest.approx(3000 / 400 + 31 * 250 / 40)
    assert shed.retry_after_s >= 1
