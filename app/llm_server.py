"""LLMServer: one replica, one engine; runs batches of requests and reports its load.

The router calls ``generate_batch`` with every request it gathered in one batching window; the
replica starts them all on its engine (they join the running continuous batch) and streams back
lists of events, one list per wake-up: first a :class:`Routed` naming the replica, then
:class:`GenerationChunk` objects and per-request :class:`ItemError` objects. Closing the stream
(the router's client left) aborts every request still running in it; ``abort`` cancels single
requests.

A router that dies does not close its streams: Ray lets a replica's stream run on when its
caller is gone. So every call names its ``caller`` (the router replica), the router's load
polls (every ``stats_interval_s``) double as its heartbeat, and a caller silent for
``orphan_timeout_s`` has its requests aborted here (:meth:`LLMServer.reap_orphans`), which
frees their cache slots. A plain class: the builder in ``app.main`` wraps it in a Serve
deployment, and tests drive it with a fake engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from app.load import ReplicaLoad
from app.metrics import ReplicaMetrics
from model.requests import EngineStats, GenerationChunk, GenerationRequest

logger = logging.getLogger(__name__)


class EngineLike(Protocol):
    """What the replica needs of model.engine.Engine (tests pass fakes)."""

    model_name: str
    max_model_len: int

    def validate(self, request: GenerationRequest) -> None: ...
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]: ...
    def abort(self, request_id: str) -> None: ...
    def stats(self) -> EngineStats: ...
    def start(self) -> None: ...
    async def shutdown(self, drain: bool = True, timeout_s: float = 60.0) -> None: ...


EngineFactory = Callable[[], EngineLike]

# A router polls each replica's load every stats_interval_s (0.2 s by default); silent this
# long, it is taken for dead (Serve takes ~10 s to restart one) and its requests are aborted.
DEFAULT_ORPHAN_TIMEOUT_S = 10.0
# The engine measures its rates over the seconds its steps took; between steps (the event
# loop forwarding chunks, GIL hand-offs, a neighbour's job holding the core) it drains
# nothing. stats() scales both rates by the measured wall-clock share over this window.
WALL_RATE_WINDOW_S = 10.0
WALL_RATE_MIN_BUSY_S = 1.0  # busy wall time the window needs before it corrects anything
WALL_SHARE_FLOOR = 0.5  # a correction at most doubles a predicted wait (measured 0.48-0.68 loaded)


@dataclass(frozen=True)
class BatchItem:
    """One request of a batch. The deadline travels as a duration: clocks differ per host."""

    request: GenerationRequest
    queue_timeout_s: float | None = None
    # False: the client reads the result only at the end, so after the request's first chunk
    # (which tells the router it started) each choice sends one merged chunk when it finishes:
    # far fewer events through Ray per step, which the engine thread feels (shared GIL).
    stream: bool = True


@dataclass(frozen=True)
class Routed:
    """First event of every batch stream: which replica runs it."""

    replica_id: str


@dataclass(frozen=True)
class ItemError:
    """A request of the batch failed; ``status`` is the HTTP status the client should get."""

    request_id: str
    status: int
    message: str


Event = Routed | GenerationChunk | ItemError


def error_status(exc: BaseException) -> int:
    """HTTP status for an engine exception: the client's fault (4xx) or ours (5xx)."""
    from model.engine import DeadlineExceeded, EngineRequestError, EngineShuttingDown

    if isinstance(exc, (EngineRequestError, ValueError)):
        return 400
    if isinstance(exc, (DeadlineExceeded, TimeoutError)):
        return 504
    if isinstance(exc, EngineShuttingDown):
        return 503
    return 500


