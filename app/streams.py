"""Stream merging: the tickets of one HTTP request become one answer, gathered or streamed.

A completions request with a list of prompts holds one :class:`Ticket` per prompt; its answer
takes their chunks as they come (:func:`merged`) into one :class:`Answer` (every choice's
:class:`ChoiceState`, set up once per ticket). :func:`gather` runs them all to their end;
:func:`stream` answers with server-sent events, but only after the first engine event, so a
request that fails before it starts (deadline, engine refusal) still gets its status code.
A stream whose reader lags behind the engine takes every chunk that is ready at once and
sends one SSE event per choice for them (:func:`coalesced`): the text is the same, in fewer
events, and the per-event work does not grow with the lag.
However an answer ends (finished, failed, client gone) every ticket is cancelled, a no-op for
those that ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any

from fastapi.responses import StreamingResponse

from app.dispatcher import RequestFailed, Ticket
from app.errors import APIError
from app.formatting import SSE_DONE, ChoiceState, sse
from app.llm_server import merge_chunks
from model.requests import GenerationChunk

REPLICA_HEADER = "X-Ringserve-Replica"  # which LLM replica(s) served the answer
# Milliseconds from the router's arrival of the request to its first engine event (the
# longest over its prompts): the server's share of the time to first token, which the
# admission promise (max_queue_wait_s plus about one prefill) bounds; the rest of a client's
# TTFT is the HTTP path (proxy, network, the client itself).
QUEUE_HEADER = "X-Ringserve-Queue-Ms"
Cancel = Callable[[Ticket], None]
# (position of the ticket in the request, the chunk, its choice's state with it added) -> SSE
Render = Callable[[int, GenerationChunk, ChoiceState], str]


class Answer:
    """Every choice of one HTTP request's tickets, as their chunks arrive."""

    def __init__(self, tickets: Sequence[Ticket]) -> None:
        self._states = [{i: ChoiceState(i) for i in range(t.request.params.n)}
                        for t in tickets]

    def add(self, ticket: int, chunk: GenerationChunk) -> ChoiceState:
        """Add a chunk of ticket number ``ticket``; its choice's state after it."""
        state = self._states[ticket][chunk.index]
        state.add(chunk)
        return state

    def choices(self) -> list[list[ChoiceState]]:
        """Per ticket, its choices in index order."""
        return [[s[i] for i in sorted(s)] for s in self._states]


def checked(chunk: GenerationChunk) -> GenerationChunk:
    """A choice the engine ended with ``error`` (it failed inside a step, alone) fails its
    HTTP request; the other requests of that step carried on."""
    if chunk.finish_reason == "error":
        raise APIError(500, "generation failed inside the engine for this request (other "
                       "requests were not affected); retrying may succeed",
                       code="engine_error")
    return chunk


def served_by(tickets: Sequence[Ticket]) -> str:
    """The :data:`REPLICA_HEADER` value: the replicas that ran the tickets (known once each
    has started: a ticket moves when its planned replica vanished)."""
    return ",".join(sorted({t.replica_id for t in tickets}))


def queue_ms(tickets: Sequence[Ticket]) -> str:
    """The :data:`QUEUE_HEADER` value, once every ticket has started (else of those that
    have: a stream's headers go out with its first event)."""
    waits = [t.started_at - t.arrival for t in tickets if t.started_at is not None]
    return str(round(1000 * max(waits))) if waits else "0"


async def merged(tickets: Sequence[Ticket]
                 ) -> AsyncGenerator[tuple[int, GenerationChunk], None]:
    """Chunks of all tickets as they come, tagged with the ticket's position.

    Raises APIError for the first ticket that fails.
    """
    async for batch in merged_batches(tickets):
        for item in batch:
            yield item


