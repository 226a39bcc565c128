"""Router: the FastAPI ingress serving OpenAI's API on top of the Dispatcher.

Per request: authenticate, validate (pydantic), check the model name, tokenize and check the
length against the model's limit, build SamplingParams, admit through the dispatcher (429/503
at once when refused), then either gather the whole answer or stream it as server-sent events.
A streaming answer waits for its first engine event before sending headers, so a request that
fails before it starts (deadline, engine refusal) still gets a proper status code. Whatever
ends a request early (client disconnect, error) cancels it at its replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from ray.serve.handle import DeploymentHandle

from app.admission import AdmissionLimits, LoadBoard
from app.config import AppConfig
from app.dispatcher import Dispatcher, ReplicaClient, RequestFailed, Ticket
from app.edge import EdgeGuard
from app.errors import APIError, bad_request, install_error_handlers
from app.formatting import (
    SSE_DONE,
    ChoiceState,
    TokenizerLike,
    chat_logprobs,
    completion_logprobs,
    finish_reason,
    sse,
    usage,
)
from app.load import load_view
from app.metrics import RouterMetrics
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
    ModelCard,
    ModelList,
    SamplingFields,
)
from model.default_model import model_name_for
from model.requests import GenerationChunk, GenerationRequest
from model.sampling_params import SamplingParams, SamplingParamsError

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # as OpenAI's legacy completions API
# A token stands for at most max_token_bytes bytes of text, so text of B bytes is at least
# B / max_token_bytes tokens. Text over this many times (limit * max_token_bytes) bytes cannot
# fit and is refused without tokenizing it (the slack covers normalizers that shrink text).
TEXT_BOUND_SLACK = 2
READY_TIMEOUT_S = 10.0
REPLICA_HEADER = "X-Ringserve-Replica"  # which LLM replica(s) served the answer


def load_router_tokenizer(model: str | None) -> TokenizerLike:
    """The served model's tokenizer alone (no weights): the router tokenizes and counts."""
    from model.default_model import default_model_path
    from model.tokenizers import load_tokenizer

    return load_tokenizer(default_model_path() if model is None else Path(model))


