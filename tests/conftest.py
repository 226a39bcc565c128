"""Shared test fixtures: app/ (serving) fakes without Ray or a model.

An engine with real slot/queue/abort semantics but no model, an in-process ReplicaClient over
LLMServer replicas (so router logic is testable without Ray), load records built from the few
figures a test cares about, and a Router over such replicas.
"""

import asyncio as _asyncio
import time as _time
from dataclasses import dataclass as _dataclass
from typing import Any as _Any

import pytest as _pytest

from app.load import ReplicaLoad as _ReplicaLoad
from model.requests import EngineStats as _EngineStats
from model.requests import GenerationChunk as _GenerationChunk
from model.requests import TokenLogprob as _TokenLogprob


class FakeEngine:
    """Continuous-batching look-alike: ``total_slots`` run at once, one token per step each.

    Token ids are 200 + (prompt length + position) % 50 and each token's text is ``"<id> "``,
    so every output is predictable from the prompt length and max_tokens alone.
    """

    def __init__(self, total_slots: int = 4, step_s: float = 0.01, max_model_len: int = 256,
                 model_name: str = "fake-model") -> None:
        self.total_slots = total_slots
        self.step_s = step_s
        self.max_model_len = max_model_len
        self.model_name = model_name
        self.running: set[str] = set()
        self.waiting: list[str] = []  # request ids
        self.choices: dict[str, int] = {}  # request id -> n (sequences)
        self.aborted: list[str] = []
        self.started_requests: list[str] = []
        self.dead = False
        self.generated = 0
        self._slot_free: _asyncio.Condition | None = None

    def validate(self, request) -> None:
        if not request.prompt_token_ids:
            raise ValueError("the prompt is empty")
        if len(request.prompt_token_ids) + request.params.max_tokens > self.max_model_len:
            raise ValueError("prompt + max_tokens exceeds the model's limit")

    def start(self) -> None:
        pass

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stats(self) -> _EngineStats:
        return _EngineStats(waiting_sequences=sum(self.choices[r] for r in self.waiting),
                            waiting_tokens=0, running_sequences=len(self.running),
                            free_slots=self.total_slots - len(self.running),
                            total_slots=self.total_slots, tokens_per_s=1.0 / self.step_s,
                            prefill_tokens_per_s=1.0 / self.step_s,
                            kv_cache_bytes=1, kv_cache_used_bytes=0, healthy=not self.dead)

    async def generate(self, request):
        if self._slot_free is None:
            self._slot_free = _asyncio.Condition()
        rid = request.request_id
        self.validate(request)
        self.waiting.append(rid)
        self.choices[rid] = request.params.n
        try:
            async with self._slot_free:
                while len(self.running) + request.params.n > self.total_slots:
                    timeout = (None if request.deadline is None
                               else request.deadline - _time.monotonic())
                    if timeout is not None and timeout <= 0:
                        raise TimeoutError(f"{rid} was still queued at its deadline")
                    try:
                        await _asyncio.wait_for(self._slot_free.wait(), timeout)
                    except _asyncio.TimeoutError:
                        continue
                self.waiting.remove(rid)
                seqs = [f"{rid}#{i}" for i in range(request.params.n)]
                self.running.update(seqs)
                self.started_requests.append(rid)
        except BaseException:
            if rid in self.waiting:
                self.waiting.remove(rid)
            raise
        try:
            plen = len(request.prompt_token_ids)
            for pos in range(request.params.max_tokens):
                await _asyncio.sleep(self.step_s)
                for index in range(request.params.n):
                    token = 200 + (plen + pos) % 50
                    last = pos + 1 == request.params.max_tokens
                    self.generated += 1
                    chosen = (_TokenLogprob(token, -0.5),)  # when logprobs are asked for
                    wants = request.params.logprobs is not None
                    yield _GenerationChunk(request_id=rid, index=index, text=f"{token} ",
                                           token_ids=(token,),
                                           logprobs=chosen if wants else (),
                                           top_logprobs=(chosen,) if wants else (),
                                           finish_reason="length" if last else None,
                                           prompt_tokens=plen, completion_tokens=pos + 1)
        finally:
            self.running.difference_update(seqs)
            async with self._slot_free:
                self._slot_free.notify_all()

    async def shutdown(self, drain: bool = True, timeout_s: float = 60.0) -> None:
        deadline = _time.monotonic() + timeout_s
        while drain and self.running and _time.monotonic() < deadline:
            await _asyncio.sleep(self.step_s)


