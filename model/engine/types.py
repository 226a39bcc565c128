"""What the engine's parts hand each other and its callers: plain dataclasses and errors."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from model.detokenizer import IncrementalDetokenizer
from model.requests import FinishReason, GenerationChunk, GenerationRequest, TokenLogprob
from model.stop import StopChecker


class EngineRequestError(ValueError):
    """A request the engine refuses before it takes a slot (message says why)."""


class DeadlineExceeded(TimeoutError):
    """A request's deadline passed while it was still waiting for a slot."""


class EngineShuttingDown(RuntimeError):
    """The engine is draining and takes no new requests."""


@dataclass
class SequenceState:
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
class SampledToken:
    """One sequence's draw in a step: the token, its logprob and the top alternatives (both
    only when the request asked for logprobs)."""

    token_id: int
    logprob: TokenLogprob | None
    top_logprobs: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class SamplingFailure:
    """Sampling one sequence raised: its request then fails alone."""

    error: BaseException


@dataclass(frozen=True)
class ModelRunnerOutput:
    """What one model run produced, per sampled sequence in batch order: its draw, or the
    failure that sampling it raised. Chunks that only filled the cache sample nothing."""

    draws: dict[str, SampledToken | SamplingFailure] = field(default_factory=dict)


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
