"""The router's dispatch core: admit, batch, send to a replica, and hand events back per request.

``submit`` admits a request through the :class:`LoadBoard` (or raises a 429/503
:class:`APIError` at once), then parks it in the :class:`MicroBatcher` of its replica. When the
window closes the whole batch goes to the replica in one ``generate_batch`` call whose event
stream is demultiplexed into each request's :class:`Ticket`. A background task polls every
replica's load. ``cancel`` takes a request back from its batch or aborts it on its replica.

Admission predicts the queue wait from rates measured a moment before; when they turn out
wrong (a neighbour's job halves the drain rate) an accepted request could queue for longer
than ``max_queue_wait_s``. So each ticket carries ``start_by`` (arrival + max_queue_wait_s):
the replica gets it as the request's queue deadline (with the client's own ``deadline_s``,
whichever comes first), its engine drops the request if none of its sequences was scheduled
by then, and the router answers it 429 with a ``Retry-After`` computed as for a request shed
on arrival (code ``queue_wait_exceeded``; the ``refused`` outcome) instead of serving it late.
Nothing of the answer has been sent by then (a stream's headers wait for its first event), so
the time to first token of an accepted request is bounded by max_queue_wait_s plus about one
prefill. A streamed request of several prompts is exempt (one prompt's stream may have begun
before another's is refused), and so is a request placed again after its replica died. A
replica that neither starts nor refuses a request (hung: its engine stopped stepping) is
backed up by the router: after each load poll it refuses, and aborts on the replica, every
request sent but not started ``START_BY_GRACE_S`` (plus twice its prompt's prefill time) past
its ``start_by``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from app.admission import Accepted, Admission, LoadBoard, NoReplica, Shed, overloaded_message
from app.batcher import MicroBatcher, spawn
from app.errors import APIError
from app.llm_server import BatchItem, Event, ItemError, Routed
from app.load import ReplicaLoad
from app.metrics import RouterMetrics
from model.requests import GenerationChunk, GenerationRequest

logger = logging.getLogger(__name__)

CALL_TIMEOUT_S = 5.0  # stats polls and aborts; a replica that can't answer is unreachable
DEADLINE_GRACE_S = 2.0  # the replica enforces deadlines; the router only backs it up
# ... and start_by: a request its replica has neither started nor refused this long after its
# start_by (a hung replica: its engine stopped stepping), plus twice its prompt's prefill at
# the replica's measured rate (a started request's first event comes after its prefill), is
# refused by the router after a poll
START_BY_GRACE_S = 5.0
# A queued request whose replica died waits at most this long for a healthy one (Serve
# restarts a killed replica in about 10-30 s) before it fails with 503.
REPLACE_WAIT_S = 30.0


class ReplicaClient(Protocol):
    """How the router reaches LLM replicas (Serve handles in production, fakes in tests)."""

    def replica_ids(self) -> list[str] | None: ...
    async def stats(self, target: str | None) -> ReplicaLoad: ...
    def generate_batch(self, target: str, items: list[BatchItem]
                       ) -> AsyncIterator[list[Event]]: ...
    async def abort(self, target: str, request_ids: list[str]) -> None: ...
    async def model_info(self) -> dict[str, object]: ...


class RequestFailed(Exception):
    """A request ended with an error the client should see with ``status``."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}

    def to_api_error(self) -> APIError:
        """The client's answer: this failure as an :class:`APIError` (same status, message,
        code and headers)."""
        return APIError(self.status, self.message, code=self.code, headers=self.headers)


_END = object()

OUTCOMES = ("completed", "cancelled", "errored", "deadline", "refused")
LATE_REFUSAL_CODE = "queue_wait_exceeded"  # the 429's error code and the shed metric's reason