def engine_stats(**figures: _Any) -> _EngineStats:
    """An engine's load record: an idle, healthy 4-slot replica unless ``figures`` say else."""
    base: dict[str, _Any] = dict(
        waiting_sequences=0, waiting_tokens=0, running_sequences=0, free_slots=4,
        total_slots=4, tokens_per_s=100.0, prefill_tokens_per_s=100.0, kv_cache_bytes=0,
        kv_cache_used_bytes=0, healthy=True)
    return _EngineStats(**{**base, **figures})


def replica_load(replica_id: str, *, draining: bool = False, **figures: _Any) -> _ReplicaLoad:
    """A replica's load report: :func:`engine_stats` of ``figures``, from ``replica_id``."""
    return _ReplicaLoad(replica_id, engine_stats(**figures), draining=draining)


def fake_status(exc: BaseException) -> int:
    if isinstance(exc, ValueError):
        return 400
    if isinstance(exc, TimeoutError):
        return 504
    return 500


@_dataclass
class LocalClient:
    """ReplicaClient over in-process LLMServers; records every batch call."""

    servers: dict

    def __post_init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def replica_ids(self) -> list[str]:
        return sorted(self.servers)

    async def stats(self, target):
        server = self.servers.get(target) or next(iter(self.servers.values()))
        return await server.stats(target=target)

    def generate_batch(self, target, items):
        self.calls.append((target, [i.request.request_id for i in items]))
        return self.servers[target].generate_batch(items, target=target)

    async def abort(self, target, request_ids):
        await self.servers[target].abort(request_ids, target=target)

    async def model_info(self):
        return await next(iter(self.servers.values())).model_info()


def make_local_cluster(replicas: int = 2, **engine_kwargs) -> LocalClient:
    from app.llm_server import LLMServer

    servers = {}
    for i in range(replicas):
        engine = FakeEngine(**engine_kwargs)
        # the factory is called at once, so the loop variable is read before it moves on
        servers[f"r{i}"] = LLMServer(lambda: engine, replica_id=f"r{i}",  # noqa: B023
                                     status_of=fake_status)
    return LocalClient(servers)


@_pytest.fixture
def gguf_cache_dir(tmp_path: _Any, monkeypatch: _pytest.MonkeyPatch) -> _Any:
    """A fresh GGUF conversion cache for one test (model.gguf_file's cache directory)."""
    from model import gguf_file

    cache = tmp_path / "cache"
    monkeypatch.setenv(gguf_file.CACHE_ENV, str(cache))
    return cache


@_pytest.fixture
def local_cluster():
    """Factory: ``local_cluster(replicas=2, total_slots=4, step_s=0.01)`` -> LocalClient."""
    return make_local_cluster


# ---------------------------------------------------------------------------------------------
# A Router over such replicas, driven in-process through httpx's ASGI transport.

ROUTER_TEST_DEFAULTS: dict[str, _Any] = {"batch_window_ms": 5, "stats_interval_s": 0.05}


@_pytest.fixture(scope="session")
def tokenizer() -> _Any:
    """The embedded default model's tokenizer, as the router loads it."""
    from app.router import load_router_tokenizer

    return load_router_tokenizer(None)


def make_router(client: _Any, tokenizer: _Any, **config: _Any) -> _Any:
    """A Router over ``client`` with :data:`ROUTER_TEST_DEFAULTS` under ``config``."""
    from app.config import AppConfig
    from app.router import Router

    return Router(client, AppConfig.model_validate({**ROUTER_TEST_DEFAULTS, **config}),
                  tokenizer=tokenizer)


async def call(router: _Any, method: str, path: str, **kwargs: _Any) -> _Any:
    """One HTTP request to the router's app; the httpx response."""
    import httpx

    transport = httpx.ASGITransport(app=router.http_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        return await http.request(method, path, **kwargs)


def completion(**over: _Any) -> dict[str, _Any]:
    """A small greedy completions body for FakeEngine's model."""
    return {"model": "fake-model", "prompt": "Hello there", "max_tokens": 3,
            "temperature": 0.0, **over}


def chat(**over: _Any) -> dict[str, _Any]:
    """A small chat body for FakeEngine's model."""
    return {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 3, **over}
