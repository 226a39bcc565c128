"""OpenAI's two generation endpoints: a validated body in, OpenAI's response or SSE chunks out.

Per request: tokenize and check the length (:mod:`app.prompts`), build SamplingParams, admit
every prompt through the dispatcher or none (429/503 at once when refused), then either gather
the whole answer or stream it (:mod:`app.streams` merges the tickets' chunks), and assemble
OpenAI's shapes from the choices: completions (one ticket per prompt, choices numbered
``prompt * n + choice``) and chat completions (one ticket).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import Response
from fastapi.responses import StreamingResponse

from app import streams
from app.dispatcher import Dispatcher, Ticket
from app.errors import bad_request
from app.formatting import ChoiceState, chat_logprobs, completion_logprobs, finish_reason, sse
from app.formatting import usage as usage_of
from app.prompts import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    PromptReader,
    check_length,
    sampling_params,
)
from app.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    StreamOptions,
)
from model.requests import GenerationChunk, GenerationRequest

# The last SSE chunk before [DONE] (usage, when the client asked for it), from every choice.
Final = Callable[[list[list[ChoiceState]]], str | None]


class Generation:
    """Serves ``/v1/completions`` and ``/v1/chat/completions`` for one served model."""

    def __init__(self, dispatcher: Dispatcher, prompts: PromptReader,
                 default_deadline_s: float | None) -> None:
        self.dispatcher = dispatcher
        self.prompts = prompts
        self.tokenizer = prompts.tokenizer
        self._default_deadline_s = default_deadline_s

    async def _submit(self, requests: Sequence[GenerationRequest], deadline_s: float | None,
                      stream: bool) -> list[Ticket]:
        """Admit all prompts of one HTTP request, or none of them. Each is refused late (429)
        if it has not started within max_queue_wait_s, unless several prompts share one
        stream (another's events may have been sent by then: app/dispatcher.py)."""
        deadline = deadline_s if deadline_s is not None else self._default_deadline_s
        refuse_late = len(requests) == 1 or not stream
        tickets: list[Ticket] = []
        try:
            for request in requests:
                tickets.append(await self.dispatcher.submit(request, deadline, stream,
                                                            refuse_late))
        except BaseException:
            for ticket in tickets:
                self.dispatcher.cancel(ticket)
            raise
        return tickets

    async def _gather(self, tickets: list[Ticket], response: Response
                      ) -> list[list[ChoiceState]]:
        choices = await streams.gather(tickets, self.dispatcher.cancel)
        response.headers[streams.REPLICA_HEADER] = streams.served_by(tickets)
        response.headers[streams.QUEUE_HEADER] = streams.queue_ms(tickets)
        return choices

    # Completions ------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, model: str, limit: int,
                          response: Response) -> CompletionResponse | StreamingResponse:
        prompts, texts = self.prompts.completion_prompts(body.prompt, limit)
        max_tokens = body.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS
        for ids in prompts:
            check_length(len(ids), max_tokens, limit, "prompt")
        params = sampling_params(body, max_tokens, body.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        requests = [GenerationRequest(f"{rid}-{i}", tuple(ids), params)
                    for i, ids in enumerate(prompts)]
        tickets = await self._submit(requests, body.deadline_s, bool(body.stream))
        created = int(time.time())
        n = body.n
        echoes = texts if body.echo else ["" for _ in texts]
        want_logprobs = body.logprobs is not None
        if body.stream:
            return await streams.stream(
                tickets, self.dispatcher.cancel,
                lambda t, c, s: self._completion_chunk(rid, created, model, t * n + c.index, c,
                                                       s, echoes[t], want_logprobs),
                self._usage(rid, created, model, "text_completion", prompts,
                            body.stream_options))
        states = await self._gather(tickets, response)
        choices = []
        for t, per_ticket in enumerate(states):
            for state in per_ticket:
                lp = (completion_logprobs(self.tokenizer, state.logprobs, state.top_logprobs,
                                          len(echoes[t])) if want_logprobs else None)
                choices.append(CompletionChoice(
                    index=t * n + state.index, text=echoes[t] + "".join(state.text),
                    logprobs=lp, finish_reason=finish_reason(state.finish)))
        return CompletionResponse(
            id=rid, created=created, model=model, choices=choices,
            usage=usage_of(sum(len(p) for p in prompts), [s for st in states for s in st]))

    def _completion_chunk(self, rid: str, created: int, model: str, index: int,
                          chunk: GenerationChunk, state: ChoiceState, echo: str,
                          want_logprobs: bool) -> str:
        text = chunk.text
        if echo and len(state.token_ids) == len(chunk.token_ids):
            text = echo + text  # the first chunk of this choice carries the echoed prompt
        lp = None
        if want_logprobs:
            offset = sum(len(t) for t in state.text[:-1])
            lp = completion_logprobs(self.tokenizer, chunk.logprobs, chunk.top_logprobs, offset)
        payload = CompletionResponse(id=rid, created=created, model=model, choices=[
            CompletionChoice(index=index, text=text, logprobs=lp,
                             finish_reason=finish_reason(chunk.finish_reason))])
        return sse(payload.model_dump_json(exclude={"usage", "system_fingerprint"}))

    # Chat -------------------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest, model: str, limit: int,
                   response: Response) -> ChatCompletionResponse | StreamingResponse:
        ids = self.prompts.chat_prompt(body, limit)
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")
        requested = body.max_completion_tokens or body.max_tokens
        max_tokens = requested if requested is not None else max(1, limit - len(ids))
        check_length(len(ids), max_tokens, limit, "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling_params(body, max_tokens, logprobs)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        request = GenerationRequest(rid, tuple(ids), params, continues_prompt=False)
        tickets = await self._submit([request], body.deadline_s, bool(body.stream))
        created = int(time.time())
        if body.stream:
            return await streams.stream(
                tickets, self.dispatcher.cancel,
                lambda _t, c, s: self._chat_chunk(rid, created, model, c, s,
                                                  bool(body.logprobs)),
                self._usage(rid, created, model, "chat.completion.chunk", [ids],
                            body.stream_options))
        states = (await self._gather(tickets, response))[0]
        choices = [ChatChoice(
            index=s.index, message=AssistantMessage(content="".join(s.text)),
            logprobs=(chat_logprobs(self.tokenizer, s.logprobs, s.top_logprobs)
                      if body.logprobs else None),
            finish_reason=finish_reason(s.finish)) for s in states]
        return ChatCompletionResponse(id=rid, created=created, model=model, choices=choices,
                                      usage=usage_of(len(ids), states))

    def _chat_chunk(self, rid: str, created: int, model: str, chunk: GenerationChunk,
                    state: ChoiceState, want_logprobs: bool) -> str:
        first = len(state.text) == 1
        delta = DeltaMessage(role="assistant" if first else None, content=chunk.text)
        lp = (chat_logprobs(self.tokenizer, chunk.logprobs, chunk.top_logprobs)
              if want_logprobs else None)
        payload = ChatCompletionChunk(id=rid, created=created, model=model, choices=[
            ChatChunkChoice(index=chunk.index, delta=delta, logprobs=lp,
                            finish_reason=finish_reason(chunk.finish_reason))])
        return sse(payload.model_dump_json(exclude={"usage", "system_fingerprint"}))

    # Usage ------------------------------------------------------------------------------
    @staticmethod
    def _usage(rid: str, created: int, model: str, kind: str, prompts: list[list[int]],
               options: StreamOptions | None) -> Final:
        """The stream's usage chunk (``stream_options.include_usage``), else none."""
        if not (options and options.include_usage):
            return lambda _choices: None

        def chunk(choices: list[list[ChoiceState]]) -> str:
            flat = [s for per_ticket in choices for s in per_ticket]
            body: dict[str, Any] = {
                "id": rid, "object": kind, "created": created, "model": model, "choices": [],
                "usage": usage_of(sum(len(p) for p in prompts), flat).model_dump()}
            return sse(ChatCompletionChunk.model_validate(body).model_dump_json()
                       if kind == "chat.completion.chunk"
                       else CompletionResponse.model_validate(body).model_dump_json())

        return chunk