@dataclass
class Tally:
    """How the requests this router accepted ended. Invariant (tests/test_app_faults.py):
    accepted == completed + cancelled + errored + deadline + refused + in flight."""

    accepted: int = 0
    completed: int = 0  # every choice finished (stop or length)
    cancelled: int = 0  # its client left (disconnect, stall) before the end
    errored: int = 0  # its replica failed, or a choice ended with ``error``
    deadline: int = 0  # still queued at its own deadline (504)
    refused: int = 0  # not started within max_queue_wait_s of arrival (429, module docstring)
    replaced: int = 0  # placed again after its replica died before it started (not an end)

    def as_dict(self) -> dict[str, int]:
        return {"accepted": self.accepted, **{k: getattr(self, k) for k in OUTCOMES},
                "replaced": self.replaced}


@dataclass(eq=False)
class Ticket:
    """One admitted request: where it went and its stream of events."""

    request: GenerationRequest
    replica_id: str
    arrival: float
    deadline: float | None
    stream: bool  # False: the replica may merge chunks (see LLMServer / BatchItem)
    # not started by then: refused with 429 (module docstring); None: never refused late
    start_by: float | None = None
    queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    sent: bool = False
    started: bool = False  # an engine event arrived
    started_at: float | None = None  # when (router clock) the first engine event arrived
    got_token: bool = False  # a generated token arrived
    closed: bool = False  # finished, failed or cancelled
    finished_choices: int = 0
    replaced: int = 0  # times it was placed again after its replica died before it started
    timed_out: bool = False  # the router's backup deadline fired while it was queued
    failed: bool = False  # an error event or a choice that ended with ``error``
    seq_tokens: list[int] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    async def events(self) -> AsyncIterator[GenerationChunk]:
        """The request's chunks in order; raises RequestFailed on an error event."""
        async for batch in self.batches():
            for chunk in batch:
                yield chunk

    async def batches(self) -> AsyncIterator[list[GenerationChunk]]:
        """The request's chunks in order, in lists: each holds every chunk that had arrived
        by the time its reader came for it (one, unless the reader lags behind the engine).
        Raises RequestFailed on an error event, after the chunks that came before it."""
        while True:
            timeout = None
            if not self.started and self.deadline is not None:
                timeout = max(0.0, self.deadline + DEADLINE_GRACE_S - time.monotonic())
            try:
                item = await asyncio.wait_for(self.queue.get(), timeout)
            except asyncio.TimeoutError:
                self.timed_out = True
                raise RequestFailed(504, "the request was still queued at its deadline") from None
            batch: list[GenerationChunk] = []
            while True:
                if item is _END or isinstance(item, (ItemError, RequestFailed)):
                    if batch:
                        yield batch
                    if isinstance(item, ItemError):
                        raise RequestFailed(item.status, item.message)
                    if isinstance(item, RequestFailed):
                        raise item
                    return
                assert isinstance(item, GenerationChunk)
                batch.append(item)
                if self.queue.empty():
                    break
                item = self.queue.get_nowait()
            yield batch


