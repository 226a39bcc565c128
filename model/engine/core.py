"""EngineCore: the synchronous engine. ``add``, ``abort``, ``step() -> list[StepOutput]``.

``step()`` reads as schedule -> execute -> update: the scheduler picks the step's chunks, the
:class:`~model.engine.model_runner.ModelRunner` runs them and samples, the
:class:`~model.engine.output_processor.OutputProcessor` turns the draws into chunks, and
finished sequences give their blocks back. A request that fails inside a step (building its
sequences, sampling, detokenizing) finishes with ``error`` alone; the rest of the batch
carries on. ``abort(id)`` frees a request's blocks at the start of the next step. The thread
and asyncio streams on top are in :mod:`model.engine.async_engine`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import TypeVar

import torch

from model.block_table import BlockManager
from model.cache_layout import buffer_len_for
from model.config import ModelConfig
from model.engine.construction import EngineParts, build_engine_parts
from model.engine.model_runner import ModelRunner
from model.engine.output_processor import OutputProcessor
from model.engine.step_metrics import StepFigures, StepMetrics
from model.engine.types import (
    CompletedChoice,
    DeadlineExceeded,
    EngineRequestError,
    ModelRunnerOutput,
    RequestFailure,
    SamplingFailure,
    SequenceState,
    StepOutput,
)
from model.engine_args import EngineArgs
from model.omp_threads import release_omp_threads
from model.paged_cache import PagedKVCache
from model.requests import EngineStats, FinishReason, GenerationChunk, GenerationRequest
from model.sampling_params import SamplingParams
from model.scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from model.tokenizers import Tokenizer
from model.transformer import Transformer

logger = logging.getLogger(__name__)
_Engine = TypeVar("_Engine", bound="EngineCore")


class EngineCore:
    """Serves many requests at once on one model, one synchronous step at a time."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, cache: PagedKVCache,
                 scheduler_config: SchedulerConfig, max_model_len: int,
                 model_name: str = "model") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.cache = cache
        self.blocks = BlockManager(cache.pool, cache.block_size, cache.table_len)
        self.scheduler = Scheduler(scheduler_config, self.blocks)
        self.runner = ModelRunner(model, cache)
        # W as attention sees it (the context when there is no window); the ring holds R*B
        self.window_tokens = buffer_len_for(model.config.sliding_window, max_model_len)
        self.outputs = OutputProcessor(tokenizer, self.window_tokens)
        self.max_model_len = max_model_len
        self.model_name = model_name
        self.sequences: dict[str, SequenceState] = {}
        self.request_sequences: dict[str, list[str]] = {}  # request id -> its sequence ids
        self.step_metrics = StepMetrics()
        self._pending_adds: deque[GenerationRequest] = deque()
        self._pending_aborts: deque[str] = deque()
        self._lock = threading.Lock()  # guards scheduler state between step() and add/abort

    @classmethod
    def from_args(cls: type[_Engine], args: EngineArgs) -> _Engine:
        """Load weights and tokenizer from ``args.model`` (the embedded model when None)."""
        return cls.from_parts(build_engine_parts(args))

    @classmethod
    def from_parts(cls: type[_Engine], parts: EngineParts) -> _Engine:
        return cls(parts.model, parts.tokenizer, parts.cache, parts.scheduler_config,
                   parts.max_model_len, parts.model_name)

    @property
    def config(self) -> ModelConfig:
        """The served model's config (window override applied)."""
        return self.model.config

    # Requests in ----------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        """Refuse what can never run, before it takes a block."""
        prompt_len = len(request.prompt_token_ids)
        if prompt_len == 0:
            raise EngineRequestError("the prompt is empty")
        if prompt_len + request.params.max_tokens > self.max_model_len:
            raise EngineRequestError(
                f"prompt ({prompt_len} tokens) + max_tokens ({request.params.max_tokens}) "
                f"exceeds the model's limit of {self.max_model_len} tokens")
        vocab = self.config.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_token_ids):
            raise EngineRequestError(f"prompt token ids must be in [0, {vocab})")
        max_seqs = self.scheduler.config.max_num_seqs
        if request.params.n > max_seqs:
            raise EngineRequestError(
                f"n={request.params.n} exceeds the {max_seqs} sequences this "
                "engine can run at once")

    def add(self, request: GenerationRequest) -> None:
        """Validate and queue a request (its n choices become n sequences)."""
        self.validate(request)
        if request.request_id in self.request_sequences:
            raise EngineRequestError(f"request id {request.request_id!r} is already running")
        with self._lock:
            self._add_locked(request)

    def add_at_next_step(self, request: GenerationRequest) -> None:
        """Queue an already validated request from another thread; the next step adds it
        (a request that fails to build then ends with ``error`` in that step's outputs)."""
        self._pending_adds.append(request)

    def pending_request_ids(self) -> list[str]:
        """Requests queued by ``add_at_next_step`` that no step has added yet."""
        return [r.request_id for r in self._pending_adds]

    def _add_locked(self, request: GenerationRequest) -> None:
        # Build every sequence first (seeding a generator or priming a detokenizer can raise on
        # input that slipped past validation); only then register them, so a failure leaves
        # no trace of the request.
        seqs = []
        for index in range(request.params.n):
            seed = request.params.seed
            generator = None if seed is None else torch.Generator().manual_seed(seed + index)
            seqs.append(SequenceState(
                seq_id=f"{request.request_id}#{index}", request=request, index=index,
                token_ids=list(request.prompt_token_ids),
                detokenizer=self.outputs.detokenizer_for(request),
                stop_checker=self.outputs.stop_checker_for(request), generator=generator))
        for seq in seqs:
            self.sequences[seq.seq_id] = seq
            self.scheduler.add(seq.seq_id, len(request.prompt_token_ids))
        self.request_sequences[request.request_id] = [seq.seq_id for seq in seqs]

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed at the start of the next step."""
        self._pending_aborts.append(request_id)

    @property
    def has_work(self) -> bool:
        """Anything queued, running, or waiting to be added or aborted."""
        return bool(self._pending_adds or self._pending_aborts or self.scheduler.has_work)

    # The step -------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One engine step: schedule -> execute -> update. Returns the chunks it produced."""
        with self._lock:
            outputs = self._apply_pending()
            outputs += self._expire_deadlines()
            scheduled = self.scheduler.schedule()
            started = time.monotonic()
            for chunk in scheduled:
                seq = self.sequences[chunk.seq_id]
                seq.admitted = True
                seq.scheduled_at = seq.scheduled_at or started
            figures = self._step_figures(scheduled)
        if not scheduled:
            return outputs
        result = self.runner.execute(scheduled, self.sequences)
        with self._lock:
            outputs += self._update(scheduled, result)
            self.step_metrics.count_step(started, scheduled, figures, len(result.draws))
        self.step_metrics.record_throughput(started, scheduled)
        return outputs

    def _step_figures(self, scheduled: list[ScheduledChunk]) -> StepFigures:
        # a position >= W pushes the oldest one out of the window, but its row is reused only
        # when the ring of R*B rows comes round: position i >= R*B takes the row of position
        # i - R*B. The metric counts those positions (once per sequence, not per layer)
        ring = self.cache.table_len * self.cache.block_size
        prompt = overwritten = 0
        for chunk in scheduled:
            end = chunk.start_pos + chunk.num_tokens
            prompt += max(0, min(end, self.sequences[chunk.seq_id].prompt_len)
                          - chunk.start_pos)
            overwritten += max(0, end - max(chunk.start_pos, ring))
        return StepFigures(len(scheduled), prompt, overwritten)

    def _apply_pending(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        while self._pending_adds:
            request = self._pending_adds.popleft()
            try:
                self._add_locked(request)
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                outputs += self._error_chunks(request, exc)
        while self._pending_aborts:
            request_id = self._pending_aborts.popleft()
            for seq_id in list(self.request_sequences.get(request_id, ())):
                outputs.append(self._finish(self.sequences[seq_id], "abort"))
        return outputs

    def _expire_deadlines(self) -> list[StepOutput]:
        """Requests none of whose sequences started before their deadline are dropped."""
        now = time.monotonic()
        expired = {s.request.request_id for s in self.sequences.values()
                   if s.request.deadline is not None and s.request.deadline < now}
        outputs: list[StepOutput] = []
        for request_id in expired:
            seq_ids = self.request_sequences[request_id]
            if any(self.sequences[seq_id].admitted for seq_id in seq_ids):
                continue  # accepted work runs to completion
            for seq_id in list(seq_ids):
                self._drop(self.sequences[seq_id])
            outputs.append(RequestFailure(request_id, DeadlineExceeded(
                f"request {request_id} was still queued at its deadline")))
        return outputs

    def _update(self, scheduled: list[ScheduledChunk], result: ModelRunnerOutput
                ) -> list[StepOutput]:
        self.scheduler.on_step_done(scheduled)
        outputs: list[StepOutput] = []
        for seq_id, draw in result.draws.items():
            seq = self.sequences.get(seq_id)
            if seq is None:
                continue  # its request failed earlier in this loop
            try:
                if isinstance(draw, SamplingFailure):
                    raise draw.error
                chunk = self.outputs.process(seq, draw)
            except Exception as exc:  # noqa: BLE001 - sampling/detokenizing: this request alone
                outputs += self._error_chunks(seq.request, exc)
                continue
            if chunk.finish_reason is not None:
                self._drop(seq)
            outputs.append(chunk)
        return outputs

    def _error_chunks(self, request: GenerationRequest, exc: BaseException
                      ) -> list[StepOutput]:
        """End a request that failed inside a step: each of its unfinished choices finishes
        with ``error``, its blocks are freed, and the rest of the batch carries on."""
        logger.error("request %s failed inside an engine step (%s: %s); the rest of the batch "
                     "carries on", request.request_id, type(exc).__name__, exc,
                     exc_info=(type(exc), exc, exc.__traceback__))
        seq_ids = self.request_sequences.get(request.request_id)
        if seq_ids is None:  # never registered: all its choices are unfinished
            return [GenerationChunk(request_id=request.request_id, index=i, text="",
                                    token_ids=(), finish_reason="error",
                                    prompt_tokens=len(request.prompt_token_ids))
                    for i in range(request.params.n)]
        return [self._finish(self.sequences[seq_id], "error") for seq_id in list(seq_ids)]

    def _finish(self, seq: SequenceState, reason: FinishReason) -> GenerationChunk:
        self._drop(seq)
        return self.outputs.finished(seq, reason)

    def _drop(self, seq: SequenceState) -> None:
        if not self.scheduler.abort(seq.seq_id):
            logger.debug("sequence %s was not scheduled", seq.seq_id)
        del self.sequences[seq.seq_id]
        siblings = self.request_sequences.get(seq.request.request_id)
        if siblings is not None:
            siblings.remove(seq.seq_id)
            if not siblings:
                del self.request_sequences[seq.request.request_id]

    def drop_all(self) -> None:
        """Free every sequence and forget queued adds (after a step failed as a whole)."""
        with self._lock:
            for request_id in list(self.request_sequences):
                for seq_id in list(self.request_sequences.get(request_id, ())):
                    self._drop(self.sequences[seq_id])
            self._pending_adds.clear()

    # Whole runs -----------------------------------------------------------------------
    def run_to_completion(self, requests: Iterable[GenerationRequest]
                          ) -> list[CompletedChoice]:
        """Synchronously run requests to the end; choices in request order, then index."""
        order: list[GenerationRequest] = list(requests)
        for request in order:
            self.add(request)
        texts: dict[tuple[str, int], list[str]] = {}
        ids: dict[tuple[str, int], list[int]] = {}
        finish: dict[tuple[str, int], FinishReason] = {}
        while self.scheduler.has_work or self._pending_aborts:
            for chunk in self.step():
                if isinstance(chunk, RequestFailure):
                    continue  # its choices end as "abort" below
                key = (chunk.request_id, chunk.index)
                texts.setdefault(key, []).append(chunk.text)
                ids.setdefault(key, []).extend(chunk.token_ids)
                if chunk.finish_reason is not None:
                    finish[key] = chunk.finish_reason
        return [
            CompletedChoice(r.request_id, i, "".join(texts.get((r.request_id, i), [])),
                            tuple(ids.get((r.request_id, i), [])),
                            finish.get((r.request_id, i), "abort"), len(r.prompt_token_ids))
            for r in order for i in range(r.params.n)
        ]

    def warm_up(self, prompt_tokens: int = 256) -> None:
        """Run one short synthetic request before serving: the first real request then finds
        warm kernels, and :meth:`stats` reports measured drain and prefill rates from the
        start (the router's shedding needs them). Call before the asyncio loop starts."""
        length = max(1, min(prompt_tokens, self.scheduler.config.max_num_batched_tokens,
                            self.max_model_len - 2))
        text_ids = self.tokenizer.encode("The rolling buffer keeps the last W positions.")
        ids = tuple((text_ids * (length // max(1, len(text_ids)) + 1))[:length])
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        self.run_to_completion([GenerationRequest("ringserve-warm-up", ids, params)])
        release_omp_threads()  # see model/omp_threads.py

    # Load figures -----------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        """The synchronous core is healthy while it exists (the async layer can die)."""
        return True

    def stats(self) -> EngineStats:
        """A snapshot of the engine's load (waits at most for a step's bookkeeping)."""
        with self._lock:
            pending = list(self._pending_adds)
            # sequences: the scheduler's waiting ones, and n per request not yet handed to it
            waiting_sequences = len(self.scheduler.waiting) + sum(r.params.n for r in pending)
            waiting_tokens = self.scheduler.waiting_tokens + sum(
                len(r.prompt_token_ids) * r.params.n for r in pending)
            running = len(self.scheduler.running)
            window = self.window_tokens
            past_window = sum(1 for s in self.scheduler.running.values()
                              if s.num_computed > window)  # cached past W
            free_blocks = self.cache.pool.num_free
            preemptions = self.scheduler.preemptions_total
            samples, prefill_samples, totals, recent = self.step_metrics.snapshot()
        rate, prefill_rate = StepMetrics.rates(samples, prefill_samples)
        return EngineStats(
            waiting_sequences=waiting_sequences,
            waiting_tokens=waiting_tokens,
            running_sequences=running,
            free_slots=max(0, self.scheduler.config.max_num_seqs - running),
            total_slots=self.scheduler.config.max_num_seqs,
            free_blocks=free_blocks,
            total_blocks=self.cache.num_blocks,
            block_size=self.cache.block_size,
            blocks_per_sequence_max=self.cache.table_len,
            preemptions_total=preemptions,
            tokens_per_s=rate,
            prefill_tokens_per_s=prefill_rate,
            kv_cache_bytes=self.cache.total_bytes,
            kv_cache_used_bytes=self.cache.used_bytes,
            healthy=self.healthy,
            window_tokens=window,
            sequences_past_window=past_window,
            prompt_tokens_total=totals.prompt_tokens,
            generated_tokens_total=totals.generated_tokens,
            ring_rows_overwritten_total=totals.ring_rows_overwritten,
            recent_steps=recent,
        )
