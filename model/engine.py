"""The engine: scheduler + KV cache pool + model runner + sampler, stepping in a loop.

``step()`` reads as schedule -> execute -> update. The synchronous core (``add``, ``step``,
``run_to_completion``) serves the CLI and tests; the asyncio layer (``generate``) runs steps in
one worker thread and streams :class:`GenerationChunk` objects to each caller. Cancelling a
caller's iterator, or ``abort(id)``, frees its slot at the start of the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.config import ModelConfig
from model.default_model import default_model_path, model_name_for
from model.detokenizer import IncrementalDetokenizer
from model.engine_args import EngineArgs
from model.kv_cache import CacheGeometry, KVCachePool, SequenceChunk, is_decode
from model.omp_threads import release_omp_threads
from model.quantization import resolve_quantization
from model.requests import (
    EngineStats,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    SequenceTiming,
    StepRecord,
    TokenLogprob,
)
from model.sampler import SamplingRow, sample
from model.sampling_params import SamplingParams
from model.scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from model.stop import StopChecker, is_stop_token
from model.tokenizers import Tokenizer, load_tokenizer
from model.transformer import Transformer
from model.weights import load_weights

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 2 * 1024**3
DEFAULT_MAX_MODEL_LEN = 4096
# tokens/s is the drain rate while busy: tokens over the busy time of the steps that ran in
# this many recent seconds (idle time does not count, so it is right after a quiet spell).
# The last RATE_MIN_STEPS steps (and the last RATE_MIN_STEPS that ran prompt chunks) always
# count, however old: an engine that has been idle keeps what it measured last.
THROUGHPUT_WINDOW_S = 10.0
RATE_MIN_STEPS = 16
RECENT_STEPS = 256  # step records kept for the replica's step histograms (it polls often)
# An idle engine thread re-checks every this many seconds whether its event loop is gone.
IDLE_WAKE_S = 0.5


class EngineRequestError(ValueError):
    """A request the engine refuses before it takes a slot (message says why)."""


class DeadlineExceeded(TimeoutError):
    """A request's deadline passed while it was still waiting for a slot."""


class EngineShuttingDown(RuntimeError):
    """The engine is draining and takes no new requests."""


@dataclass
class _Sequence:
    """Engine-side state of one choice of one request."""

    seq_id: str
    request: GenerationRequest
    index: int
    token_ids: list[int]  # prompt + generated
    detokenizer: IncrementalDetokenizer
    stop_checker: StopChecker
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    admitted: bool = False
    # time.monotonic() marks for the request latency figures (SequenceTiming)
    added_at: float = field(default_factory=time.monotonic)
    scheduled_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)


@dataclass(frozen=True)
class _StepSample:
    """What one step did, for the drain-rate figures in :meth:`Engine.stats`."""

    end: float  # time.monotonic() when the step ended
    seconds: float  # how long its model run + sampling + bookkeeping took
    tokens: int  # tokens it ran (prompt chunks + decodes)
    prefill_tokens: int  # of those, prompt tokens


@dataclass(frozen=True)
class _StepFigures:
    """What a scheduled step will run, counted before it runs (sequences may end in it)."""

    batch_size: int
    prompt_tokens: int  # tokens of the chunks that lie inside their sequence's prompt
    ring_rows_overwritten: int  # positions >= W written (each overwrites a ring row)


@dataclass(frozen=True)
class RequestFailure:
    """A step's verdict that a whole request ends with an error (delivered to its caller)."""

    request_id: str
    error: BaseException


StepOutput = GenerationChunk | RequestFailure


@dataclass(frozen=True)
class CompletedChoice:
    """A whole choice, gathered from its chunks (the synchronous API's result)."""

    request_id: str
    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    prompt_tokens: int


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is fp32 on CPU (bf16 matmuls are much slower on AVX2) and bf16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be auto or one of {', '.join(dtypes)}, got {name!r}")
    return dtypes[name]


