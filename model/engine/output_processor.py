"""OutputProcessor: sampled tokens in, the chunks callers stream out.

Per sampled token it appends to its sequence, detokenizes incrementally, applies stop tokens,
stop strings and the length limit, and decides the finish reason; a finishing chunk carries
the text the detokenizer and stop checker still held, and where the sequence spent its time.
It never touches the scheduler or the cache: the core frees a finished sequence.
"""

from __future__ import annotations

import time

from model.detokenizer import IncrementalDetokenizer
from model.engine.types import SampledToken, SequenceState
from model.requests import FinishReason, GenerationChunk, GenerationRequest, SequenceTiming
from model.stop import StopChecker, is_stop_token
from model.tokenizers import Tokenizer


class OutputProcessor:
    """Turns draws into :class:`GenerationChunk` objects for one tokenizer."""

    def __init__(self, tokenizer: Tokenizer, window_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.window_tokens = window_tokens  # the cache's rows per sequence, for the timing

    def detokenizer_for(self, request: GenerationRequest) -> IncrementalDetokenizer:
        """A fresh detokenizer, primed with the prompt's tail when the output continues it
        (a completion's first token may merge with the prompt's last characters)."""
        prompt_ids = request.prompt_token_ids[-8:] if request.continues_prompt else ()
        return IncrementalDetokenizer(self.tokenizer, prompt_ids=prompt_ids)

    @staticmethod
    def stop_checker_for(request: GenerationRequest) -> StopChecker:
        return StopChecker(request.params.stop)

    def process(self, seq: SequenceState, draw: SampledToken) -> GenerationChunk:
        """Append a sampled token to its sequence: stop checks, text, finish. The chunk's
        ``finish_reason`` is set when this token ends the sequence."""
        params = seq.request.params
        seq.token_ids.append(draw.token_id)
        seq.output_ids.append(draw.token_id)
        seq.last_token_at = time.monotonic()
        seq.first_token_at = seq.first_token_at or seq.last_token_at
        finish: FinishReason | None = None
        text = ""
        if is_stop_token(draw.token_id, params, self.tokenizer.eos_token_ids):
            finish = "stop"
        else:
            text, stopped = seq.stop_checker.push(seq.detokenizer.push(draw.token_id))
            if stopped:
                finish = "stop"
        if finish is None and len(seq.output_ids) >= params.max_tokens:
            finish = "length"
        has_logprobs = draw.logprob is not None
        return GenerationChunk(
            request_id=seq.request.request_id, index=seq.index,
            text=text + (_finish_tail(seq) if finish is not None else ""),
            token_ids=(draw.token_id,),
            logprobs=(draw.logprob,) if draw.logprob is not None else (),
            top_logprobs=(draw.top_logprobs,) if has_logprobs else (),
            prompt_tokens=seq.prompt_len, completion_tokens=len(seq.output_ids),
            finish_reason=finish, timing=self.timing(seq) if finish is not None else None)

    def finished(self, seq: SequenceState, reason: FinishReason) -> GenerationChunk:
        """The closing chunk of a sequence that ends without a token (abort, error)."""
        return GenerationChunk(request_id=seq.request.request_id, index=seq.index, text="",
                               token_ids=(), finish_reason=reason, prompt_tokens=seq.prompt_len,
                               completion_tokens=len(seq.output_ids), timing=self.timing(seq))

    def timing(self, seq: SequenceState) -> SequenceTiming:
        """Where a finishing sequence spent its time (phases it never reached count 0)."""
        now = time.monotonic()
        scheduled = seq.scheduled_at or now
        first = seq.first_token_at or now
        return SequenceTiming(
            queue_s=scheduled - seq.added_at, prefill_s=max(0.0, first - scheduled),
            decode_s=max(0.0, (seq.last_token_at or first) - first),
            context_tokens=len(seq.token_ids), window_tokens=self.window_tokens)


def _finish_tail(seq: SequenceState) -> str:
    """Text still held by the detokenizer and stop checker when a sequence ends."""
    if seq.stop_checker.stopped:
        return ""
    text, _ = seq.stop_checker.push(seq.detokenizer.flush())
    return text + seq.stop_checker.flush()
