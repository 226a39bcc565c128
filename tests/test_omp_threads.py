"""release_omp_threads frees the calling thread's OpenMP worker team (model/omp_threads.py)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from model.omp_threads import release_omp_threads


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or torch.get_num_threads() < 2,
                    reason="needs Linux /proc and at least 2 torch threads")
def test_a_threads_openmp_team_is_freed_and_comes_back_on_demand() -> None:
    weights = torch.randn(1024, 1024)
    torch.mm(weights, weights)  # this (main) thread's team exists; it is not ours to count

    def in_fresh_thread() -> tuple[int, int, int, bool]:
        before = _threads()
        torch.mm(weights, weights)  # a parallel kernel: this thread gets a worker team
        with_team = _threads()
        released = release_omp_threads()
        after_release = _threads()
        torch.mm(weights, weights)  # still works: a new team is started
        return before, with_team, after_release, released

    with ThreadPoolExecutor(1) as pool:
        before, with_team, after_release, released = pool.submit(in_fresh_thread).result()
    assert released
    assert with_team > before  # the thread's OpenMP workers
    assert after_release == before  # ... all gone after the release
