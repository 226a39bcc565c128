"""AsyncEngine: the stepping thread and the asyncio streams over :class:`EngineCore`.

``generate(request)`` streams a request's :class:`GenerationChunk` objects to its caller;
steps run back to back in one worker thread while there is work. Cancelling a caller's
iterator, or ``abort(id)``, frees its blocks at the start of the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor

from model.engine.core import EngineCore
from model.engine.types import (
    EngineRequestError,
    EngineShuttingDown,
    RequestFailure,
    StepOutput,
)
from model.omp_threads import release_omp_threads
from model.paged_cache import PagedKVCache
from model.requests import GenerationChunk, GenerationRequest
from model.scheduler import SchedulerConfig
from model.tokenizers import Tokenizer
from model.transformer import Transformer

logger = logging.getLogger(__name__)

# An idle engine thread re-checks every this many seconds whether its event loop is gone.
IDLE_WAKE_S = 0.5


class AsyncEngine(EngineCore):
    """The engine as the replica uses it: the synchronous core plus a stepping thread."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, cache: PagedKVCache,
                 scheduler_config: SchedulerConfig, max_model_len: int,
                 model_name: str = "model") -> None:
        super().__init__(model, tokenizer, cache, scheduler_config, max_model_len, model_name)
        self._queues: dict[str, asyncio.Queue[GenerationChunk | BaseException]] = {}
        self._loop_task: asyncio.Future[None] | None = None  # the engine thread's run
        self._event_loop: asyncio.AbstractEventLoop | None = None  # where outputs are delivered
        self._generation = 0  # bumped to retire an engine thread
        self._wake = threading.Event()  # set by add/abort/shutdown; the idle thread waits on it
        self._executor: ThreadPoolExecutor | None = None
        self._draining = False
        self._loop_error: BaseException | None = None

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed at the start of the next step."""
        super().abort(request_id)
        self._wake.set()

    @property
    def healthy(self) -> bool:
        """False once the background loop has died."""
        return self._loop_error is None and not (
            self._loop_task is not None and self._loop_task.done() and not self._draining)

    def start(self) -> None:
        """Start the background step loop for the running event loop (idempotent).

        The loop runs in the engine's own thread and steps back to back while there is work:
        it never waits for the event loop between steps (a busy event loop - RPCs, streaming -
        would otherwise leave the model idle). Outputs go to the event loop with
        ``call_soon_threadsafe``; adds and aborts wake the thread through a threading.Event.
        """
        loop = asyncio.get_running_loop()
        if (self._loop_task is not None and not self._loop_task.done()
                and self._event_loop is loop):
            return
        self._generation += 1  # a thread left by an earlier event loop sees this and exits
        self._wake.set()
        self._event_loop = loop
        self._executor = self._executor or ThreadPoolExecutor(1, thread_name_prefix="engine")
        self._loop_task = loop.run_in_executor(self._executor, self._step_forever, loop,
                                               self._generation)

    def _step_forever(self, loop: asyncio.AbstractEventLoop, generation: int) -> None:
        """The engine thread: step while there is work, sleep on the wake event otherwise."""
        omp_team = False  # whether this thread may hold OpenMP workers since its last release
        try:
            while generation == self._generation and not loop.is_closed():
                if not self.has_work:
                    if self._draining:
                        return
                    # idle: free this thread's OpenMP workers once, or a thread computing
                    # meanwhile (a sync-API caller, a benchmark's reference) runs throttled
                    if omp_team:
                        release_omp_threads()
                        omp_team = False
                    self._wake.wait(IDLE_WAKE_S)
                    self._wake.clear()  # has_work is checked again before sleeping
                    continue
                omp_team = True
                try:
                    outputs = self.step()
                except Exception as exc:  # a failed step fails its requests, not the engine
                    logger.exception("engine step failed")
                    self.drop_all()
                    _call_soon(loop, self._notify_all, exc)
                    continue
                if outputs:
                    _call_soon(loop, self._deliver, outputs)
        except BaseException as exc:
            self._loop_error = exc
            self.drop_all()
            _call_soon(loop, self._notify_all, exc)
            raise

    def _deliver(self, outputs: list[StepOutput]) -> None:
        """On the event loop: hand a step's outputs to their callers' queues."""
        for output in outputs:
            queue = self._queues.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output.error if isinstance(output, RequestFailure) else output)

    def _notify_all(self, exc: BaseException) -> None:
        """On the event loop: every waiting caller learns that its request failed."""
        for queue in self._queues.values():
            queue.put_nowait(RuntimeError(f"engine step failed: {exc}"))

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """Stream a request's chunks; closing the iterator early aborts the request."""
        if self._draining:
            raise EngineShuttingDown("the engine is shutting down")
        self.validate(request)
        if request.request_id in self._queues:
            raise EngineRequestError(f"request id {request.request_id!r} is already running")
        self.start()
        queue: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()
        self._queues[request.request_id] = queue
        self.add_at_next_step(request)
        self._wake.set()
        remaining = request.params.n
        try:
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    remaining = 0
                    raise item
                if item.finish_reason is not None:
                    remaining -= 1
                yield item
        finally:
            del self._queues[request.request_id]
            if remaining:
                self.abort(request.request_id)

    async def shutdown(self, drain: bool = True, timeout_s: float = 60.0) -> None:
        """Stop taking requests; let running ones finish (drain) or abort them, then stop."""
        self._draining = True
        if not drain:
            for request_id in list(self.request_sequences) + self.pending_request_ids():
                self.abort(request_id)
        task = self._loop_task
        if task is not None and not task.done():
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout_s)
            except asyncio.TimeoutError:
                self._generation += 1  # the thread stops after the step it is in
                self._wake.set()
        if self._executor is not None:
            self._executor.shutdown(wait=False)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: object) -> None:
    """Schedule ``fn`` on ``loop`` from the engine thread; nothing if the loop has closed."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)
