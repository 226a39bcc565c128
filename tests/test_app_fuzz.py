"""Schemathesis against the router's own /openapi.json: no 5xx, every error in OpenAI's shape.

The real Router app (EdgeGuard, FastAPI, validation, tokenizer, dispatcher) over in-process
LLMServer replicas around FakeEngine (tests/conftest.py). Schemathesis generates valid bodies
(positive mode) and invalid ones (negative mode: wrong types, out-of-range values, missing
fields) for every operation; each goes through httpx's ASGI transport to the app, which runs
on its own event loop in a thread so Hypothesis's synchronous test can drive it. At least
MIN_REQUESTS requests per run (Hypothesis is derandomized: the same ones every run).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from app.config import AppConfig
from app.router import Router, load_router_tokenizer
from tests.conftest import make_local_cluster

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

KEY = "sk-fuzz-0123456789abcdef"
EXAMPLES = {"POST": 130, "GET": 10}  # per operation and mode; GETs without inputs stop at 1
MIN_REQUESTS = 500
ERROR_FIELDS = {"message", "type", "param", "code"}


class AppThread:
    """The router on an event loop of its own; ``request`` runs one HTTP call on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        client = make_local_cluster(replicas=2, total_slots=16, step_s=0.001, max_model_len=96)
        config = AppConfig(api_keys=[KEY], batch_window_ms=1, stats_interval_s=0.05,  # type: ignore[list-item]
                           max_body_bytes=256 * 1024)
        self.router = Router(client, config, tokenizer=load_router_tokenizer(None))
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.router.http_app),
                                      base_url="http://test", timeout=60)
        self.count = 0
        self.statuses: Counter[int] = Counter()

    def request(self, **kwargs: Any) -> httpx.Response:
        self.count += 1
        future = asyncio.run_coroutine_threadsafe(self.http.request(**kwargs), self.loop)
        response = future.result(timeout=120)
        self.statuses[response.status_code] += 1
        return response

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.http.aclose(), self.loop).result(30)
        asyncio.run_coroutine_threadsafe(self.router.shutdown(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.fixture(scope="module")
def app_thread() -> Iterator[AppThread]:
    app = AppThread()
    yield app
    app.close()


def check(response: httpx.Response, case: Any) -> None:
    """No 5xx; errors in OpenAI's shape; successes are JSON or a complete SSE stream."""
    where = f"{case.method} {case.path} body={case.body!r:.300}"
    assert response.status_code < 500, f"{response.status_code} for {where}: {response.text}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == ERROR_FIELDS, where
        assert isinstance(error["message"], str) and error["message"], where
        assert isinstance(error["type"], str), where
        return
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", where
        for event in events[:-1]:
            assert "error" not in json.loads(event), f"{where}: {event}"
    else:
        assert isinstance(response.json(), dict), where


def run_operation(app: AppThread, operation: Any, mode: Any) -> None:
    strategy = operation.as_strategy(generation_mode=mode)

    @settings(max_examples=EXAMPLES.get(operation.method.upper(), 10), deadline=None,
              derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def fuzz(case: Any) -> None:
        kwargs = case.as_transport_kwargs(base_url="http://test")
        kwargs.pop("cookies", None)
        kwargs["headers"] = {**(kwargs.get("headers") or {}), "Authorization": f"Bearer {KEY}"}
        if "json" in kwargs:
            body = kwargs.pop("json")
            if mode == GenerationMode.POSITIVE and isinstance(body, dict):
                body["model"] = "fake-model"  # else nearly every valid body is a 404
            # \u escapes: any text the generator drew survives encoding
            kwargs["content"] = json.dumps(body, ensure_ascii=True).encode()
        check(app.request(**kwargs), case)

    fuzz()


def test_schemathesis_finds_no_5xx_and_only_openai_shaped_errors(app_thread: AppThread
                                                                ) -> None:
    schema = schemathesis.openapi.from_dict(app_thread.router.http_app.openapi())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(o.method.upper(), o.path) for o in operations} >= {
        ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models")}
    for operation in operations:
        run_operation(app_thread, operation, GenerationMode.POSITIVE)
        if operation.method.upper() == "POST":  # a GET without inputs has nothing to break
            run_operation(app_thread, operation, GenerationMode.NEGATIVE)
    print(f"schemathesis: {app_thread.count} requests, statuses {dict(app_thread.statuses)}")
    assert app_thread.count >= MIN_REQUESTS
    # both kinds were exercised: requests served in full, and requests refused
    assert app_thread.statuses[200] >= 50 and app_thread.statuses[400] >= 50
    # and the server still answers a plain request normally
    ok = app_thread.request(method="POST", url="/v1/completions",
                            headers={"Authorization": f"Bearer {KEY}"},
                            json={"model": "fake-model", "prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
