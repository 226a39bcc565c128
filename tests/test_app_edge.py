"""Security at the edge, in process: validation bounds, invalid Unicode, roles, size limits,
API keys and the per-key cap, an engine-side failure of one request.

The Router's real FastAPI app (EdgeGuard in front) over in-process LLMServer replicas around
FakeEngine (tests/conftest.py), driven through httpx's ASGI transport. After every refusal the
same router answers a normal request. The same limits inside Ray Serve's proxy, with the
router's memory measured, are in tests/test_app_serve.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import httpx
import pytest

from app.edge import EdgeGuard, EdgeLimits
from app.llm_server import LLMServer
from app.router import Router
from tests.conftest import (
    FakeEngine,
    LocalClient,
    call,
    chat,
    completion,
    fake_status,
    make_router,
)

KEY_A, KEY_B = "sk-test-alpha-0123456789", "sk-test-bravo-9876543210"


def raw(body: Any) -> dict[str, Any]:
    """Request kwargs for a JSON body written with \\u escapes (lone surrogates survive)."""
    return {"content": json.dumps(body, ensure_ascii=True).encode(),
            "headers": {"content-type": "application/json"}}



def assert_error(r: httpx.Response, status: int, param: str | None = None,
                 code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error
    if code is not None:
        assert error["code"] == code, error
    return error


async def answers_normally(router: Router, **kwargs: Any) -> None:
    ok = await call(router, "POST", "/v1/completions", json=completion(), **kwargs)
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["finish_reason"] == "length"


LONE = "bad \ud800 text"


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", completion(prompt=LONE), "prompt"),
    ("/v1/completions", completion(prompt=["fine", LONE]), "prompt"),
    ("/v1/completions", completion(stop=LONE), "stop"),
    ("/v1/completions", completion(stop=["ok", "\udfff"]), "stop"),
    ("/v1/completions", completion(model="fake\ud800"), "model"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": LONE}]), "messages"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "\ud83d"}]}]), "messages"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "hi",
                                             "name": "\udc80"}]), "messages"),
])
def test_invalid_unicode_is_400_in_the_error_shape(local_cluster: Any, tokenizer: Any,
                                                   path: str, body: Any, param: str) -> None:
    router = make_router(local_cluster(replicas=1), tokenizer)

    async def main() -> None:
        error = assert_error(await call(router, "POST", path, **raw(body)), 400, param)
        assert "unicode" in error["message"].lower()
        await answers_normally(router)

    asyncio.run(main())


def test_body_that_is_not_utf8_or_json_is_400(local_cluster: Any, tokenizer: Any) -> None:
    router = make_router(local_cluster(replicas=1), tokenizer)
    headers = {"content-type": "application/json"}

    async def main() -> None:
        for content in (b'{"model": "fake-model", "prompt": "\xff\xfe"}', b"[" * 100_000,
                        b'{"model": "fake-model", "prompt": "x", "seed": ' + b"9" * 5000 + b"}"):
            r = await call(router, "POST", "/v1/completions", content=content, headers=headers)
            assert_error(r, 400)
        await answers_normally(router)

    asyncio.run(main())


@pytest.mark.parametrize("over,param", [
    ({"seed": 2**70}, "seed"),  # the overflow: now refused at the edge
    ({"seed": 2**63}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"max_tokens": 2**31}, "max_tokens"),
    ({"top_k": 2**31}, "top_k"),
    ({"n": 17}, "n"),
    ({"logprobs": 21}, "logprobs"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": [2**31]}, "stop_token_ids"),
    ({"prompt": [5, 2**31]}, "prompt"),
    ({"prompt": [[1, 2], [-3]]}, "prompt"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": float("inf")}, "top_p"),
    ({"deadline_s": 1e300}, "deadline_s"),
    ({"presence_penalty": -2.5}, "presence_penalty"),
    ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
    ({"stop": "x" * 513}, "stop"),  # matching it would cost the engine thread every token
    ({"prompt": ["hi"] * 65}, "prompt"),
    ({"model": "m" * 257}, "model"),  # never echoed back at length in a 404
    ({"prompt": [[1, 2]] * 65}, "prompt"),
])
def test_numeric_bounds_are_400(local_cluster: Any, tokenizer: Any, over: dict[str, Any],
                                param: str) -> None:
    router = make_router(local_cluster(replicas=1), tokenizer)

    async def main() -> None:
        assert_error(await call(router, "POST", "/v1/completions", **raw(completion(**over))),
                     400, param)
        await answers_normally(router)

    asyncio.run(main())


def test_64_bit_seeds_at_the_bounds_are_served(local_cluster: Any, tokenizer: Any) -> None:
    router = make_router(local_cluster(replicas=1), tokenizer)

    async def main() -> None:
        for seed in (2**63 - 1, -(2**63), 0):
            r = await call(router, "POST", "/v1/completions", json=completion(seed=seed))
            assert r.status_code == 200, r.text

    asyncio.run(main())


def test_roles_agree_with_the_chat_template(local_cluster: Any, tokenizer: Any) -> None:
    router = make_router(local_cluster(replicas=1), tokenizer)

    def conversation(role: str) -> dict[str, Any]:
        return chat(messages=[{"role": role, "content": "Be brief."},
                              {"role": "user", "content": "Hi"}])

    async def main() -> None:
        system = await call(router, "POST", "/v1/chat/completions", json=conversation("system"))
        developer = await call(router, "POST", "/v1/chat/completions",
                               json=conversation("developer"))
        assert system.status_code == developer.status_code == 200, developer.text
        # developer is rendered exactly as system: the same prompt, token for token
        expected = len(tokenizer.apply_chat_template(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]))
        assert developer.json()["usage"]["prompt_tokens"] == expected
        assert system.json()["usage"] == developer.json()["usage"]
        for role in ("tool", "function", "critic"):
            r = await call(router, "POST", "/v1/chat/completions", json=conversation(role))
            assert_error(r, 400, "messages.0.role")
        # the schema offers exactly what the chat path accepts
        schema = router.http_app.openapi()["components"]["schemas"]["ChatMessage"]
        assert schema["properties"]["role"]["enum"] == ["system", "developer", "user",
                                                        "assistant"]
        await answers_normally(router)

    asyncio.run(main())


def test_text_that_cannot_fit_is_refused_without_tokenizing(local_cluster: Any,
                                                            tokenizer: Any) -> None:
    router = make_router(local_cluster(replicas=1, max_model_len=256), tokenizer)
    encoded: list[int] = []
    real_encode = tokenizer.encode

    def counting_encode(text: str, **kw: Any) -> list[int]:
        encoded.append(len(text))
        return real_encode(text, **kw)

    async def main() -> None:
        big = "word " * 400_000  # 2 MB: under the body limit, far over 256 tokens
        router.tokenizer.encode = counting_encode  # type: ignore[method-assign]
        try:
            for path, body in (("/v1/completions", completion(prompt=big)),
                               ("/v1/completions", completion(prompt=["hi", big])),
                               ("/v1/chat/completions", chat(messages=[
                                   {"role": "user", "content": big}])),
                               ("/v1/chat/completions", chat(messages=[
                                   {"role": "user", "content": "hi"}] * 300))):
                r = await call(router, "POST", path, json=body)
                assert_error(r, 400, code="context_length_exceeded")
            assert all(n < 1000 for n in encoded), encoded  # the big text never tokenized
            # text near the limit is tokenized and counted exactly, as before
            r = await call(router, "POST", "/v1/completions",
                           json=completion(prompt="hello " * 300))
            assert_error(r, 400, code="context_length_exceeded")
            assert "tokens" in r.json()["error"]["message"] and 1800 in encoded
            r = await call(router, "POST", "/v1/completions", json=completion(prompt=[7] * 300))
            assert_error(r, 400, code="context_length_exceeded")
        finally:
            del router.tokenizer.encode
        await answers_normally(router)

    asyncio.run(main())


# Size limits -----------------------------------------------------------------------------


class RecordingApp:
    """An ASGI app that records how much of the body it was handed."""

    def __init__(self) -> None:
        self.calls = 0
        self.body = b""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        more = True
        while more:
            message = await receive()
            self.body += message.get("body", b"")
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def drive(guard: EdgeGuard, headers: list[tuple[bytes, bytes]], chunks: list[bytes]
                ) -> tuple[int, bytes, int]:
    """Run one request through ``guard``; (status, body, body bytes pulled from the client)."""
    pulled = 0
    pending = list(chunks)

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        if not pending:
            await asyncio.sleep(3600)  # the client sends nothing more
        chunk = pending.pop(0)
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    sent: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers}
    await asyncio.wait_for(guard(scope, receive, send), 10)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), pulled


def test_guard_refuses_a_declared_oversized_body_without_reading_a_byte() -> None:
    app = RecordingApp()
    guard = EdgeGuard(app, EdgeLimits(max_body_bytes=1000))
    chunk = b"x" * 100

    async def main() -> None:
        status, body, pulled = await drive(guard, [(b"content-length", b"50000000")],
                                           [chunk] * 10)
        assert status == 413 and pulled == 0 and app.calls == 0
        assert json.loads(body)["error"]["code"] == "request_too_large"
        # chunked (no length): read only until the limit is passed, then refused
        status, body, pulled = await drive(guard, [(b"transfer-encoding", b"chunked")],
                                           [chunk] * 500)
        assert status == 413 and pulled <= 1000 + len(chunk) and app.calls == 0
        # within the limit, chunked or not, the app gets the whole body unchanged
        status, _, _ = await drive(guard, [(b"transfer-encoding", b"chunked")], [chunk] * 10)
        assert status == 200 and app.body == chunk * 10 and app.calls == 1
        app.body = b""
        status, _, _ = await drive(guard, [(b"content-length", b"1000")], [chunk] * 10)
        assert status == 200 and app.body == chunk * 10
        status, _, pulled = await drive(guard, [(b"content-length", b"12x")], [chunk])
        assert status == 400 and pulled == 0

    asyncio.run(main())


def test_body_and_header_limits_in_the_router(local_cluster: Any, tokenizer: Any) -> None:
    router = make_router(local_cluster(replicas=1), tokenizer, max_body_bytes=64 * 1024,
                         max_header_bytes=4096)

    async def chunks(total: int, piece: bytes = b"a" * 8192) -> AsyncIterator[bytes]:
        head = b'{"model": "fake-model", "max_tokens": 2, "prompt": "'
        yield head
        sent = len(head)
        while sent < total:
            yield piece
            sent += len(piece)
        yield b'"}'

    async def main() -> None:
        big = completion(prompt="a" * 100_000)
        assert_error(await call(router, "POST", "/v1/completions", json=big), 413,
                     code="request_too_large")
        await answers_normally(router)
        r = await call(router, "POST", "/v1/completions", content=chunks(200_000),
                       headers={"content-type": "application/json"})
        assert_error(r, 413, code="request_too_large")
        await answers_normally(router)
        r = await call(router, "POST", "/v1/completions", content=chunks(100, b"hi "),
                       headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text  # a chunked body within the limit is served
        r = await call(router, "POST", "/v1/completions", json=completion(),
                       headers={"x-padding": "p" * 5000})
        assert_error(r, 431, code="headers_too_large")
        r = await call(router, "POST", "/v1/completions", json=completion(),
                       headers={f"x-h{i}": "p" * 100 for i in range(50)})
        assert_error(r, 431)
        await answers_normally(router)

    asyncio.run(main())


# API keys --------------------------------------------------------------------------------


def test_api_keys_guard_every_route_but_health(local_cluster: Any, tokenizer: Any,
                                               caplog: pytest.LogCaptureFixture) -> None:
    router = make_router(local_cluster(replicas=1), tokenizer, api_keys=f"{KEY_A},{KEY_B}")
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []

    async def main() -> None:
        assert (await call(router, "GET", "/health")).status_code == 200
        for method, path in (("GET", "/v1/models"), ("GET", "/load"), ("GET", "/openapi.json"),
                             ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                             ("GET", "/no/such/route"), ("GET", "/docs")):
            for headers in ({}, {"Authorization": f"Bearer {KEY_A[:-1]}"},
                            {"Authorization": f"Bearer {KEY_A}x"},
                            {"Authorization": f"Basic {KEY_A}"},
                            {"Authorization": KEY_A}):
                r = await call(router, method, path, headers=headers, json=completion()
                               if method == "POST" else None)
                assert_error(r, 401, code="invalid_api_key")
                seen.append(r.text + str(r.headers))
        for key in (KEY_A, KEY_B):
            auth = {"Authorization": f"bearer {key}"}
            assert (await call(router, "GET", "/v1/models", headers=auth)).status_code == 200
            assert (await call(router, "GET", "/load", headers=auth)).status_code == 200
            await answers_normally(router, headers=auth)

    asyncio.run(main())
    for text in [*seen, caplog.text]:  # keys, right or nearly right, are never echoed
        assert KEY_A[:-1] not in text and KEY_B not in text


def test_per_key_concurrency_cap_is_429_with_retry_after(tokenizer: Any) -> None:
    engine = FakeEngine(total_slots=8, step_s=0.02)
    client = LocalClient({"r0": LLMServer(lambda: engine, replica_id="r0",
                                          status_of=fake_status)})
    router = make_router(client, tokenizer, api_keys=f"{KEY_A},{KEY_B}",
                         max_concurrent_per_key=2)
    a = {"Authorization": f"Bearer {KEY_A}"}
    b = {"Authorization": f"Bearer {KEY_B}"}

    async def main() -> None:
        await router.dispatcher.wait_ready(5)
        slow = [asyncio.create_task(call(router, "POST", "/v1/completions", headers=a,
                                         json=completion(max_tokens=40))) for _ in range(2)]
        while len(engine.running) < 2:
            await asyncio.sleep(0.01)
        third = await call(router, "POST", "/v1/completions", headers=a, json=completion())
        assert_error(third, 429, code="too_many_concurrent_requests")
        assert int(third.headers["retry-after"]) >= 1
        # another key is not held back by the first one's requests
        await answers_normally(router, headers=b)
        assert all(r.status_code == 200 for r in await asyncio.gather(*slow))
        await answers_normally(router, headers=a)  # free again once they have finished

    asyncio.run(main())


# A request that fails inside the engine --------------------------------------------------


class FailingEngine(FakeEngine):
    """FakeEngine whose requests with max_tokens == 7 end with finish_reason "error" after
    two tokens, as the real engine ends a request whose sampling or detokenizing raised."""

    async def generate(self, request: Any) -> Any:
        from dataclasses import replace

        count = 0
        async for chunk in super().generate(request):
            count += 1
            if request.params.max_tokens == 7 and count == 3:
                yield replace(chunk, text="", token_ids=(), finish_reason="error")
                return
            yield chunk


def test_a_request_failing_in_the_engine_fails_alone(tokenizer: Any) -> None:
    engine = FailingEngine(total_slots=4, step_s=0.02)
    client = LocalClient({"r0": LLMServer(lambda: engine, replica_id="r0",
                                          status_of=fake_status)})
    router = make_router(client, tokenizer, batch_window_ms=30)
    plen = len(tokenizer.encode("Hello there"))
    expected = "".join(f"{200 + (plen + i) % 50} " for i in range(12))

    async def main() -> None:
        await router.dispatcher.wait_ready(5)
        good, bad, bad_stream = await asyncio.gather(
            call(router, "POST", "/v1/completions", json=completion(max_tokens=12)),
            call(router, "POST", "/v1/completions", json=completion(max_tokens=7)),
            call(router, "POST", "/v1/completions", json=completion(max_tokens=7,
                                                                     stream=True)))
        assert good.status_code == 200 and good.json()["choices"][0]["text"] == expected
        assert_error(bad, 500, code="engine_error")
        events = [line[6:] for line in bad_stream.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_error"
        await answers_normally(router)

    asyncio.run(main())


def test_api_keys_from_a_file(local_cluster: Any, tokenizer: Any, tmp_path: Any) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# operators' keys\n\n  {KEY_B}  \n")
    router = make_router(local_cluster(replicas=1), tokenizer, api_keys=KEY_A,
                         api_keys_file=str(keys))

    async def main() -> None:
        for key in (KEY_A, KEY_B):
            await answers_normally(router, headers={"Authorization": f"Bearer {key}"})
        r = await call(router, "GET", "/v1/models",
                       headers={"Authorization": "Bearer # operators' keys"})
        assert_error(r, 401, code="invalid_api_key")

    asyncio.run(main())
    with pytest.raises(ValueError, match="cannot read api_keys_file") as missing:
        make_router(local_cluster(replicas=1), tokenizer, api_keys_file=str(tmp_path / "no"))
    assert KEY_A not in str(missing.value)
    (tmp_path / "empty").write_text("# none yet\n")
    with pytest.raises(ValueError, match="holds no key"):
        make_router(local_cluster(replicas=1), tokenizer, api_keys_file=str(tmp_path / "empty"))


def test_made_up_paths_share_one_metric_label(local_cluster: Any, tokenizer: Any) -> None:
    """A client inventing paths must not grow the router's metric label set without bound."""
    router = make_router(local_cluster(replicas=1), tokenizer, api_keys=KEY_A)
    labels: list[tuple[str, int]] = []
    router.metrics.request = lambda route, status: labels.append((route, status))  # type: ignore[method-assign]

    async def main() -> None:
        auth = {"Authorization": f"Bearer {KEY_A}"}
        for i in range(5):
            await call(router, "GET", f"/made/up/{i}", headers=auth)
            await call(router, "GET", f"/made/up/{i}")  # refused by the guard: 401
        await answers_normally(router, headers=auth)

    asyncio.run(main())
    assert set(labels) == {("other", 404), ("other", 401), ("/v1/completions", 200)}
