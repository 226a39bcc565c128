"""Router over in-process fake replicas: HTTP shapes, errors, batching, dispatch, shedding.

No Ray here: the Router's FastAPI app is driven through httpx's ASGI transport, the replicas
are real LLMServer objects around FakeEngine (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

import pytest

from tests import conftest
from tests.conftest import call, chat, completion

# This file's routers gather arrivals for 20 ms (a wider window than other tests': its
# batching tests count what one window holds).
make_router = functools.partial(conftest.make_router, batch_window_ms=20)


def run(coro: Any) -> Any:
    return asyncio.run(coro)



def test_completion_and_chat_shapes(local_cluster: Any, tokenizer: Any) -> None:
    router = make_router(local_cluster(replicas=1), tokenizer)

    async def main() -> None:
        r = await call(router, "POST", "/v1/completions", json=completion(n=2))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        plen = len(tokenizer.encode("Hello there"))
        expected = "".join(f"{200 + (plen + i) % 50} " for i in range(3))
        assert [c["text"] for c in body["choices"]] == [expected, expected]
        assert [c["index"] for c in body["choices"]] == [0, 1]
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"] == {"prompt_tokens": plen, "completion_tokens": 6,
                                 "total_tokens": plen + 6}
        r = await call(router, "POST", "/v1/chat/completions", json=chat())
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["choices"][0]["message"]["content"].count(" ") == 3
        models = (await call(router, "GET", "/v1/models")).json()
        assert models["data"][0]["id"] == "fake-model"
        assert (await call(router, "GET", "/health")).status_code == 200

    run(main())


def test_non_streaming_requests_send_few_replica_events(local_cluster: Any,
                                                        tokenizer: Any) -> None:
    from model.requests import GenerationChunk

    client = local_cluster(replicas=1)
    chunk_events: list[int] = []
    plain_generate_batch = client.generate_batch

    def counting_generate_batch(target: Any, items: Any) -> Any:
        async def relay() -> Any:
            async for events in plain_generate_batch(target, items):
                chunk_events.append(sum(isinstance(e, GenerationChunk) for e in events))
                yield events
        return relay()

    client.generate_batch = counting_generate_batch
    router = make_router(client, tokenizer)
    plen = len(tokenizer.encode("Hello there"))
    expected = "".join(f"{200 + (plen + i) % 50} " for i in range(12))

    async def main() -> tuple[dict[str, Any], int, list[str], int]:
        r = await call(router, "POST", "/v1/completions",
                       json=completion(max_tokens=12, n=2, logprobs=1))
        assert r.status_code == 200, r.text
        plain_events = sum(chunk_events)
        chunk_events.clear()
        r2 = await call(router, "POST", "/v1/completions",
                        json=completion(max_tokens=12, stream=True))
        texts = [json.loads(line[6:])["choices"][0]["text"] for line in r2.text.splitlines()
                 if line.startswith("data: {")]
        return r.json(), plain_events, texts, sum(chunk_events)

    body, plain_events, streamed, stream_events = run(main())
    # the same answer as a streamed one, token logprobs included ...
    assert [c["text"] for c in body["choices"]] == [expected, expected]
    assert all(len(c["logprobs"]["tokens"]) == 12 for c in body["choices"])
    assert "".join(streamed) == expected
    # ... from the first chunk plus one merged chunk per choice, not one event per token
    assert plain_events == 3
    assert stream_events >= 12


def test_streaming_chat_is_sse_with_done(local_cluster: Any, tokenizer: Any) -> None:
    router = make_router(local_cluster(replicas=1), tokenizer)

    async def main() -> None:
        r = await call(router, "POST", "/v1/chat/completions",
                       json=chat(stream=True, stream_options={"include_usage": True}))
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.text.split("\n\n") if ln]
        assert lines[-1] == "data: [DONE]"
        events = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3
        text = "".join(e["choices"][0]["delta"]["content"] or "" for e in events[:-1])
        assert text.count(" ") == 3

    run(main())


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (completion(max_tokens="5"), 400, "max_tokens"),
    (completion(max_tokens=-1), 400, "max_tokens"),
    (completion(max_tokens=10**9), 400, "max_tokens"),
    (completion(temperature=1e9), 400, "temperature"),
    (completion(n=10**6), 400, "n"),
    (completion(prompt=[]), 400, "prompt"),
    (completion(model="gpt-4"), 404, "model"),
    (chat(messages=[]), 400, "messages"),
    (chat(messages=[{"role": "user"}]), 400, None),
    (chat(messages=[{"role": "wizard", "content": "x"}]), 400, None),
    (completion(prompt="word " * 400), 400, None),
    (completion(stop=[""]), 400, "stop"),
    (completion(prompt=[10**9]), 400, None),
])
def test_client_mistakes_are_4xx_in_error_shape(local_cluster: Any, tokenizer: Any,
                                                 body: Any, status: int,
                                                 param: str | None) -> None:
    router = make_router(local_cluster(replicas=1, max_model_len=256), tokenizer)
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body \
        else "/v1/completions"

    async def main() -> None:
        kwargs: dict[str, Any] = ({"content": body, "headers": {"content-type":
                                                                "application/json"}}
                                  if isinstance(body, bytes) else {"json": body})
        r = await call(router, "POST", path, **kwargs)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        if param is not None:
            assert error["param"] == param
        ok = await call(router, "POST", "/v1/completions", json=completion())
        assert ok.status_code == 200  # and the server answers normally after

    run(main())


def test_api_keys(local_cluster: Any, tokenizer: Any) -> None:
    router = make_router(local_cluster(replicas=1), tokenizer, api_keys="k1,k2")

    async def main() -> None:
        assert (await call(router, "GET", "/v1/models")).status_code == 401
        bad = await call(router, "GET", "/v1/models", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        good = await call(router, "POST", "/v1/completions", json=completion(),
                          headers={"Authorization": "Bearer k2"})
        assert good.status_code == 200
        assert (await call(router, "GET", "/health")).status_code == 200

    run(main())


def test_window_batches_and_burst_spreads(local_cluster: Any, tokenizer: Any) -> None:
    client = local_cluster(replicas=2, total_slots=4, step_s=0.02)
    router = make_router(client, tokenizer, batch_window_ms=50)

    async def main() -> None:
        await router.dispatcher.wait_ready(5)
        rs = await asyncio.gather(*(call(router, "POST", "/v1/completions", json=completion())
                                    for _ in range(8)))
        assert all(r.status_code == 200 for r in rs)
        # 8 arrivals within one window: one call per replica, 4 requests each
        assert sorted((t, len(ids)) for t, ids in client.calls) == [("r0", 4), ("r1", 4)]

    run(main())


def test_overload_sheds_with_retry_after_and_completes_the_rest(local_cluster: Any,
                                                                tokenizer: Any) -> None:
    client = local_cluster(replicas=2, total_slots=2, step_s=0.02)
    router = make_router(client, tokenizer, max_waiting_per_replica=2, batch_window_ms=5)

    async def main() -> None:
        await router.dispatcher.wait_ready(5)
        rs = await asyncio.gather(*(call(router, "POST", "/v1/completions",
                                         json=completion(max_tokens=5)) for _ in range(16)))
        codes = [r.status_code for r in rs]
        assert codes.count(200) == 8 and codes.count(429) == 8, codes
        for r in rs:
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1
                assert r.json()["error"]["type"] == "rate_limit_error"
            else:
                assert r.json()["choices"][0]["text"].count(" ") == 5

    run(main())


def test_deadline_while_queued_is_504(local_cluster: Any, tokenizer: Any) -> None:
    client = local_cluster(replicas=1, total_slots=1, step_s=0.05)
    router = make_router(client, tokenizer, max_waiting_per_replica=4)

    async def main() -> None:
        await router.dispatcher.wait_ready(5)
        long = asyncio.create_task(call(router, "POST", "/v1/completions",
                                        json=completion(max_tokens=20)))
        await asyncio.sleep(0.2)
        r = await call(router, "POST", "/v1/completions",
                       json=completion(max_tokens=2, deadline_s=0.2))
        assert r.status_code == 504, r.text
        assert r.json()["error"]["type"] == "timeout_error"
        assert (await long).status_code == 200

    run(main())


def test_no_healthy_replica_is_503(local_cluster: Any, tokenizer: Any) -> None:
    client = local_cluster(replicas=1)
    for server in client.servers.values():
        server.engine.dead = True
    router = make_router(client, tokenizer)

    async def main() -> None:
        r = await call(router, "POST", "/v1/completions", json=completion())
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_replica"
        assert (await call(router, "GET", "/health")).status_code == 503

    run(main())


def test_cancel_aborts_on_replica(local_cluster: Any, tokenizer: Any) -> None:
    client = local_cluster(replicas=1, step_s=0.02)
    router = make_router(client, tokenizer)
    engine = client.servers["r0"].engine

    async def main() -> None:
        await router.dispatcher.wait_ready(5)
        task = asyncio.create_task(call(router, "POST", "/v1/completions",
                                        json=completion(max_tokens=200)))
        for _ in range(100):
            await asyncio.sleep(0.02)
            if engine.running:
                break
        assert engine.running
        task.cancel()  # what Serve does to the handler when the client disconnects
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not engine.running:
                break
        assert not engine.running
        assert router.dispatcher.in_flight() == 0

    run(main())
