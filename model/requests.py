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
class SequenceTiming:
    """How one finished choice spent its time in the engine (``time.monotonic()`` deltas).

    Carried by the choice's last chunk, for the replica's latency histograms: queue (added to
    first scheduled), prefill (first scheduled to first token), decode (first token to last).
    """

    queue_s: float
    prefill_s: float
    decode_s: float
    context_tokens: int  # prompt + generated tokens at the end
    window_tokens: int  # W: rows per sequence of the rolling KV buffer


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
    timing: SequenceTiming | None = None  # on a choice's last chunk when the engine ran it


@dataclass(frozen=True)
class StepRecord:
    """What one engine step ran, for the step histograms (``index`` counts steps from 1)."""

    index: int
    batch_size: int  # sequences with a chunk in the step
    tokens: int  # tokens the step ran (prompt chunks + decodes)
    seconds: float  # model run + sampling + bookkeeping


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of an engine's load: the one load record, for routing and load shedding.

    It travels unchanged from the engine to the router's admission control (inside the
    replica's ``app.load.ReplicaLoad``), the replica's metrics and the router's ``/load``, each
    figure under the one name it has here. Counts are of sequences, as the cache holds them: a
    request of n choices is n sequences.
    """

    waiting_sequences: int  # added and not yet holding a cache slot
    waiting_tokens: int  # prompt tokens not yet prefilled, over waiting and running sequences
    running_sequences: int  # holding cache blocks
    free_slots: int  # sequences that may still start: max_num_seqs - running
    total_slots: int  # max_num_seqs
    tokens_per_s: float  # measured throughput (prefill + decode tokens) over a recent window
    prefill_tokens_per_s: float  # measured prompt tokens/s in steps that ran prompt chunks
    kv_cache_bytes: int
    kv_cache_used_bytes: int
    healthy: bool
    # The rolling buffer made visible: W, running sequences whose context has passed W
    # (attention sees only their last W tokens), and ring rows reused so far: the ring of a
    # sequence is R*B rows (R blocks of B), so position i >= R*B takes the row of position
    # i - R*B (long out of the window); counted per position, once per sequence.
    window_tokens: int = 0
    sequences_past_window: int = 0
    ring_rows_overwritten_total: int = 0
    prompt_tokens_total: int = 0  # prompt tokens prefilled since start
    generated_tokens_total: int = 0  # tokens sampled since start
    recent_steps: tuple[StepRecord, ...] = ()  # the last few steps, oldest first
    # The paged cache: blocks of block_size positions; a sequence holds at most
    # blocks_per_sequence_max (R); preemptions_total counts sequences sent back for recompute.
    free_blocks: int = 0
    total_blocks: int = 0
    block_size: int = 0
    blocks_per_sequence_max: int = 0
    preemptions_total: int = 0