async def merged_batches(tickets: Sequence[Ticket]
                         ) -> AsyncGenerator[list[tuple[int, GenerationChunk]], None]:
    """Chunks of all tickets as they come, tagged with the ticket's position, in lists: each
    holds every chunk that was ready when the reader came for it (several when the reader
    lags: a stream then sends them in one SSE write).

    Raises APIError for the first ticket that fails, after the chunks ready before it.
    """
    if len(tickets) == 1:
        try:
            async for chunks in tickets[0].batches():
                ready: list[tuple[int, GenerationChunk]] = []
                for chunk in chunks:
                    try:
                        ready.append((0, checked(chunk)))
                    except APIError:
                        if ready:
                            yield ready
                        raise
                yield ready
        except RequestFailed as exc:
            raise exc.to_api_error() from exc
        return
    queue: asyncio.Queue[tuple[int, GenerationChunk | BaseException | None]] = asyncio.Queue()

    async def pump(t: int, ticket: Ticket) -> None:
        try:
            async for chunk in ticket.events():
                queue.put_nowait((t, checked(chunk)))
            queue.put_nowait((t, None))
        except RequestFailed as exc:
            queue.put_nowait((t, exc.to_api_error()))
        except APIError as exc:
            queue.put_nowait((t, exc))

    tasks = [asyncio.create_task(pump(t, ticket)) for t, ticket in enumerate(tickets)]
    try:
        remaining = len(tasks)
        while remaining:
            entries = [await queue.get()]
            while not queue.empty():
                entries.append(queue.get_nowait())
            ready = []
            for t, item in entries:
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    if ready:
                        yield ready
                    raise item
                else:
                    ready.append((t, item))
            if ready:
                yield ready
    finally:
        for task in tasks:
            task.cancel()


def coalesced(ready: Sequence[tuple[int, GenerationChunk]]
              ) -> list[tuple[int, GenerationChunk]]:
    """One chunk per (ticket, choice) of ``ready`` (its consecutive chunks merged: the text
    and token ids concatenated, logprobs kept one per token), in order of first appearance."""
    out: dict[tuple[int, int], GenerationChunk] = {}
    for t, chunk in ready:
        key = (t, chunk.index)
        earlier = out.get(key)
        out[key] = chunk if earlier is None else merge_chunks(earlier, chunk)
    return [(t, chunk) for (t, _), chunk in out.items()]


async def gather(tickets: Sequence[Ticket], cancel: Cancel) -> list[list[ChoiceState]]:
    """Run every ticket to its end; per ticket, its choices in index order."""
    answer = Answer(tickets)
    try:
        async for t, chunk in merged(tickets):
            answer.add(t, chunk)
    finally:
        for ticket in tickets:
            cancel(ticket)
    return answer.choices()


async def stream(tickets: Sequence[Ticket], cancel: Cancel, render: Render,
                 final: Callable[[list[list[ChoiceState]]], str | None]
                 ) -> StreamingResponse:
    """SSE answer: ``render`` per chunk, then ``final`` (a usage chunk, or None) and
    ``[DONE]``; waits for the first event so early failures keep their status code."""
    events = merged_batches(tickets)
    try:
        first: list[tuple[int, GenerationChunk]] | None = await anext(events)
    except StopAsyncIteration:
        first = None
    except BaseException:
        for ticket in tickets:
            cancel(ticket)
        raise

    def cancel_all() -> None:
        for ticket in tickets:
            cancel(ticket)

    async def body() -> AsyncIterator[str]:
        answer = Answer(tickets)
        pending = first
        try:
            while pending is not None:
                # chunks that arrived together go out in one write, one event per choice
                yield "".join(render(t, chunk, answer.add(t, chunk))
                              for t, chunk in coalesced(pending))
                pending = await anext(events, None)
            tail = final(answer.choices())
            if tail is not None:
                yield tail
            yield SSE_DONE
        except APIError as exc:
            yield sse(json.dumps(exc.body()))
            yield SSE_DONE
        finally:
            with contextlib.suppress(Exception):
                await events.aclose()
            cancel_all()

    return TicketStream(body(), on_close=cancel_all, media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                 REPLICA_HEADER: served_by(tickets),
                                 QUEUE_HEADER: queue_ms(tickets)})


class TicketStream(StreamingResponse):
    """A streamed answer that cancels its tickets however the response ends.

    The body generator's own ``finally`` does not run when the response is cancelled while
    it waits in ``send`` rather than inside the generator (Starlette's disconnect handling,
    or an HTTP middleware's stream between the app and the server): the generator is then
    left suspended, and its request would run on to the end with no one reading.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None],
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
