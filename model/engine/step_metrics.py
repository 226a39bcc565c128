"""StepMetrics: what the engine's steps did, for its load figures (``EngineStats``).

Drain rate (tokens/s) is measured while busy: tokens over the busy time of the steps that ran
in the last ``THROUGHPUT_WINDOW_S`` seconds (idle time does not count, so it is right after a
quiet spell). The last ``RATE_MIN_STEPS`` steps (and the last ``RATE_MIN_STEPS`` that ran
prompt chunks) always count, however old: an engine that has been idle keeps what it measured
last. The prefill rate is prompt tokens over the time of the steps that ran prompt chunks (a
step that also ran decodes counts whole, so it errs on the slow side).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from model.cache_layout import is_decode
from model.requests import StepRecord
from model.scheduler import ScheduledChunk

THROUGHPUT_WINDOW_S = 10.0
RATE_MIN_STEPS = 16
RECENT_STEPS = 256  # step records kept for the replica's step histograms (it polls often)


@dataclass(frozen=True)
class StepSample:
    """One step's timing, for the drain-rate figures."""

    end: float  # time.monotonic() when the step ended
    seconds: float  # how long its model run + sampling + bookkeeping took
    tokens: int  # tokens it ran (prompt chunks + decodes)
    prefill_tokens: int  # of those, prompt tokens


@dataclass(frozen=True)
class StepFigures:
    """What a scheduled step will run, counted before it runs (sequences may end in it)."""

    batch_size: int
    prompt_tokens: int  # tokens of the chunks that lie inside their sequence's prompt
    ring_rows_overwritten: int  # positions >= R*B run (each reuses the ring row of i - R*B)


@dataclass(frozen=True)
class StepTotals:
    """Counters since the engine started."""

    steps: int
    prompt_tokens: int
    generated_tokens: int
    ring_rows_overwritten: int


class StepMetrics:
    """Recent step samples and running totals. ``count_step`` and ``snapshot`` run under the
    engine's lock; ``record_throughput`` runs on the engine thread after the step."""

    def __init__(self) -> None:
        self._throughput: deque[StepSample] = deque()  # recent steps
        self._prefill_throughput: deque[StepSample] = deque()  # recent steps with prompt chunks
        self._recent_steps: deque[StepRecord] = deque(maxlen=RECENT_STEPS)
        self._totals = StepTotals(0, 0, 0, 0)

    def count_step(self, started: float, scheduled: list[ScheduledChunk],
                   figures: StepFigures, sampled: int) -> None:
        """Add a finished step to the totals and the recent step records."""
        t = self._totals
        self._totals = StepTotals(t.steps + 1, t.prompt_tokens + figures.prompt_tokens,
                                  t.generated_tokens + sampled,
                                  t.ring_rows_overwritten + figures.ring_rows_overwritten)
        self._recent_steps.append(StepRecord(
            index=self._totals.steps, batch_size=figures.batch_size,
            tokens=sum(c.num_tokens for c in scheduled), seconds=time.monotonic() - started))

    def record_throughput(self, started: float, scheduled: list[ScheduledChunk]) -> None:
        """Add a step that started at ``started`` to the drain-rate samples."""
        now = time.monotonic()
        prefill = sum(c.num_tokens for c in scheduled if not is_decode(c.start_pos, c.num_tokens))
        sample = StepSample(now, now - started, sum(c.num_tokens for c in scheduled), prefill)
        self._throughput.append(sample)
        if prefill:
            self._prefill_throughput.append(sample)
        for samples in (self._throughput, self._prefill_throughput):
            while len(samples) > RATE_MIN_STEPS and samples[0].end < now - THROUGHPUT_WINDOW_S:
                samples.popleft()

    def snapshot(self) -> tuple[list[StepSample], list[StepSample], StepTotals,
                                tuple[StepRecord, ...]]:
        """Copies of what ``rates`` and the stats need (cheap: taken under the lock)."""
        return (list(self._throughput), list(self._prefill_throughput), self._totals,
                tuple(self._recent_steps))

    @staticmethod
    def rates(samples: list[StepSample], prefill_samples: list[StepSample]
              ) -> tuple[float, float]:
        """(drain tokens/s, prefill tokens/s) over the given samples; 0 before any step."""
        busy = sum(s.seconds for s in samples)
        rate = sum(s.tokens for s in samples) / busy if busy > 0 else 0.0
        prefill_busy = sum(s.seconds for s in prefill_samples)
        prefill_rate = (sum(s.prefill_tokens for s in prefill_samples) / prefill_busy
                        if prefill_busy > 0 else 0.0)
        return rate, prefill_rate
