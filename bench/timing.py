"""The one timing rule of the micro-benchmarks: warm up, then the best of several calls
(the best resists a busy box better than the mean)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_ms(fn: Callable[[], object], rounds: int, warmups: int = 1) -> float:
    """Milliseconds of the fastest of ``rounds`` calls of ``fn`` after ``warmups`` calls."""
    for _ in range(warmups):
        fn()
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best * 1e3