class LLMServer:
    """Owns one engine (built by ``engine_factory`` inside the replica process)."""

    def __init__(self, engine_factory: EngineFactory, replica_id: str | None = None,
                 drain_timeout_s: float = 60.0,
                 orphan_timeout_s: float | None = DEFAULT_ORPHAN_TIMEOUT_S,
                 status_of: Callable[[BaseException], int] = error_status,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine_factory()
        self.replica_id = replica_id or serve_replica_id() or uuid.uuid4().hex[:8]
        self._drain_timeout_s = drain_timeout_s
        self._status_of = status_of
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._metrics = ReplicaMetrics(self.engine.model_name)
        self._draining = False
        self._orphan_timeout_s = orphan_timeout_s
        self._clock = clock
        self._caller_seen: dict[str, float] = {}  # caller -> when it last called
        self._caller_of: dict[str, str] = {}  # request id -> the caller that started it
        self._reaper: asyncio.Task[None] | None = None
        self.orphans_aborted = 0  # requests aborted because their caller fell silent
        # (when, prompt + generated tokens so far, had work): one per stats() call
        self._work_samples: deque[tuple[float, int, bool]] = deque()

    # Callers (router replicas) ------------------------------------------------------
    def _seen(self, caller: str | None) -> None:
        """A call from ``caller`` proves it alive; start the orphan reaper on first use."""
        if caller is None or self._orphan_timeout_s is None:
            return
        self._caller_seen[caller] = self._clock()
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def _reap_forever(self) -> None:
        assert self._orphan_timeout_s is not None
        period = min(1.0, self._orphan_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            self.reap_orphans()

    def reap_orphans(self) -> int:
        """Abort the requests of every caller silent for ``orphan_timeout_s``; how many."""
        if self._orphan_timeout_s is None:
            return 0
        now = self._clock()
        silent = {c for c, seen in self._caller_seen.items()
                  if now - seen > self._orphan_timeout_s}
        if not silent:
            return 0
        orphans = [rid for rid, c in self._caller_of.items() if c in silent]
        for caller in silent:
            del self._caller_seen[caller]
        for request_id in orphans:
            self._caller_of.pop(request_id, None)
            task = self._tasks.pop(request_id, None)
            if task is not None and not task.done():
                task.cancel()
            self.engine.abort(request_id)
        if orphans:
            self.orphans_aborted += len(orphans)
            logger.warning("aborted %d orphaned request(s) of router %s (silent for over "
                           "%gs): %s", len(orphans), ",".join(sorted(silent)),
                           self._orphan_timeout_s, ",".join(orphans))
        return len(orphans)

    # Calls from the router ------------------------------------------------------------
    async def generate_batch(self, items: Sequence[BatchItem], target: str | None = None,
                             caller: str | None = None) -> AsyncIterator[list[Event]]:
        """Start every request of the batch; stream their events until all have ended."""
        del target  # only the request router reads it
        self.engine.start()
        self._seen(caller)
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        mine: list[str] = []
        first: list[Event] = [Routed(self.replica_id)]
        for item in items:
            request = item.request
            if item.queue_timeout_s is not None:
                request = replace(request, deadline=time.monotonic() + item.queue_timeout_s)
            if self._draining:
                first.append(ItemError(request.request_id, 503, "replica is draining"))
                continue
            try:
                self.engine.validate(request)
            except Exception as exc:  # noqa: BLE001 - reported to the one client it concerns
                first.append(ItemError(request.request_id, self._status_of(exc), str(exc)))
                continue
            task = asyncio.get_running_loop().create_task(
                self._pump(request, queue, item.stream))
            self._tasks[request.request_id] = task
            if caller is not None:
                self._caller_of[request.request_id] = caller
            mine.append(request.request_id)
        yield first
        remaining = len(mine)
        try:
            while remaining:
                events = [await queue.get()]
                while not queue.empty():
                    events.append(queue.get_nowait())
                remaining -= sum(1 for e in events if e is None)
                out = [e for e in events if e is not None]
                if out:
                    yield out
        finally:
            for request_id in mine:
                self._caller_of.pop(request_id, None)
                running = self._tasks.pop(request_id, None)
                if running is not None and not running.done():
                    running.cancel()

    async def _pump(self, request: GenerationRequest, queue: asyncio.Queue[Event | None],
                    stream: bool = True) -> None:
        """Run one request on the engine, forwarding chunks; None marks its end."""
        tracker = self._metrics.track()
        forwarded_any = False
        held: dict[int, GenerationChunk] = {}  # choice index -> merged chunks not yet sent
        try:
            async for chunk in self.engine.generate(request):
                tracker.chunk(chunk)
                if stream or not forwarded_any:
                    queue.put_nowait(chunk)
                    forwarded_any = True
                    continue
                merged = held.pop(chunk.index, None)
                merged = chunk if merged is None else merge_chunks(merged, chunk)
                if merged.finish_reason is not None:
                    queue.put_nowait(merged)
                else:
                    held[chunk.index] = merged
        except asyncio.CancelledError:
            tracker.ended("abort", request.params.n)
            raise
        except Exception as exc:  # noqa: BLE001 - becomes this request's error event
            tracker.ended("error", request.params.n)
            status = self._status_of(exc)
            if status >= 500:
                logger.warning("request %s failed: %r", request.request_id, exc)
            queue.put_nowait(ItemError(request.request_id, status, str(exc)))
        finally:
            queue.put_nowait(None)

    async def abort(self, request_ids: Sequence[str], target: str | None = None,
                    caller: str | None = None) -> int:
        """Cancel requests running here (their slots free within one engine step)."""
        del target
        self._seen(caller)
        found = 0
        for request_id in request_ids:
            self._caller_of.pop(request_id, None)
            task = self._tasks.pop(request_id, None)
            if task is not None:
                found += 1
                task.cancel()
            self.engine.abort(request_id)
        return found

    async def stats(self, target: str | None = None, caller: str | None = None
                    ) -> ReplicaLoad:
        """The engine's load, for the router's dispatch and shedding decisions (and, from
        the same record, this replica's gauges; from ``caller``, the router's heartbeat).
        The drain rates are scaled to what the replica drains per wall-clock second."""
        del target
        self._seen(caller)
        stats = self.engine.stats()
        self._metrics.record_stats(stats)
        share = self._wall_share(stats)
        if share < 1.0:
            stats = replace(stats, tokens_per_s=stats.tokens_per_s * share,
                            prefill_tokens_per_s=stats.prefill_tokens_per_s * share)
        return ReplicaLoad(self.replica_id, stats, draining=self._draining)

    def _wall_share(self, s: EngineStats) -> float:
        """Tokens drained per wall-clock second while there was work, over the engine's
        step-time rate (<= 1): what the router's wait predictions must divide by.

        Over the last WALL_RATE_WINDOW_S, only intervals between two stats calls that both
        saw work count (an idle gap is not slowness). 1 until WALL_RATE_MIN_BUSY_S of such
        intervals, or when the engine has no rate yet.
        """
        now = self._clock()
        busy = s.running_sequences > 0 or s.waiting_sequences > 0
        self._work_samples.append((now, s.prompt_tokens_total + s.generated_tokens_total, busy))
        while self._work_samples and self._work_samples[0][0] < now - WALL_RATE_WINDOW_S:
            self._work_samples.popleft()
        seconds = tokens = 0.0
        samples = list(self._work_samples)
        for (t0, n0, busy0), (t1, n1, busy1) in zip(samples, samples[1:], strict=False):
            if busy0 and busy1 and t1 > t0:
                seconds += t1 - t0
                tokens += max(0, n1 - n0)
        if seconds < WALL_RATE_MIN_BUSY_S or s.tokens_per_s <= 0:
            return 1.0
        return max(WALL_SHARE_FLOOR, min(1.0, tokens / seconds / s.tokens_per_s))

    async def model_info(self, target: str | None = None) -> dict[str, Any]:
        del target
        return {"model_name": self.engine.model_name, "max_model_len": self.engine.max_model_len,
                "replica_id": self.replica_id, "orphans_aborted": self.orphans_aborted}

    # Lifecycle ------------------------------------------------------------------------
    def check_health(self) -> None:
        """Serve's health check: fails once the engine's step loop has died."""
        if not self.engine.stats().healthy:
            raise RuntimeError("engine loop is dead")

    async def shutdown(self) -> None:
        """Stop taking batches, let running requests finish, then stop the engine."""
        self._draining = True
        if self._reaper is not None:
            self._reaper.cancel()
        with contextlib.suppress(Exception):
            await self.engine.shutdown(drain=True, timeout_s=self._drain_timeout_s)


def merge_chunks(earlier: GenerationChunk, later: GenerationChunk) -> GenerationChunk:
    """One chunk carrying what two consecutive chunks of the same choice carry."""
    return replace(
        later, text=earlier.text + later.text, token_ids=earlier.token_ids + later.token_ids,
        logprobs=earlier.logprobs + later.logprobs,
        top_logprobs=earlier.top_logprobs + later.top_logprobs)


def serve_replica_id() -> str | None:
    """The Serve replica's unique id when running inside Serve (None in plain tests)."""
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # noqa: BLE001 - not inside a Serve replica
        return None
