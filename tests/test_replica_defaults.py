"""Defaults that use the machine (issue #13): replica torch threads, the printed split, and
shedding that queues an ordinary closed-loop client at concurrency 16 (pure Python, no Ray)."""

from __future__ import annotations

import argparse

from app.admission import Accepted, AdmissionLimits, LoadBoard, Shed
from app.config import AppConfig
from app.launch_plan import plan_launch, thread_split
from tests.conftest import replica_load


def test_replica_threads_take_the_cores_the_router_does_not_need() -> None:
    assert AppConfig().replica_threads(2) == 2  # one replica on the 2-core box: both cores
    assert AppConfig(num_replicas=2).replica_threads(2) == 1  # two replicas split them
    assert AppConfig(num_replicas=3).replica_threads(16) == 5
    assert AppConfig(router_num_cpus=2).replica_threads(16) == 14  # whole router CPUs count
    assert AppConfig(autoscaling={"min_replicas": 1, "max_replicas": 4}).replica_threads(8) == 2
    assert AppConfig(num_replicas=4).replica_threads(2) == 1  # never below one
    assert AppConfig(replica_torch_threads=3).replica_threads(2) == 3  # explicit wins
    assert AppConfig().engine_args().torch_threads is None  # decided inside the replica


def test_serve_prints_the_thread_split() -> None:
    args = argparse.Namespace(config=None, app_args=["num_replicas=2"], host=None, port=None)
    line = thread_split(plan_launch(args))
    assert line.startswith("2 LLM replica(s) x ") and "torch thread(s) each" in line


def test_default_shedding_queues_a_closed_loop_client_at_concurrency_16() -> None:
    # The measurement: 11 slots busy, 16 clients (5 queued), prompts + outputs
    # ~250 tokens a sequence, the replica draining ~40 tokens/s. The 17th arrival is the
    # next client's request after one finishes: it must queue, not be refused.
    defaults = AppConfig()
    board = LoadBoard(AdmissionLimits(max_queue_wait_s=defaults.max_queue_wait_s,
                                      max_waiting=defaults.max_waiting_per_replica))
    board.set_replicas(["r0"])
    board.report(replica_load("r0", waiting_sequences=4, waiting_tokens=600,
                              running_sequences=11, free_slots=0, total_slots=11,
                              tokens_per_s=40.0, prefill_tokens_per_s=400.0, healthy=True),
                 polled_at=0.0)
    for i in range(20):
        board.finished(f"done{i}", [250])
    assert isinstance(board.admit("next", 150), Accepted)
    # overload is still shed: a queue of 40 sequences waits far past the bound
    board.report(replica_load("r0", waiting_sequences=11, waiting_tokens=2000,
                              running_sequences=11, free_slots=0, total_slots=11,
                              tokens_per_s=40.0, prefill_tokens_per_s=400.0, healthy=True),
                 polled_at=0.0)
    assert isinstance(board.admit("flood", 150), Shed)
