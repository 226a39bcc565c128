"""A streamed answer whose reader lags: chunks that are ready together go out as one SSE event
per choice, and the answer stays the one a non-streamed request gets (text, usage, finish
reason, logprobs per token, the error event).

The lag is made deterministic: the replica client below holds back every event of a batch
stream until the stream has ended, then hands them over in one list (as a router that fell
behind the engine finds them queued), so the router's stream sees every chunk at once.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from app.streams import coalesced
from model.requests import FinishReason, GenerationChunk, TokenLogprob
from tests.conftest import call, chat, completion, make_router


def held_back(client: Any) -> Any:
    """``client`` with every batch stream delivered in one list at its end."""
    plain = client.generate_batch

    def generate_batch(target: Any, items: Any) -> Any:
        async def relay() -> Any:
            events = [e async for batch in plain(target, items) for e in batch]
            yield events
        return relay()

    client.generate_batch = generate_batch
    return client


def sse_events(text: str) -> list[dict[str, Any]]:
    lines = [ln for ln in text.split("\n\n") if ln]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]


def plain_and_streamed(plain_router: Any, router: Any, body: dict[str, Any]) -> tuple[Any, Any]:
    """The completion answered whole by ``plain_router``, then streamed (with usage) by
    ``router``."""
    async def main() -> tuple[Any, Any]:
        plain = await call(plain_router, "POST", "/v1/completions", json=body)
        streamed = await call(router, "POST", "/v1/completions",
                              json={**body, "stream": True,
                                    "stream_options": {"include_usage": True}})
        return plain, streamed

    return asyncio.run(main())


def test_a_lagging_stream_sends_one_event_per_choice_with_the_whole_answer(
        local_cluster: Any, tokenizer: Any) -> None:
    router = make_router(held_back(local_cluster(replicas=1)), tokenizer)
    plain_router = make_router(local_cluster(replicas=1), tokenizer)
    body = completion(max_tokens=12, n=2, logprobs=1)

    plain, streamed = plain_and_streamed(plain_router, router, body)
    assert plain.status_code == 200 and streamed.status_code == 200, streamed.text
    events = sse_events(streamed.text)
    chunks, usage = events[:-1], events[-1]
    # one event per choice carries all 12 tokens (instead of 12 events per choice)
    assert sorted(e["choices"][0]["index"] for e in chunks) == [0, 1]
    expected = {c["index"]: c for c in plain.json()["choices"]}
    for event in chunks:
        choice = event["choices"][0]
        assert choice["text"] == expected[choice["index"]]["text"]
        assert choice["finish_reason"] == "length"
        # logprobs stay one entry per token, with offsets into the choice's text
        assert choice["logprobs"]["tokens"] == expected[choice["index"]]["logprobs"]["tokens"]
        assert choice["logprobs"]["text_offset"] == \
            expected[choice["index"]]["logprobs"]["text_offset"]
    assert usage["choices"] == [] and usage["usage"] == plain.json()["usage"]
    assert usage["usage"]["completion_tokens"] == 24


def test_a_lagging_stream_of_several_prompts_keeps_each_choice_whole(local_cluster: Any,
                                                                     tokenizer: Any) -> None:
    router = make_router(held_back(local_cluster(replicas=1)), tokenizer)
    body = completion(prompt=["Hello there", "Hi", "A longer prompt here"], max_tokens=10, n=2)

    plain, streamed = plain_and_streamed(router, router, body)
    events = sse_events(streamed.text)
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    for event in events[:-1]:
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            if choice["finish_reason"] is not None:
                finished[choice["index"]] = choice["finish_reason"]
    expected = {c["index"]: c["text"] for c in plain.json()["choices"]}
    assert texts == expected and len(expected) == 6
    assert finished == {i: "length" for i in range(6)}
    assert len(events) - 1 < 60  # fewer events than tokens: the ready ones went together
    assert events[-1]["usage"] == plain.json()["usage"]


def test_a_lagging_chat_stream_keeps_role_content_and_usage(local_cluster: Any,
                                                            tokenizer: Any) -> None:
    router = make_router(held_back(local_cluster(replicas=1)), tokenizer)

    async def main() -> tuple[Any, Any]:
        plain = await call(router, "POST", "/v1/chat/completions", json=chat(max_tokens=8))
        streamed = await call(router, "POST", "/v1/chat/completions",
                              json=chat(max_tokens=8, stream=True,
                                        stream_options={"include_usage": True}))
        return plain, streamed

    plain, streamed = asyncio.run(main())
    events = sse_events(streamed.text)
    assert len(events) == 2  # the whole answer, then the usage chunk
    delta = events[0]["choices"][0]["delta"]
    assert delta["role"] == "assistant"
    assert delta["content"] == plain.json()["choices"][0]["message"]["content"]
    assert events[0]["choices"][0]["finish_reason"] == "length"
    assert events[1]["usage"] == plain.json()["usage"]


def test_an_engine_error_after_ready_chunks_sends_them_then_the_error(local_cluster: Any,
                                                                      tokenizer: Any) -> None:
    client = held_back(local_cluster(replicas=1))
    engine = client.servers["r0"].engine
    plain_generate = engine.generate

    async def failing_generate(request: Any) -> Any:
        async for chunk in plain_generate(request):
            if chunk.completion_tokens == 4:  # the engine fails this choice inside a step
                yield GenerationChunk(chunk.request_id, chunk.index, "", (),
                                      finish_reason="error",
                                      prompt_tokens=chunk.prompt_tokens,
                                      completion_tokens=3)
                return
            yield chunk

    engine.generate = failing_generate
    router = make_router(client, tokenizer)
    r = asyncio.run(call(router, "POST", "/v1/completions",
                         json=completion(max_tokens=8, stream=True)))
    events = sse_events(r.text)
    plen = len(tokenizer.encode("Hello there"))
    assert events[0]["choices"][0]["text"] == "".join(
        f"{200 + (plen + i) % 50} " for i in range(3))
    assert events[1]["error"]["code"] == "engine_error"
    assert len(events) == 2


def _chunk(index: int, text: str, token: int, finish: FinishReason | None = None
           ) -> GenerationChunk:
    return GenerationChunk("r", index, text, (token,), logprobs=(TokenLogprob(token, -1.0),),
                           top_logprobs=((TokenLogprob(token, -1.0),),), finish_reason=finish,
                           prompt_tokens=5, completion_tokens=token)


def test_coalesced_merges_each_choice_in_order_of_first_appearance() -> None:
    ready = [(0, _chunk(1, "a", 1)), (0, _chunk(0, "b", 1)), (1, _chunk(0, "x", 1)),
             (0, _chunk(1, "c", 2)), (0, _chunk(0, "d", 2, "stop"))]
    out = coalesced(ready)
    assert [(t, c.index) for t, c in out] == [(0, 1), (0, 0), (1, 0)]
    merged = {(t, c.index): c for t, c in out}
    assert merged[(0, 1)].text == "ac" and merged[(0, 1)].token_ids == (1, 2)
    assert merged[(0, 1)].finish_reason is None and merged[(0, 1)].completion_tokens == 2
    assert merged[(0, 0)].text == "bd" and merged[(0, 0)].finish_reason == "stop"
    assert [lp.token_id for lp in merged[(0, 0)].logprobs] == [1, 2]
    assert len(merged[(0, 0)].top_logprobs) == 2
    assert merged[(1, 0)] == ready[2][1]  # alone: unchanged
    assert coalesced([]) == []
