"""Router: the HTTP surface of ringserve, OpenAI's API on top of the Dispatcher.

This module is the FastAPI application: its routes (``/v1/completions``,
``/v1/chat/completions``, ``/v1/models``, ``/health``, ``/load``), the edge in front of them
(:class:`~app.edge.EdgeGuard`: size limits, API keys, the per-key cap), error mapping into
OpenAI's shape (:mod:`app.errors`), the per-route metrics and the served model's facts. What a
generation request becomes is :mod:`app.openai_api`'s (tokenize, admit, assemble the
response) over :mod:`app.streams` (merging the tickets' chunks). The Router reaches the LLM
replicas through the :class:`~app.dispatcher.ReplicaClient` it is given: the builder
(``app.main``) passes one over Serve's handle, tests an in-process one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.admission import AdmissionLimits, LoadBoard
from app.config import AppConfig
from app.dispatcher import Dispatcher, ReplicaClient
from app.edge import EdgeGuard
from app.errors import APIError, install_error_handlers
from app.formatting import TokenizerLike
from app.load import load_view
from app.metrics import RouterMetrics, route_label
from app.openai_api import Generation
from app.prompts import PromptReader
from app.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from model.default_model import model_name_for

READY_TIMEOUT_S = 10.0


def load_router_tokenizer(model: str | None) -> TokenizerLike:
    """The served model's tokenizer alone (no weights): the router tokenizes and counts."""
    from model.default_model import default_model_path
    from model.tokenizers import load_tokenizer

    return load_tokenizer(default_model_path() if model is None else Path(model))


class StatusCounter:
    """ASGI middleware: ``record(route label, status)`` when a response starts.

    Pure ASGI, not Starlette's ``@app.middleware("http")``: that one passes a streamed body
    through a memory stream and a task group, an extra hop and task switch per SSE write."""

    def __init__(self, app: ASGIApp, record: Callable[[str, int], None]) -> None:
        self.app = app
        self.record = record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_label(scope["path"])

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.record(route, int(message["status"]))
            await send(message)

        await self.app(scope, receive, counted_send)


class Router:
    """OpenAI-compatible HTTP front end; ``http_app`` is its FastAPI application."""

    def __init__(self, client: ReplicaClient, config: AppConfig | dict[str, Any],
                 tokenizer: TokenizerLike | None = None) -> None:
        self.config = config if isinstance(config, AppConfig) else AppConfig.model_validate(config)
        self.client = client
        self.tokenizer = tokenizer or load_router_tokenizer(self.config.model)
        self.metrics = RouterMetrics(model_name_for(self.config.model))
        limits = AdmissionLimits(max_queue_wait_s=self.config.max_queue_wait_s,
                                 max_waiting=self.config.max_waiting_per_replica,
                                 default_tokens_per_s=self.config.default_tokens_per_s,
                                 # a replica that has not answered for 3/4 of a health-check
                                 # period is out: /health turns 503 within one period
                                 max_report_age_s=0.75 * self.config.health_check_period_s)
        self.dispatcher = Dispatcher(
            client, LoadBoard(limits), batch_window_s=self.config.batch_window_ms / 1000,
            max_batch=self.config.max_batch_size, stats_interval_s=self.config.stats_interval_s,
            metrics=self.metrics)
        self.generation = Generation(self.dispatcher, PromptReader(self.tokenizer),
                                     self.config.default_deadline_s)
        self._model_name: str | None = self.config.served_model_name
        self._max_model_len: int | None = None
        self._created = int(time.time())
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
            except Exception as exc:  # no replica could answer
                raise APIError(503, f"no LLM replica is ready: {exc!r}",
                               code="no_healthy_replica", headers={"Retry-After": "1"}) from exc
            self._max_model_len = int(str(info["max_model_len"]))
            self._model_name = self._model_name or str(info["model_name"])
        assert self._model_name is not None
        return self._model_name, self._max_model_len

    async def _check_model(self, requested: str) -> tuple[str, int]:
        name, limit = await self._model()
        if requested != name:
            raise APIError(404, f"The model `{requested}` does not exist; this server serves "
                           f"`{name}`.", param="model", code="model_not_found")
        return name, limit

    # Routes -----------------------------------------------------------------------------
    async def health(self) -> JSONResponse:
        self.dispatcher.start()
        healthy = self.dispatcher.board.healthy_ids()
        if not healthy and not self.dispatcher.polled:
            await self.dispatcher.wait_ready(1.0)  # a router just started: first poll
            healthy = self.dispatcher.board.healthy_ids()
        if not healthy:
            raise APIError(503, "no healthy LLM replica", code="no_healthy_replica")
        return JSONResponse({"status": "ok", "healthy_replicas": len(healthy)})

    async def models(self) -> ModelList:
        name, limit = await self._model()
        return ModelList(data=[ModelCard(id=name, created=self._created, max_model_len=limit)])

    async def load(self) -> JSONResponse:
        """ringserve extension: the router's view of every replica's load."""
        self.dispatcher.start()
        board = self.dispatcher.board
        healthy = board.healthy_ids()
        replicas = []
        for rid in board.replica_ids:
            est = board.estimate(rid)
            replicas.append({"replica_id": rid, "healthy": rid in healthy, **load_view(est),
                             "predicted_wait_s": board.predicted_wait(est),
                             "ended_since_report": est.ended_sequences})
        return JSONResponse({"replicas": replicas, "in_flight": self.dispatcher.in_flight(),
                             "requests": self.dispatcher.tally.as_dict()})

    async def completions(self, body: CompletionRequest, response: Response
                          ) -> CompletionResponse | StreamingResponse:
        name, limit = await self._check_model(body.model)
        return await self.generation.completions(body, name, limit, response)

    async def chat(self, body: ChatCompletionRequest, response: Response
                   ) -> ChatCompletionResponse | StreamingResponse:
        name, limit = await self._check_model(body.model)
        return await self.generation.chat(body, name, limit, response)

    # App --------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        app = FastAPI(title="ringserve", docs_url=None, redoc_url=None)
        install_error_handlers(app)

        app.add_middleware(StatusCounter,
                           record=lambda route, status: self.metrics.request(route, status))
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/load", self.load, methods=["GET"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"],
                          response_model=None)
        app.add_api_route("/v1/chat/completions", self.chat, methods=["POST"],
                          response_model=None)
        # Outermost: limits and keys are checked before FastAPI reads a byte of the body.
        app.add_middleware(
            EdgeGuard, limits=self.config.edge_limits(),
            on_refused=lambda path, status: self.metrics.request(route_label(path), status))
        return app
