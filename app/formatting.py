"""Engine chunks -> OpenAI response pieces: per-choice accumulation, logprobs, usage."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from app.schemas import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    FinishReason,
    TopLogprob,
    Usage,
)
from model.requests import GenerationChunk, TokenLogprob


class TokenizerLike(Protocol):
    """What the router needs of model.tokenizers.Tokenizer."""

    eos_token_ids: frozenset[int]
    vocab_size: int

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def token_bytes(self, token_id: int) -> bytes: ...
    def apply_chat_template(self, messages: list[dict[str, str]], *,
                            add_generation_prompt: bool = True) -> list[int]: ...


def finish_reason(reason: str | None) -> FinishReason | None:
    """OpenAI knows stop and length; an engine abort (replica stopping) reads as stop."""
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"


def token_text(tokenizer: TokenizerLike, token_id: int) -> str:
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


@dataclass
class ChoiceState:
    """Everything one choice has produced so far."""

    index: int
    prompt_tokens: int = 0
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    top_logprobs: list[tuple[TokenLogprob, ...]] = field(default_factory=list)
    finish: str | None = None

    def add(self, chunk: GenerationChunk) -> None:
        self.prompt_tokens = chunk.prompt_tokens or self.prompt_tokens
        self.text.append(chunk.text)
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs)
        self.top_logprobs.extend(chunk.top_logprobs)
        if chunk.finish_reason is not None:
            self.finish = chunk.finish_reason

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def completion_logprobs(tokenizer: TokenizerLike, logprobs: Iterable[TokenLogprob],
                        top: Iterable[tuple[TokenLogprob, ...]], offset: int
                        ) -> CompletionLogprobs:
    """The legacy completions logprobs block (tokens, token_logprobs, top_logprobs, offsets)."""
    out = CompletionLogprobs()
    top_list = list(top)
    for i, lp in enumerate(logprobs):
        text = token_text(tokenizer, lp.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(lp.logprob)
        alternatives: dict[str, float] = {}
        for alt in top_list[i] if i < len(top_list) else ():
            alt_text = token_text(tokenizer, alt.token_id)
            alternatives[alt_text] = max(alt.logprob, alternatives.get(alt_text, alt.logprob))
        out.top_logprobs.append(alternatives or None)
        out.text_offset.append(offset)
        offset += len(text)
    return out


def chat_logprobs(tokenizer: TokenizerLike, logprobs: Iterable[TokenLogprob],
                  top: Iterable[tuple[TokenLogprob, ...]]) -> ChatLogprobs:
    """The chat logprobs block: one entry per token with its top alternatives."""
    top_list = list(top)
    content = []
    for i, lp in enumerate(logprobs):
        raw = tokenizer.token_bytes(lp.token_id)
        alts = [TopLogprob(token=token_text(tokenizer, a.token_id), logprob=a.logprob,
                           bytes=list(tokenizer.token_bytes(a.token_id)))
                for a in (top_list[i] if i < len(top_list) else ())]
        content.append(ChatTokenLogprob(token=raw.decode("utf-8", errors="replace"),
                                        logprob=lp.logprob, bytes=list(raw), top_logprobs=alts))
    return ChatLogprobs(content=content)


def usage(prompt_tokens: int, choices: Iterable[ChoiceState]) -> Usage:
    completion = sum(c.completion_tokens for c in choices)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                 total_tokens=prompt_tokens + completion)


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"