class Router:
    """OpenAI-compatible HTTP front end; ``http_app`` is its FastAPI application."""

    def __init__(self, llm: DeploymentHandle | ReplicaClient, config: AppConfig | dict[str, Any],
                 tokenizer: TokenizerLike | None = None) -> None:
        self.config = config if isinstance(config, AppConfig) else AppConfig.model_validate(config)
        if isinstance(llm, DeploymentHandle):
            from app.replica_client import ServeReplicaClient

            self.client: Any = ServeReplicaClient(llm)
        else:
            self.client = llm
        self.tokenizer = tokenizer or load_router_tokenizer(self.config.model)
        self.metrics = RouterMetrics(model_name_for(self.config.model))
        limits = AdmissionLimits(max_queue_wait_s=self.config.max_queue_wait_s,
                                 max_waiting=self.config.max_waiting_per_replica,
                                 default_tokens_per_s=self.config.default_tokens_per_s,
                                 # a replica that has not answered for 3/4 of a health-check
                                 # period is out: /health turns 503 within one period
                                 max_report_age_s=0.75 * self.config.health_check_period_s)
        self.dispatcher = Dispatcher(
            self.client, LoadBoard(limits), batch_window_s=self.config.batch_window_ms / 1000,
            max_batch=self.config.max_batch_size, stats_interval_s=self.config.stats_interval_s,
            metrics=self.metrics)
        self._model_name: str | None = self.config.served_model_name
        self._max_model_len: int | None = None
        self._created = int(time.time())
        self._max_token_bytes = max(
            1, max(len(self.tokenizer.token_bytes(i)) for i in range(self.tokenizer.vocab_size)))
        self.http_app = self._build_app()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self.http_app

    async def shutdown(self) -> None:
        await self.dispatcher.close()

    # Model facts (asked of a replica once) --------------------------------------------
    async def _model(self) -> tuple[str, int]:
        self.dispatcher.start()
        if self._max_model_len is None:
            try:
                info = await asyncio.wait_for(self.client.model_info(), READY_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - no replica could answer
                raise APIError(503, f"no LLM replica is ready: {exc!r}",
                               code="no_healthy_replica", headers={"Retry-After": "1"}) from exc
            self._max_model_len = int(info["max_model_len"])
            self._model_name = self._model_name or str(info["model_name"])
        assert self._model_name is not None
        return self._model_name, self._max_model_len

    async def _check_model(self, requested: str) -> tuple[str, int]:
        name, limit = await self._model()
        if requested != name:
            raise APIError(404, f"The model `{requested}` does not exist; this server serves "
                           f"`{name}`.", param="model", code="model_not_found")
        return name, limit

    # App --------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        app = FastAPI(title="ringserve", docs_url=None, redoc_url=None)
        install_error_handlers(app)

        @app.middleware("http")
        async def _count(request: Request, call_next: Callable[[Request], Any]) -> Any:
            response = await call_next(request)
            self.metrics.request(_route_label(request.url.path), response.status_code)
            return response

        @app.get("/health")
        async def health() -> JSONResponse:
            self.dispatcher.start()
            healthy = self.dispatcher.board.healthy_ids()
            if not healthy and not self.dispatcher.polled:
                await self.dispatcher.wait_ready(1.0)  # a router just started: first poll
                healthy = self.dispatcher.board.healthy_ids()
            if not healthy:
                raise APIError(503, "no healthy LLM replica", code="no_healthy_replica")
            return JSONResponse({"status": "ok", "healthy_replicas": len(healthy)})

        @app.get("/v1/models")
        async def models() -> ModelList:
            name, limit = await self._model()
            return ModelList(data=[ModelCard(id=name, created=self._created,
                                             max_model_len=limit)])

        @app.get("/load")
        async def load() -> JSONResponse:
            """ringserve extension: the router's view of every replica's load."""
            self.dispatcher.start()
            board = self.dispatcher.board
            replicas = []
            for rid in board.replica_ids:
                est = board.estimate(rid)
                replicas.append({"replica_id": rid, "healthy": rid in board.healthy_ids(),
                                 **load_view(est),
                                 "predicted_wait_s": board.predicted_wait(est)})
            return JSONResponse({"replicas": replicas,
                                 "in_flight": self.dispatcher.in_flight(),
                                 "requests": self.dispatcher.tally.as_dict()})

        @app.post("/v1/completions", response_model=None)
        async def completions(body: CompletionRequest, response: Response
                              ) -> CompletionResponse | StreamingResponse:
            return await self._completions(body, response)

        @app.post("/v1/chat/completions", response_model=None)
        async def chat(body: ChatCompletionRequest, response: Response
                       ) -> ChatCompletionResponse | StreamingResponse:
            return await self._chat(body, response)

        # Outermost: limits and keys are checked before FastAPI reads a byte of the body.
        app.add_middleware(
            EdgeGuard, limits=self.config.edge_limits(),
            on_refused=lambda path, status: self.metrics.request(_route_label(path), status))
        return app

    # Request building -------------------------------------------------------------------
    def _params(self, body: SamplingFields, max_tokens: int, logprobs: int | None
                ) -> SamplingParams:
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
                top_p=body.top_p, min_p=body.min_p, presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty, seed=body.seed,
                stop=tuple(body.stop or ()), stop_token_ids=tuple(body.stop_token_ids or ()),
                ignore_eos=body.ignore_eos, n=body.n, logprobs=logprobs)
        except SamplingParamsError as exc:
            raise bad_request(str(exc)) from exc

    @staticmethod
    def _check_length(prompt_len: int, max_tokens: int, limit: int, prompt_param: str) -> None:
        if prompt_len == 0:
            raise bad_request("the prompt is empty", param=prompt_param)
        if prompt_len + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens; the "
                           f"prompt has {prompt_len} tokens and max_tokens is {max_tokens} "
                           f"({prompt_len + max_tokens} in all). Shorten the prompt or lower "
                           "max_tokens.", param="max_tokens" if prompt_len < limit
                           else prompt_param, code="context_length_exceeded")

    def _check_text_fits(self, texts: Sequence[str], limit: int, param: str) -> None:
        """Refuse text that cannot fit in ``limit`` tokens before tokenizing it (a prompt of
        many MB would cost the router seconds of CPU and a token list of GBs)."""
        size = sum(len(t.encode("utf-8")) for t in texts)
        if size > TEXT_BOUND_SLACK * limit * self._max_token_bytes:
            raise APIError(400, f"This model's maximum context length is {limit} tokens; the "
                           f"prompt ({size} bytes of text) is longer than that. Shorten the "
                           "prompt.", param=param, code="context_length_exceeded")

    def _check_ids_fit(self, ids: Sequence[int], limit: int) -> None:
        if len(ids) >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens; the "
                           f"prompt has {len(ids)} tokens. Shorten the prompt.", param="prompt",
                           code="context_length_exceeded")

    def _prompts(self, prompt: str | list[str] | list[int] | list[list[int]], limit: int
                 ) -> tuple[list[list[int]], list[str]]:
        """Token ids and text of each prompt of a completions request."""
        if isinstance(prompt, str):
            self._check_text_fits([prompt], limit, "prompt")
            return [self.tokenizer.encode(prompt)], [prompt]
        if not prompt:
            raise bad_request("prompt must not be an empty list", param="prompt")
        if all(isinstance(p, str) for p in prompt):
            texts: list[str] = list(prompt)  # type: ignore[arg-type]
            for text in texts:
                self._check_text_fits([text], limit, "prompt")
            return [self.tokenizer.encode(p) for p in texts], texts
        if all(isinstance(p, int) for p in prompt):
            ids = list(prompt)  # type: ignore[arg-type]
            self._check_ids_fit(ids, limit)
            return [ids], [self._decode_prompt(ids)]
        lists = [list(p) for p in prompt]  # type: ignore[arg-type]
        for ids in lists:
            self._check_ids_fit(ids, limit)
        return lists, [self._decode_prompt(p) for p in lists]

    def _decode_prompt(self, ids: list[int]) -> str:
        try:
            return self.tokenizer.decode(ids)
        except Exception as exc:  # noqa: BLE001 - an id outside the vocabulary
            raise bad_request(f"invalid prompt token ids: {exc}", param="prompt") from exc

    async def _submit(self, requests: Sequence[GenerationRequest], deadline_s: float | None,
                      stream: bool) -> list[Ticket]:
        """Admit all prompts of one HTTP request, or none of them."""
        deadline = deadline_s if deadline_s is not None else self.config.default_deadline_s
        tickets: list[Ticket] = []
        try:
            for request in requests:
                tickets.append(await self.dispatcher.submit(request, deadline, stream))
        except BaseException:
            for ticket in tickets:
                self.dispatcher.cancel(ticket)
            raise
        return tickets

    # Completions ------------------------------------------------------------------------
    async def _completions(self, body: CompletionRequest, response: Response
                           ) -> CompletionResponse | StreamingResponse:
        name, limit = await self._check_model(body.model)
        prompts, texts = self._prompts(body.prompt, limit)
        max_tokens = body.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS
        for ids in prompts:
            self._check_length(len(ids), max_tokens, limit, "prompt")
        params = self._params(body, max_tokens, body.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        requests = [GenerationRequest(f"{rid}-{i}", tuple(ids), params)
                    for i, ids in enumerate(prompts)]
        tickets = await self._submit(requests, body.deadline_s, bool(body.stream))
        created = int(time.time())
        n = body.n
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await self._stream(tickets, lambda t, c, s: self._completion_chunk(
                rid, created, name, t * n + c.index, c, s, texts[t] if body.echo else None,
                body.logprobs is not None),
                lambda states: self._usage_chunk(rid, created, name, "text_completion",
                                                 prompts, states) if include_usage else None)
        states = await self._gather(tickets)
        response.headers[REPLICA_HEADER] = _replicas(tickets)
        choices = []
        for t, per_ticket in enumerate(states):
            for state in per_ticket:
                prefix = texts[t] if body.echo else ""
                text = prefix + "".join(state.text)
                lp = (completion_logprobs(self.tokenizer, state.logprobs, state.top_logprobs,
                                          len(prefix)) if body.logprobs is not None else None)
                choices.append(CompletionChoice(index=t * n + state.index, text=text, logprobs=lp,
                                                finish_reason=finish_reason(state.finish)))
        return CompletionResponse(
            id=rid, created=created, model=name, choices=choices,
            usage=usage(sum(len(p) for p in prompts), [s for st in states for s in st]))

    def _completion_chunk(self, rid: str, created: int, model: str, index: int,
                          chunk: GenerationChunk, state: ChoiceState, echo: str | None,
                          want_logprobs: bool) -> str:
        text = chunk.text
        if echo is not None and len(state.token_ids) == len(chunk.token_ids):
            text = echo + text  # the first chunk of this choice carries the echoed prompt
        lp = None
        if want_logprobs:
            offset = sum(len(t) for t in state.text[:-1])
            lp = completion_logprobs(self.tokenizer, chunk.logprobs, chunk.top_logprobs, offset)
        payload = CompletionResponse(id=rid, created=created, model=model, choices=[
            CompletionChoice(index=index, text=text, logprobs=lp,
                             finish_reason=finish_reason(chunk.finish_reason))])
        return sse(payload.model_dump_json(exclude={"usage", "system_fingerprint"}))

    def _usage_chunk(self, rid: str, created: int, model: str, kind: str,
                     prompts: list[list[int]], states: list[list[ChoiceState]]) -> str:
        flat = [s for st in states for s in st]
        body: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": model,
                                "choices": [],
                                "usage": usage(sum(len(p) for p in prompts), flat).model_dump()}
        return sse(ChatCompletionChunk.model_validate(body).model_dump_json()
                   if kind == "chat.completion.chunk"
                   else CompletionResponse.model_validate(body).model_dump_json())

    # Chat -------------------------------------------------------------------------------
    async def _chat(self, body: ChatCompletionRequest, response: Response
                    ) -> ChatCompletionResponse | StreamingResponse:
        name, limit = await self._check_model(body.model)
        messages = [{"role": m.template_role(), "content": m.text()} for m in body.messages]
        if len(messages) > limit:  # every turn costs a token at least: this cannot fit
            raise APIError(400, f"This model's maximum context length is {limit} tokens; "
                           f"{len(messages)} messages cannot fit in it.", param="messages",
                           code="context_length_exceeded")
        self._check_text_fits([m["content"] for m in messages], limit, "messages")
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=body.add_generation_prompt)
        except ValueError as exc:
            raise bad_request(f"messages: {exc}", param="messages") from exc
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")
        requested = body.max_completion_tokens or body.max_tokens
        max_tokens = requested if requested is not None else max(1, limit - len(ids))
        self._check_length(len(ids), max_tokens, limit, "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = self._params(body, max_tokens, logprobs)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        request = GenerationRequest(rid, tuple(ids), params, continues_prompt=False)
        tickets = await self._submit([request], body.deadline_s, bool(body.stream))
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await self._stream(tickets, lambda _t, c, s: self._chat_chunk(
                rid, created, name, c, s, body.logprobs),
                lambda states: self._usage_chunk(rid, created, name, "chat.completion.chunk",
                                                 [ids], states) if include_usage else None)
        states = (await self._gather(tickets))[0]
        response.headers[REPLICA_HEADER] = _replicas(tickets)
        choices = [ChatChoice(
            index=s.index, message=AssistantMessage(content="".join(s.text)),
            logprobs=(chat_logprobs(self.tokenizer, s.logprobs, s.top_logprobs)
                      if body.logprobs else None),
            finish_reason=finish_reason(s.finish)) for s in states]
        return ChatCompletionResponse(id=rid, created=created, model=name, choices=choices,
                                      usage=usage(len(ids), states))

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

    # Answer assembly --------------------------------------------------------------------
    async def _gather(self, tickets: list[Ticket]) -> list[list[ChoiceState]]:
        """Run every ticket to its end; per ticket, its choices in index order."""
        states = [{i: ChoiceState(i) for i in range(t.request.params.n)} for t in tickets]
        try:
            async for t, chunk in self._merged(tickets):
                states[t][chunk.index].add(chunk)
        finally:
            for ticket in tickets:
                self.dispatcher.cancel(ticket)  # no-op for tickets that ended
        return [[s[i] for i in sorted(s)] for s in states]

    async def _merged(self, tickets: list[Ticket]) -> AsyncIterator[tuple[int, GenerationChunk]]:
        """Chunks of all tickets as they come, tagged with the ticket's position.

        Raises APIError for the first ticket that fails.
        """
        if len(tickets) == 1:
            try:
                async for chunk in tickets[0].events():
                    yield 0, _checked(chunk)
            except RequestFailed as exc:
                raise APIError(exc.status, exc.message) from exc
            return
        queue: asyncio.Queue[tuple[int, GenerationChunk | BaseException | None]] = (
            asyncio.Queue())

        async def pump(t: int, ticket: Ticket) -> None:
            try:
                async for chunk in ticket.events():
                    queue.put_nowait((t, _checked(chunk)))
                queue.put_nowait((t, None))
            except RequestFailed as exc:
                queue.put_nowait((t, APIError(exc.status, exc.message)))
            except APIError as exc:
                queue.put_nowait((t, exc))

        tasks = [asyncio.create_task(pump(t, ticket)) for t, ticket in enumerate(tickets)]
        try:
            remaining = len(tasks)
            while remaining:
                t, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield t, item
        finally:
            for task in tasks:
                task.cancel()

    async def _stream(self, tickets: list[Ticket],
                      render: Callable[[int, GenerationChunk, ChoiceState], str],
                      final: Callable[[list[list[ChoiceState]]], str | None]
                      ) -> StreamingResponse:
        """SSE answer; waits for the first event so early failures keep their status code."""
        states = [{i: ChoiceState(i) for i in range(t.request.params.n)} for t in tickets]
        events = self._merged(tickets)
        try:
            first = await anext(events)
        except StopAsyncIteration:
            first = None
        except BaseException:
            for ticket in tickets:
                self.dispatcher.cancel(ticket)
            raise

        async def body() -> AsyncIterator[str]:
            pending: tuple[int, GenerationChunk] | None = first
            try:
                while pending is not None:
                    t, chunk = pending
                    state = states[t][chunk.index]
                    state.add(chunk)
                    yield render(t, chunk, state)
                    try:
                        pending = await anext(events)
                    except StopAsyncIteration:
                        pending = None
                tail = final([[s[i] for i in sorted(s)] for s in states])
                if tail is not None:
                    yield tail
                yield SSE_DONE
            except APIError as exc:
                yield sse(_json(exc.body()))
                yield SSE_DONE
            finally:
                with contextlib.suppress(Exception):
                    await events.aclose()
                for ticket in tickets:
                    self.dispatcher.cancel(ticket)

        def cancel_all() -> None:
            for ticket in tickets:
                self.dispatcher.cancel(ticket)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                   REPLICA_HEADER: _replicas(tickets)}
        return _TicketStream(body(), on_close=cancel_all, media_type="text/event-stream",
                             headers=headers)


class _TicketStream(StreamingResponse):
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


ROUTES = frozenset({"/health", "/load", "/v1/models", "/v1/completions",
                    "/v1/chat/completions", "/openapi.json"})


def _route_label(path: str) -> str:
    """Metric label of a path: any path a client makes up counts as one label, `other`."""
    return path if path in ROUTES else "other"


def _checked(chunk: GenerationChunk) -> GenerationChunk:
    """A choice the engine ended with ``error`` (it failed inside a step, alone) fails its
    HTTP request; the other requests of that step carried on."""
    if chunk.finish_reason == "error":
        raise APIError(500, "generation failed inside the engine for this request (other "
                       "requests were not affected); retrying may succeed",
                       code="engine_error")
    return chunk


def _replicas(tickets: Sequence[Ticket]) -> str:
    return ",".join(sorted({t.replica_id for t in tickets}))


def _json(value: dict[str, Any]) -> str:
    import json

    return json.dumps(value)
