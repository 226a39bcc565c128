"""Plain dataclasses the engine exchanges with its callers: requests in, chunks and stats out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from model.sampling_params import SamplingParams

# "error": the request failed inside an engine step (sampling, detokenizing); it ended alone.
FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt, already tokenized, and how to continue it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    deadline: float | None = None  # time.monotonic() after which a still-queued request is dropped
    # True: the output continues the prompt's text (completions; " Paris" keeps its space).
    # False: the output is a new message (chat; decoded as if from scratch).
    continues_prompt: bool = True


@dataclass(frozen=True)
class TokenLogprob:
    """A token id with its log-probability under the model's raw distribution."""

    token_id: int
    logprob: float


@dataclass(frozen=True)
class GenerationChunk:
    """What one engine step produced for one choice of one request (streamed in order)."""

    request_id: str
    index: int  # choice index, 0 .. n-1
    text: str  # new text since the previous chunk (stop strings never appear)
    token_ids: tuple[int, ...]  # new generated token ids since the previous chunk
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token in token_ids when requested
    top_logprobs: tuple[tuple[TokenLogprob, ...], ...] = ()
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # generated so far for this choice


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of an engine's load, for routing and load shedding."""

    waiting_requests: int
    waiting_tokens: int  # prompt tokens not yet prefilled, over waiting and running sequences
    running_sequences: int
    free_slots: int
    total_slots: int
    tokens_per_s: float  # measured throughput (prefill + decode tokens) over a recent window
    prefill_tokens_per_s: float  # measured prompt tokens/s in steps that ran prompt chunks
    kv_cache_bytes: int
    kv_cache_used_bytes: int
    healthy: bool