class Dispatcher:
    """Admission + micro-batching + replica streams + load polling."""

    def __init__(self, client: ReplicaClient, board: LoadBoard, *, batch_window_s: float,
                 max_batch: int, stats_interval_s: float,
                 metrics: RouterMetrics | None = None) -> None:
        self._client = client
        self.board = board
        self._interval = stats_interval_s
        self._metrics = metrics
        self._batcher: MicroBatcher[Ticket] = MicroBatcher(self._send, batch_window_s,
                                                          max_batch)
        self._tickets: dict[str, Ticket] = {}
        self._poll_task: asyncio.Task[None] | None = None
        self._poll_lock: asyncio.Lock | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.tally = Tally()
        self.polled = False  # a poll round has completed (the board reflects the replicas)
        self.closing = False

    # Load polling ---------------------------------------------------------------------
    def start(self) -> None:
        if self._poll_task is None or self._poll_task.done():
            self._poll_task = spawn(self._poll_forever())

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception:  # polling must outlive any one failure
                logger.exception("load poll failed")
            await asyncio.sleep(self._interval)

    async def poll(self) -> None:
        """Ask every replica for its load once (concurrently, each with a timeout)."""
        if self._poll_lock is None:
            self._poll_lock = asyncio.Lock()
        async with self._poll_lock:
            ids = self._client.replica_ids()
            if ids is not None:
                self.board.set_replicas(ids)  # [] once every replica is gone: none healthy
            if not ids:
                # The handle learns the replica set on first use (or after all replicas
                # died, once Serve has started one again): one untargeted poll.
                await self._poll_one(None)
                ids = self._client.replica_ids() or self.board.replica_ids
            self.board.set_replicas(ids)
            await asyncio.gather(*(self._poll_one(rid) for rid in ids))
            self.polled = True
        self._refuse_overdue(time.monotonic())

    def _refuse_overdue(self, now: float) -> None:
        """The router's backup for ``start_by``: refuse (and abort on its replica) a request
        sent but not started ``START_BY_GRACE_S`` past it, as the replica would have."""
        for ticket in list(self._tickets.values()):
            if (ticket.closed or not ticket.sent or not _refused_late(ticket)
                    or ticket.start_by is None or now < ticket.start_by + START_BY_GRACE_S):
                continue
            if ticket.replica_id in self.board.replica_ids:
                rate = self.board.estimate(ticket.replica_id).prefill_tokens_per_s
                prompt = len(ticket.request.prompt_token_ids) * ticket.request.params.n
                if now < ticket.start_by + START_BY_GRACE_S + 2 * prompt / rate:
                    continue
            logger.warning("request %s: not started on %s %.1fs past its start_by; refused",
                           ticket.request_id, ticket.replica_id, now - ticket.start_by)
            self._refuse_late(ticket)
            task = spawn(self._abort(ticket))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _poll_one(self, replica_id: str | None) -> None:
        sent_at = time.monotonic()
        try:
            load = await asyncio.wait_for(self._client.stats(replica_id), CALL_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - any failure makes the replica unreachable
            logger.warning("replica %s did not report its load: %r", replica_id, exc)
            if replica_id is not None:
                self.board.unreachable(replica_id)
            return
        self.board.report(load, sent_at, target=replica_id)

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait until some replica has reported healthy (True) or the timeout passes (False)."""
        self.start()
        end = time.monotonic() + timeout_s
        while not self.board.healthy_ids():
            if time.monotonic() >= end:
                return False
            await asyncio.sleep(0.05)
        return True

    # Requests -------------------------------------------------------------------------
    async def submit(self, request: GenerationRequest, deadline_s: float | None = None,
                     stream: bool = True, refuse_late: bool = True) -> Ticket:
        """Admit a request (raising a 429/503 APIError when refused) and queue it for sending.

        ``stream=False`` (the client wants one response at the end) lets the replica send the
        request's first chunk and then one merged chunk per choice, not one event per token.
        ``refuse_late``: refuse it (429) if it has not started within ``max_queue_wait_s``
        (module docstring).
        """
        arrival = time.monotonic()
        if self.closing:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        decision = await self._admit(request, CALL_TIMEOUT_S)
        if isinstance(decision, Shed):
            if self._metrics:
                self._metrics.shed_request(decision.reason)
            raise APIError(429, decision.message, code=decision.reason,
                           headers={"Retry-After": str(decision.retry_after_s)})
        if isinstance(decision, NoReplica):
            if self._metrics:
                self._metrics.shed_request("no_replica")
            raise APIError(503, decision.message, code="no_healthy_replica",
                           headers={"Retry-After": "1"})
        assert isinstance(decision, Accepted)
        if self._metrics:
            self._metrics.admitted(decision.predicted_wait_s)
        deadline = arrival + deadline_s if deadline_s is not None else None
        start_by = arrival + self.board.limits.max_queue_wait_s if refuse_late else None
        ticket = Ticket(request, decision.replica_id, arrival, deadline, stream, start_by)
        self.tally.accepted += 1
        self._tickets[request.request_id] = ticket
        self._batcher.add(decision.replica_id, ticket)
        return ticket

    async def _admit(self, request: GenerationRequest, wait_s: float, force: bool = False
                     ) -> Admission:
        """The board's decision; while no replica is healthy (none yet, or a moment when
        every report is late on a starved host), wait for one up to ``wait_s``."""
        end = time.monotonic() + max(0.0, wait_s)
        while True:
            decision = self.board.admit(request.request_id, len(request.prompt_token_ids),
                                        request.params.n, force=force)
            left = end - time.monotonic()
            if not isinstance(decision, NoReplica) or left <= 0:
                return decision
            await self.wait_ready(left)

    def cancel(self, ticket: Ticket) -> None:
        """The client left: drop the request from its batch, or abort it on its replica."""
        if ticket.closed:
            return
        self._close(ticket, "deadline" if ticket.timed_out else "cancelled")
        if self._metrics:
            self._metrics.cancelled()
        if self._batcher.discard(ticket.replica_id, ticket):
            return
        task = spawn(self._abort(ticket))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort(self, ticket: Ticket) -> None:
        try:
            await asyncio.wait_for(
                self._client.abort(ticket.replica_id, [ticket.request_id]), CALL_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - the stream's close aborts it anyway
            logger.warning("abort of %s failed: %r", ticket.request_id, exc)

    def _close(self, ticket: Ticket, outcome: str) -> None:
        ticket.closed = True
        setattr(self.tally, outcome, getattr(self.tally, outcome) + 1)
        self._tickets.pop(ticket.request_id, None)
        self.board.finished(ticket.request_id, ticket.seq_tokens)
        ticket.queue.put_nowait(_END)

    async def _send(self, replica_id: str, batch: list[Ticket]) -> None:
        """One batch call to one replica; route its events to the tickets."""
        tickets = {t.request_id: t for t in batch if not t.closed}
        if not tickets:
            return
        now = time.monotonic()
        self.board.sent(tickets, now)
        if self._metrics:
            self._metrics.batch_sent(len(tickets))
        items = []
        for t in tickets.values():
            t.sent = True
            limits = [at for at in (t.deadline, t.start_by) if at is not None]
            timeout = max(0.0, min(limits) - now) if limits else None
            items.append(BatchItem(t.request, timeout, t.stream))
        open_ids = set(tickets)
        stream = self._client.generate_batch(replica_id, items)
        try:
            async for events in stream:
                for event in events:
                    self._route(event, tickets, open_ids)
                open_ids = {rid for rid in open_ids if not tickets[rid].closed}
                if not open_ids:
                    break
        except Exception as exc:  # noqa: BLE001 - a dead replica fails its open requests
            logger.warning("batch stream from %s failed: %r", replica_id, exc)
            self.board.unreachable(replica_id)  # until it answers a poll again
            self._replica_lost(tickets, open_ids, f"LLM replica failed: {exc}")
        finally:
            with contextlib.suppress(Exception):
                await _aclose(stream)
            self._replica_lost(tickets, open_ids, "LLM replica ended the stream early")

    def _replica_lost(self, tickets: dict[str, Ticket], open_ids: set[str], message: str
                      ) -> None:
        """The batch stream broke: a request that has started (its client may have seen
        tokens) fails with 503; one still queued there is placed on another replica."""
        for rid in sorted(open_ids):
            ticket = tickets[rid]
            if ticket.closed:
                continue
            if ticket.started or self.closing:
                ticket.queue.put_nowait(ItemError(rid, 503, message))
                self._close(ticket, "errored")
            else:
                ticket.sent = False
                task = spawn(self._place_again(ticket, message))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        open_ids.clear()

    async def _place_again(self, ticket: Ticket, message: str) -> None:
        """Re-admit a queued request whose replica died (never shed: it was accepted), waiting
        for a healthy replica until its deadline or ``REPLACE_WAIT_S``."""
        limit = REPLACE_WAIT_S
        if ticket.deadline is not None:
            limit = min(limit, ticket.deadline - time.monotonic())
        decision = await self._admit(ticket.request, limit, force=True)
        if ticket.closed:
            if isinstance(decision, Accepted):
                self.board.finished(ticket.request_id)
            return  # its client left meanwhile
        if not isinstance(decision, Accepted):
            ticket.queue.put_nowait(ItemError(ticket.request_id, 503, f"{message}; no other "
                                              "healthy LLM replica took the request"))
            self._close(ticket, "errored")
            return
        logger.info("request %s moves from %s to %s", ticket.request_id, ticket.replica_id,
                    decision.replica_id)
        ticket.replica_id = decision.replica_id
        ticket.start_by = None  # it was accepted and lost its replica: never refused now
        ticket.replaced += 1
        self.tally.replaced += 1
        self._batcher.add(decision.replica_id, ticket)

    def _route(self, event: Event, tickets: dict[str, Ticket], open_ids: set[str]) -> None:
        if isinstance(event, Routed):
            for rid in open_ids:
                if tickets[rid].replica_id != event.replica_id:
                    tickets[rid].replica_id = event.replica_id
                    self.board.moved(rid, event.replica_id)
            return
        ticket = tickets.get(event.request_id)
        if ticket is None or ticket.closed:
            return
        if isinstance(event, ItemError) and event.status == 504 and _refused_late(ticket):
            self._refuse_late(ticket)
            return
        if self._metrics:
            self._record(ticket, event)
        if not ticket.started:
            ticket.started_at = time.monotonic()
            self.board.started(ticket.request_id, ticket.started_at)
        ticket.started = True
        ticket.queue.put_nowait(event)
        if isinstance(event, ItemError):
            self._close(ticket, "deadline" if event.status == 504 else "errored")
            return
        if event.finish_reason is not None:
            ticket.finished_choices += 1
            ticket.failed = ticket.failed or event.finish_reason == "error"
            ticket.seq_tokens.append(event.prompt_tokens + event.completion_tokens)
            if ticket.finished_choices >= ticket.request.params.n:
                self._close(ticket, "errored" if ticket.failed else "completed")

    def _refuse_late(self, ticket: Ticket) -> None:
        """The replica dropped a request still queued at its ``start_by``: answer it as a
        request shed on arrival (429, ``Retry-After`` from the load now), counted ``refused``."""
        self.board.finished(ticket.request_id)  # the Retry-After estimate leaves it out
        retry = self.board.retry_after_s(ticket.request.params.n)
        wait = self.board.limits.max_queue_wait_s
        ticket.queue.put_nowait(RequestFailed(
            429, overloaded_message(f"the request did not start within {wait:g}s "
                                    "(max_queue_wait_s)", retry), code=LATE_REFUSAL_CODE,
            headers={"Retry-After": str(retry)}))
        self._close(ticket, "refused")
        if self._metrics:
            self._metrics.shed_request(LATE_REFUSAL_CODE)

    def _record(self, ticket: Ticket, event: ItemError | GenerationChunk) -> None:
        """Router-side latency figures: first event, first token, last token."""
        assert self._metrics is not None
        now = time.monotonic()
        if not ticket.started:
            self._metrics.first_event(ticket.arrival, now)
        if isinstance(event, ItemError):
            return
        if event.token_ids and not ticket.got_token:
            ticket.got_token = True
            self._metrics.first_token(ticket.arrival, now)
        if (event.finish_reason is not None
                and ticket.finished_choices + 1 >= ticket.request.params.n):
            self._metrics.finished(ticket.arrival, now)

    def in_flight(self) -> int:
        return len(self._tickets)

    async def close(self) -> None:
        """Stop polling; let batches in flight finish."""
        self.closing = True
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
        await self._batcher.close()


def _refused_late(ticket: Ticket) -> bool:
    """Whether a replica's 504 for this still-queued ticket came from its ``start_by`` (the
    earlier of the two limits the replica got), not from the client's own deadline."""
    return (not ticket.started and ticket.start_by is not None
            and (ticket.deadline is None or ticket.start_by < ticket.deadline))


async def _aclose(stream: object) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()
    cancel = getattr(stream, "cancel", None)
    if cancel is not None:
        cancel()

