"""Releasing a thread's idle OpenMP workers, so that two threads' worker teams never coexist.

PyTorch's CPU kernels run on OpenMP (libgomp in the Linux wheels). Every thread that runs a
parallel kernel gets its own team of worker threads, kept for its lifetime. The engine loads
weights on one thread and steps on another (its own), so without care a process holds two
teams. libgomp then has more threads than CPUs and throttles its spin-waiting: every parallel
region pays a futex wake-up, and a batch-1 decode step (hundreds of small kernels) ran at
half speed with 2 torch threads (measured: 15 vs 30 tokens/s on the 2-core dev box,
bench/throughput_bench.py --api async vs sync). ``release_omp_threads()`` frees the calling
thread's team (OpenMP 5.0 ``omp_pause_resource_all``); the next parallel kernel on that thread
starts a fresh team, which costs microseconds. ``one_thread()`` runs a block of small kernels
on one intra-op thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
from collections.abc import Callable, Iterator

import torch

logger = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: release threads, keep the runtime usable
OPENMP_LIBRARIES = ("libgomp", "libomp", "libiomp")


@functools.cache
def _pause_function() -> Callable[[int], int] | None:
    """``omp_pause_resource_all`` of the OpenMP runtime this process has loaded, if any."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:  # not Linux: nothing to release
        return None
    for path in sorted(paths):
        name = path.rsplit("/", 1)[-1]
        if name.startswith(OPENMP_LIBRARIES):
            try:
                pause = ctypes.CDLL(path).omp_pause_resource_all
            except (OSError, AttributeError):
                continue
            pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
            return pause
    return None


def release_omp_threads() -> bool:
    """Free the calling thread's idle OpenMP workers; False where there is nothing to call."""
    pause = _pause_function()
    if pause is None:
        return False
    if pause(OMP_PAUSE_SOFT) != 0:
        logger.debug("omp_pause_resource_all refused (called inside a parallel region?)")
        return False
    return True


@contextlib.contextmanager
def one_thread(enabled: bool = True) -> Iterator[None]:
    """Run the block with one intra-op thread (the thread count is restored after it)."""
    threads = torch.get_num_threads()
    if not enabled or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