class Engine:
    """Serves many requests at once on one model; see the module docstring."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, cache: KVCachePool,
                 scheduler_config: SchedulerConfig, max_model_len: int,
                 model_name: str = "model") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.cache = cache
        self.scheduler = Scheduler(scheduler_config, cache.allocator)
        self.max_model_len = max_model_len
        self.model_name = model_name
        self._sequences: dict[str, _Sequence] = {}
        self._requests: dict[str, list[str]] = {}  # request id -> its sequence ids
        self._pending_adds: deque[GenerationRequest] = deque()
        self._pending_aborts: deque[str] = deque()
        self._throughput: deque[_StepSample] = deque()  # recent steps
        self._prefill_throughput: deque[_StepSample] = deque()  # recent steps with prompt chunks
        self._recent_steps: deque[StepRecord] = deque(maxlen=RECENT_STEPS)
        self._steps_total = 0
        self._prompt_tokens_total = 0
        self._generated_tokens_total = 0
        self._ring_rows_overwritten_total = 0
        self._lock = threading.Lock()  # guards scheduler state between step() and add/abort
        # asyncio side
        self._queues: dict[str, asyncio.Queue[GenerationChunk | BaseException]] = {}
        self._loop_task: asyncio.Future[None] | None = None  # the engine thread's run
        self._event_loop: asyncio.AbstractEventLoop | None = None  # where outputs are delivered
        self._generation = 0  # bumped to retire an engine thread
        self._wake = threading.Event()  # set by add/abort/shutdown; the idle thread waits on it
        self._executor: ThreadPoolExecutor | None = None
        self._draining = False
        self._loop_error: BaseException | None = None

    # Construction ---------------------------------------------------------------------
    @classmethod
    def from_args(cls, args: EngineArgs) -> Engine:
        """Load weights and tokenizer from ``args.model`` (the embedded model when None)."""
        if args.torch_threads is not None:
            torch.set_num_threads(args.torch_threads)
        is_default = args.model in (None, "", "default")
        path = default_model_path() if is_default else Path(str(args.model))
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        quantization = resolve_quantization(args.quantization, device, dtype)
        loaded = load_weights(path, progress=args.progress, quantization=quantization)
        config: ModelConfig = loaded.config
        if args.full_attention:
            config = config.with_window(None)
        elif args.window is not None:
            config = config.with_window(args.window)
        model = Transformer.from_tensors(config, loaded.tensors, dtype=dtype, device=device,
                                         quantization=quantization, scales=loaded.scales)
        del loaded
        tokenizer = load_tokenizer(path)
        max_model_len = args.max_model_len or min(config.max_position_embeddings,
                                                  DEFAULT_MAX_MODEL_LEN)
        geometry = CacheGeometry.for_model(config, max_model_len, dtype)
        budget = args.kv_cache_memory or _default_kv_budget(device)
        num_slots = min(args.max_num_seqs, geometry.slots_for_budget(budget))
        if num_slots < 1:
            raise EngineRequestError(
                f"KV cache budget {budget} bytes holds no sequence: one slot needs "
                f"{geometry.bytes_per_slot} bytes (lower max_model_len or raise kv_cache_memory)")
        cache = KVCachePool(geometry, num_slots, dtype, device)
        scheduler_config = SchedulerConfig(
            max_num_seqs=num_slots,
            max_num_batched_tokens=max(args.max_num_batched_tokens, num_slots),
            prefill_chunk=args.prefill_chunk or args.max_num_batched_tokens,
        )
        name = model_name_for(args.model)
        engine = cls(model, tokenizer, cache, scheduler_config, max_model_len, name)
        release_omp_threads()  # the loading thread's workers would throttle the stepping one's
        return engine

    @property
    def config(self) -> ModelConfig:
        """The served model's config (window override applied)."""
        return self.model.config

    # Synchronous core -----------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        """Refuse what can never run, before it takes a slot."""
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
        if request.params.n > self.cache.num_slots:
            raise EngineRequestError(
                f"n={request.params.n} exceeds the {self.cache.num_slots} sequences this "
                "engine can run at once")

    def add(self, request: GenerationRequest) -> None:
        """Validate and queue a request (its n choices become n sequences)."""
        self.validate(request)
        if request.request_id in self._requests:
            raise EngineRequestError(f"request id {request.request_id!r} is already running")
        with self._lock:
            self._add_locked(request)

    def _add_locked(self, request: GenerationRequest) -> None:
        # Build every sequence first (seeding a generator or priming a detokenizer can raise on
        # input that slipped past validation); only then register them, so a failure leaves
        # no trace of the request.
        seqs = []
        for index in range(request.params.n):
            seed = request.params.seed
            generator = None if seed is None else torch.Generator().manual_seed(seed + index)
            seqs.append(_Sequence(
                seq_id=f"{request.request_id}#{index}", request=request, index=index,
                token_ids=list(request.prompt_token_ids),
                detokenizer=IncrementalDetokenizer(
                    self.tokenizer,
                    prompt_ids=request.prompt_token_ids[-8:] if request.continues_prompt else ()),
                stop_checker=StopChecker(request.params.stop), generator=generator))
        for seq in seqs:
            self._sequences[seq.seq_id] = seq
            self.scheduler.add(seq.seq_id, len(request.prompt_token_ids))
        self._requests[request.request_id] = [seq.seq_id for seq in seqs]

    def abort(self, request_id: str) -> None:
        """Cancel a request; its slots are freed at the start of the next step."""
        self._pending_aborts.append(request_id)
        self._wake.set()

    @property
    def has_work(self) -> bool:
        """Anything queued, running, or waiting to be added or aborted."""
        return bool(self._pending_adds or self._pending_aborts or self.scheduler.has_work)

    def step(self) -> list[StepOutput]:
        """One engine step: schedule -> execute -> update. Returns the chunks it produced."""
        with self._lock:
            outputs = self._apply_pending()
            outputs += self._expire_deadlines()
            scheduled = self.scheduler.schedule()
            started = time.monotonic()
            for chunk in scheduled:
                seq = self._sequences[chunk.seq_id]
                seq.admitted = True
                seq.scheduled_at = seq.scheduled_at or started
            figures = self._step_figures(scheduled)
        if not scheduled:
            return outputs
        sampled = self._execute(scheduled)
        with self._lock:
            outputs += self._update(scheduled, sampled)
            self._record_step(started, scheduled, figures, len(sampled))
        self._record_throughput(started, scheduled)
        return outputs

    def _step_figures(self, scheduled: list[ScheduledChunk]) -> _StepFigures:
        window = self.cache.buffer_len
        prompt = overwritten = 0
        for chunk in scheduled:
            end = chunk.start_pos + chunk.num_tokens
            prompt += max(0, min(end, self._sequences[chunk.seq_id].prompt_len)
                          - chunk.start_pos)
            overwritten += max(0, end - max(chunk.start_pos, window))
        return _StepFigures(len(scheduled), prompt, overwritten)

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
            for seq_id in list(self._requests.get(request_id, ())):
                outputs.append(self._finish(self._sequences[seq_id], "abort", ""))
        return outputs

    def _expire_deadlines(self) -> list[StepOutput]:
        """Requests none of whose sequences got a slot before their deadline are dropped."""
        now = time.monotonic()
        expired = {s.request.request_id for s in self._sequences.values()
                   if s.request.deadline is not None and s.request.deadline < now}
        outputs: list[StepOutput] = []
        for request_id in expired:
            seq_ids = self._requests[request_id]
            if any(self._sequences[seq_id].admitted for seq_id in seq_ids):
                continue  # accepted work runs to completion
            for seq_id in list(seq_ids):
                self._drop(self._sequences[seq_id])
            outputs.append(RequestFailure(request_id, DeadlineExceeded(
                f"request {request_id} was still queued at its deadline")))
        return outputs

    def _execute(self, scheduled: list[ScheduledChunk]) -> dict[str, tuple | BaseException]:
        """Run the model on the scheduled chunks and sample where a chunk asks for it.

        Per sampled sequence: (token id, logprob, top logprobs), or the exception that sampling
        it raised (that request then fails alone in ``_update``).
        """
        tokens: list[int] = []
        for chunk in scheduled:
            seq = self._sequences[chunk.seq_id]
            tokens.extend(seq.token_ids[chunk.start_pos:chunk.start_pos + chunk.num_tokens])
        device = self.model.device
        token_ids = torch.tensor(tokens, dtype=torch.long, device=device)  # [N]
        chunks = [SequenceChunk(c.slot, c.start_pos, c.num_tokens) for c in scheduled]
        logits = self.model(token_ids, chunks, self.cache)  # [num_chunks, V]
        rows_index = [i for i, c in enumerate(scheduled) if c.samples]
        if not rows_index:
            return {}
        seqs = [self._sequences[scheduled[i].seq_id] for i in rows_index]
        rows = [SamplingRow(params=s.request.params, generator=s.generator,
                            output_token_ids=s.output_ids,
                            prompt_token_ids=s.request.prompt_token_ids) for s in seqs]
        # A seeded row's generator must be where it was should the batched draw fail midway:
        # the rows are then drawn again one by one (see _sample_alone).
        states = [None if s.generator is None else s.generator.get_state() for s in seqs]
        try:
            result = sample(logits[rows_index], rows)
        except Exception:  # noqa: BLE001 - find the row(s) at fault, sample the rest
            logger.warning("batched sampling failed; sampling the step's rows one by one",
                           exc_info=True)
            return self._sample_alone(logits, rows_index, seqs, rows, states)
        return {
            s.seq_id: (result.token_ids[i], result.logprobs[i],
                       result.top_logprobs[i] if result.top_logprobs else ())
            for i, s in enumerate(seqs)
        }

    def _sample_alone(self, logits: torch.Tensor, rows_index: list[int], seqs: list[_Sequence],
                      rows: list[SamplingRow], states: list[torch.Tensor | None]
                      ) -> dict[str, tuple | BaseException]:
        """Each row drawn alone: a row that fails gets its exception, the others their token
        (a seeded row draws the same token alone as in a batch, see model/sampler.py)."""
        out: dict[str, tuple | BaseException] = {}
        for i, (seq, row, state) in enumerate(zip(seqs, rows, states, strict=True)):
            if seq.generator is not None and state is not None:
                seq.generator.set_state(state)
            try:
                one = sample(logits[rows_index[i]:rows_index[i] + 1], [row])
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                out[seq.seq_id] = exc
                continue
            out[seq.seq_id] = (one.token_ids[0], one.logprobs[0],
                               one.top_logprobs[0] if one.top_logprobs else ())
        return out

    def _update(self, scheduled: list[ScheduledChunk], sampled: dict[str, tuple | BaseException]
                ) -> list[StepOutput]:
        self.scheduler.on_step_done(scheduled)
        outputs: list[StepOutput] = []
        for seq_id, drawn in sampled.items():
            seq = self._sequences.get(seq_id)
            if seq is None:
                continue  # its request failed earlier in this loop
            try:
                if isinstance(drawn, BaseException):
                    raise drawn
                outputs.append(self._advance(seq, *drawn))
            except Exception as exc:  # noqa: BLE001 - sampling/detokenizing: this request alone
                outputs += self._error_chunks(seq.request, exc)
        return outputs

    def _advance(self, seq: _Sequence, token_id: int, logprob: TokenLogprob | None,
                 top: tuple[TokenLogprob, ...]) -> GenerationChunk:
        """Append a sampled token to its sequence: stop checks, text, finish."""
        params = seq.request.params
        seq.token_ids.append(token_id)
        seq.output_ids.append(token_id)
        seq.last_token_at = time.monotonic()
        seq.first_token_at = seq.first_token_at or seq.last_token_at
        finish: FinishReason | None = None
        text = ""
        if is_stop_token(token_id, params, self.tokenizer.eos_token_ids):
            finish = "stop"
        else:
            text, stopped = seq.stop_checker.push(seq.detokenizer.push(token_id))
            if stopped:
                finish = "stop"
        if finish is None and len(seq.output_ids) >= params.max_tokens:
            finish = "length"
        chunk = GenerationChunk(
            request_id=seq.request.request_id, index=seq.index, text=text,
            token_ids=(token_id,),
            logprobs=(logprob,) if logprob is not None else (),
            top_logprobs=(tuple(top),) if logprob is not None else (),
            prompt_tokens=seq.prompt_len, completion_tokens=len(seq.output_ids))
        if finish is not None:
            tail = _finish_tail(seq, finish)
            self._drop(seq)
            chunk = GenerationChunk(**{**chunk.__dict__, "text": chunk.text + tail,
                                       "finish_reason": finish, "timing": self._timing(seq)})
        return chunk

    def _error_chunks(self, request: GenerationRequest, exc: BaseException
                      ) -> list[StepOutput]:
        """End a request that failed inside a step: each of its unfinished choices finishes
        with ``error``, its slots are freed, and the rest of the batch carries on."""
        logger.error("request %s failed inside an engine step (%s: %s); the rest of the batch "
                     "carries on", request.request_id, type(exc).__name__, exc,
                     exc_info=(type(exc), exc, exc.__traceback__))
        seq_ids = self._requests.get(request.request_id)
        if seq_ids is None:  # never registered: all its choices are unfinished
            return [GenerationChunk(request_id=request.request_id, index=i, text="",
                                    token_ids=(), finish_reason="error",
                                    prompt_tokens=len(request.prompt_token_ids))
                    for i in range(request.params.n)]
        return [self._finish(self._sequences[seq_id], "error", "") for seq_id in list(seq_ids)]

    def _finish(self, seq: _Sequence, reason: FinishReason, text: str) -> GenerationChunk:
        self._drop(seq)
        return GenerationChunk(request_id=seq.request.request_id, index=seq.index, text=text,
                               token_ids=(), finish_reason=reason, prompt_tokens=seq.prompt_len,
                               completion_tokens=len(seq.output_ids), timing=self._timing(seq))

    def _timing(self, seq: _Sequence) -> SequenceTiming:
        """Where a finishing sequence spent its time (phases it never reached count 0)."""
        now = time.monotonic()
        scheduled = seq.scheduled_at or now
        first = seq.first_token_at or now
        return SequenceTiming(
            queue_s=scheduled - seq.added_at, prefill_s=max(0.0, first - scheduled),
            decode_s=max(0.0, (seq.last_token_at or first) - first),
            context_tokens=len(seq.token_ids), window_tokens=self.cache.buffer_len)

    def _drop(self, seq: _Sequence) -> None:
        if not self.scheduler.abort(seq.seq_id):
            logger.debug("sequence %s was not scheduled", seq.seq_id)
        del self._sequences[seq.seq_id]
        siblings = self._requests.get(seq.request.request_id)
        if siblings is not None:
            siblings.remove(seq.seq_id)
            if not siblings:
                del self._requests[seq.request.request_id]

    def _record_throughput(self, started: float, scheduled: list[ScheduledChunk]) -> None:
        now = time.monotonic()
        prefill = sum(c.num_tokens for c in scheduled if not is_decode(c.start_pos, c.num_tokens))
        sample = _StepSample(now, now - started, sum(c.num_tokens for c in scheduled), prefill)
        self._throughput.append(sample)
        if prefill:
            self._prefill_throughput.append(sample)
        for samples in (self._throughput, self._prefill_throughput):
            while len(samples) > RATE_MIN_STEPS and samples[0].end < now - THROUGHPUT_WINDOW_S:
                samples.popleft()

    def _record_step(self, started: float, scheduled: list[ScheduledChunk],
                     figures: _StepFigures, sampled: int) -> None:
        """Count the step for stats() (called under the lock: stats() reads these)."""
        self._steps_total += 1
        self._prompt_tokens_total += figures.prompt_tokens
        self._generated_tokens_total += sampled
        self._ring_rows_overwritten_total += figures.ring_rows_overwritten
        self._recent_steps.append(StepRecord(
            index=self._steps_total, batch_size=figures.batch_size,
            tokens=sum(c.num_tokens for c in scheduled), seconds=time.monotonic() - started))

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
    def stats(self) -> EngineStats:
        """A snapshot of the engine's load (waits at most for a step's bookkeeping)."""
        with self._lock:
            pending = list(self._pending_adds)
            waiting_requests = len(self.scheduler.waiting) + len(pending)
            waiting_tokens = self.scheduler.waiting_tokens + sum(
                len(r.prompt_token_ids) * r.params.n for r in pending)
            running = len(self.scheduler.running)
            samples = list(self._throughput)
            prefill_samples = list(self._prefill_throughput)
            window = self.cache.buffer_len
            past_window = sum(1 for s in self.scheduler.running.values()
                              if s.num_computed > window)  # cached past W: ring wrapped
            totals = (self._prompt_tokens_total, self._generated_tokens_total,
                      self._ring_rows_overwritten_total)
            recent = tuple(self._recent_steps)
        busy = sum(s.seconds for s in samples)
        rate = sum(s.tokens for s in samples) / busy if busy > 0 else 0.0
        # prefill rate: prompt tokens over the time of the steps that ran prompt chunks (a
        # step that also ran decodes counts whole, so this errs on the slow side)
        prefill_busy = sum(s.seconds for s in prefill_samples)
        prefill_rate = (sum(s.prefill_tokens for s in prefill_samples) / prefill_busy
                        if prefill_busy > 0 else 0.0)
        return EngineStats(
            waiting_requests=waiting_requests,
            waiting_tokens=waiting_tokens,
            running_sequences=running,
            free_slots=self.cache.allocator.num_free,
            total_slots=self.cache.num_slots,
            tokens_per_s=rate,
            prefill_tokens_per_s=prefill_rate,
            kv_cache_bytes=self.cache.total_bytes,
            kv_cache_used_bytes=self.cache.used_bytes,
            healthy=self.healthy,
            window_tokens=window,
            sequences_past_window=past_window,
            prompt_tokens_total=totals[0],
            generated_tokens_total=totals[1],
            ring_rows_overwritten_total=totals[2],
            recent_steps=recent,
        )

    @property
    def healthy(self) -> bool:
        """False once the background loop has died."""
        return self._loop_error is None and not (
            self._loop_task is not None and self._loop_task.done() and not self._draining)

    # Asyncio layer ----------------------------------------------------------------------
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
                    self._drop_all()
                    _call_soon(loop, self._notify_all, exc)
                    continue
                if outputs:
                    _call_soon(loop, self._deliver, outputs)
        except BaseException as exc:
            self._loop_error = exc
            self._drop_all()
            _call_soon(loop, self._notify_all, exc)
            raise

    def _deliver(self, outputs: list[StepOutput]) -> None:
        """On the event loop: hand a step's outputs to their callers' queues."""
        for output in outputs:
            queue = self._queues.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output.error if isinstance(output, RequestFailure) else output)

    def _drop_all(self) -> None:
        with self._lock:
            for request_id in list(self._requests):
                for seq_id in list(self._requests.get(request_id, ())):
                    self._drop(self._sequences[seq_id])
            self._pending_adds.clear()

    def _notify_all(self, exc: BaseException) -> None:
        """On the event loop: every waiting caller learns that its request failed."""
        for queue in self._queues.values():
            queue.put_nowait(RuntimeError(f"engine step failed: {exc}"))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream a request's chunks; closing the iterator early aborts the request."""
        if self._draining:
            raise EngineShuttingDown("the engine is shutting down")
        self.validate(request)
        if request.request_id in self._queues:
            raise EngineRequestError(f"request id {request.request_id!r} is already running")
        self.start()
        queue: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()
        self._queues[request.request_id] = queue
        self._pending_adds.append(request)
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
            for request_id in list(self._requests) + [r.request_id for r in self._pending_adds]:
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


def _finish_tail(seq: _Sequence, reason: FinishReason) -> str:
    """Text still held by the detokenizer and stop checker when a sequence ends."""
    if seq.stop_checker.stopped:
        return ""
    text, _ = seq.stop_checker.push(seq.detokenizer.flush())
    return text + seq.stop_checker.flush()


def _default_kv_budget(device: torch.device) -> int:
    if device.type == "cuda":  # pragma: no cover - CUDA only
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    return DEFAULT_CPU_KV_BYTES
