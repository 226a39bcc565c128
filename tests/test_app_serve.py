"""Integration: real Ray Serve + real engine (embedded SmolLM2-135M), loopback only.

The module enters a private network namespace (root only; skipped otherwise; made by
tests/serve_harness.py) before it starts ``serve run app.main:build_app ...``: Ray binds
ports on all interfaces, and in the namespace only loopback exists. The server process
inherits the namespace; the test's own HTTP clients run in this thread, which is in it too.
One Serve instance (2 LLM replicas) serves the module; teardown stops it (SIGINT, then
harder), kills whatever is left in the namespace (all ours) and deletes it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster.isolation.netns import netns_supported
from tests.serve_harness import ServeInstance, serve_in_netns

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
PORT = 8123
SLOTS, QUEUE, REPLICAS = 4, 4, 2
NETNS_PREFIX = "rstest"  # the namespace is rstest-<pid>, its RAY_TMPDIR /tmp/rstest<pid>-*
PROMPT = "The capital of France is"
CHAT_PROMPT = "Name three colors."
SERVER_ARGS = [f"num_replicas={REPLICAS}", f"max_num_seqs={SLOTS}", "max_model_len=512",
               f"max_waiting_per_replica={QUEUE}", "batch_window_ms=5", "replica_num_cpus=0.5",
               "router_num_cpus=0.25"]
BIN = Path(sys.executable).parent
INSTANCE: list[ServeInstance] = []  # the module's Serve, once the fixture started it
MB = 1024 * 1024


def _reference(chat: bool, prompt: str, max_tokens: int) -> subprocess.Popen[str]:
    """`ringserve generate --json`, the engine run in-process, as the greedy reference."""
    cmd = [str(BIN / "ringserve"), "generate", "--json", "--quiet", "--prompt", prompt,
           "--max-tokens", str(max_tokens), "--max-model-len", "512"]
    return subprocess.Popen(cmd + (["--chat"] if chat else []), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def references() -> Iterator[dict[str, Any]]:
    procs = {"completion": _reference(False, PROMPT, 8), "chat": _reference(True, CHAT_PROMPT, 8)}
    out = {}
    for key, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        out[key] = json.loads(stdout)
    yield out


@pytest.fixture(scope="module")
def server(references: dict[str, Any]) -> Iterator[str]:
    if not netns_supported():
        pytest.skip("needs root and iproute2 for a private network namespace")
    with serve_in_netns(NETNS_PREFIX, SERVER_ARGS, PORT, REPLICAS, start_timeout_s=240) as serve:
        INSTANCE[:] = [serve]
        yield serve.base


def load(base: str) -> list[dict[str, Any]]:
    return httpx.get(f"{base}/load", timeout=10).json()["replicas"]


def test_openai_sdk_matches_engine_cli(server: str, references: dict[str, Any]) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8,
                                           temperature=0)
    ref = references["completion"]
    assert completion.choices[0].text == ref["text"]
    assert completion.choices[0].finish_reason == ref["finish_reason"]
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(ref["token_ids"])
    assert completion.usage.prompt_tokens == ref["prompt_tokens"]

    messages = [{"role": "user", "content": CHAT_PROMPT}]
    chat = client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                          max_tokens=8, temperature=0, logprobs=True,
                                          top_logprobs=2)
    assert chat.choices[0].message.content == references["chat"]["text"]
    assert chat.choices[0].logprobs is not None and chat.choices[0].logprobs.content
    assert len(chat.choices[0].logprobs.content) == len(references["chat"]["token_ids"])

    stream = client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                            max_tokens=8, temperature=0, stream=True)
    pieces, finish = [], None
    for chunk in stream:
        assert isinstance(chunk, openai.types.chat.ChatCompletionChunk)
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == references["chat"]["text"]
    assert finish == references["chat"]["finish_reason"]


async def _burst(base: str, n: int, max_tokens: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as http:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True}
        return await asyncio.gather(*(http.post("/v1/completions", json=body)
                                      for _ in range(n)))


def test_burst_is_spread_over_both_replicas(server: str) -> None:
    responses = asyncio.run(_burst(server, 2 * SLOTS, 8))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    replicas = {r.headers["x-ringserve-replica"] for r in responses}
    assert len(replicas) == REPLICAS


def test_overload_sheds_with_retry_after_and_finishes_the_rest(server: str) -> None:
    lone = httpx.post(f"{server}/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": PROMPT, "max_tokens": 16, "temperature": 0,
        "ignore_eos": True})
    single = lone.json()["choices"][0]["text"]
    responses = asyncio.run(_burst(server, 4 * SLOTS * REPLICAS, 16))
    codes = [r.status_code for r in responses]
    assert not [c for c in codes if c >= 500], codes
    shed = [r for r in responses if r.status_code == 429]
    done = [r for r in responses if r.status_code == 200]
    assert shed and done and len(shed) + len(done) == len(responses), codes
    assert len(done) >= SLOTS * REPLICAS  # everything that fit in the slots was accepted
    for r in shed:
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
    for r in done:
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "length"
        assert r.json()["usage"]["completion_tokens"] == 16
        assert choice["text"] == single
    # X-Ringserve-Queue-Ms: the router's arrival -> first engine event, within what the
    # client waited. The burst filled the slots and queued the rest: those waited for a
    # first-wave sequence to run its 16 tokens (at least about what the lone one's took).
    queued_ms = [int(r.headers["x-ringserve-queue-ms"]) for r in done]
    for r, ms in zip(done, queued_ms, strict=True):
        assert 0 <= ms <= 1000 * r.elapsed.total_seconds(), (ms, r.elapsed)
    lone_decode_ms = 1000 * lone.elapsed.total_seconds() - int(
        lone.headers["x-ringserve-queue-ms"])
    if len(done) > SLOTS * REPLICAS:
        assert max(queued_ms) >= 0.5 * lone_decode_ms, (sorted(queued_ms), lone_decode_ms)


def test_stream_disconnect_frees_the_slot(server: str) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400,
            "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            assert int(response.headers["x-ringserve-queue-ms"]) >= 0  # headers go out with
            lines = response.iter_lines()  # the first engine event: the wait is known
            started = time.monotonic()
            for line in lines:  # stream until the router's polls show the sequence running
                assert time.monotonic() - started < 30 and line != "data: [DONE]"
                if line.startswith("data:") and sum(
                        r["running_sequences"] for r in load(server)) >= 1:
                    break
        # leaving the block closes the connection mid-stream
    closed = time.monotonic()
    while any(r["running_sequences"] or r["ended_since_report"] for r in load(server)):
        assert time.monotonic() - closed < 2.0, load(server)
        time.sleep(0.05)


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", b"{\"model\": "),
    ("/v1/completions", {"model": MODEL, "prompt": 123}),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -5}),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**12}),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}),
    ("/v1/chat/completions", {"model": "no-such-model",
                              "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"model": MODEL, "prompt": "hello " * 600, "max_tokens": 4}),
])
def test_bad_requests_are_4xx_and_server_stays_up(server: str, path: str, body: Any) -> None:
    kwargs: dict[str, Any] = ({"content": body, "headers": {"content-type": "application/json"}}
                              if isinstance(body, bytes) else {"json": body})
    r = httpx.post(f"{server}{path}", timeout=60, **kwargs)
    assert 400 <= r.status_code < 500, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    ok = httpx.post(f"{server}/v1/completions", timeout=60,
                    json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200


# Security at the edge (issue 8) ---------------------------------------------------------


def _serve_process(role: str) -> int:
    """Pid of the one process of our namespace whose title names ``role``."""
    return INSTANCE[0].serve_process(role)


def _memory_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def _answers_normally(base: str) -> None:
    ok = httpx.post(f"{base}/v1/completions", timeout=60,
                    json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_a_50_mb_body_is_413_and_the_router_never_holds_it(server: str) -> None:
    router = _serve_process("ServeReplica:default:Router")
    proxy = _serve_process("ProxyActor")
    _answers_normally(server)  # warm: the router has tokenized and answered once
    before = {pid: _memory_kb(pid) for pid in (router, proxy)}
    for pid in (router, proxy):
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS: peaks from now on
    body = b'{"model": "%s", "prompt": "' % MODEL.encode() + b"a" * (50 * MB) + b'"}'

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is counted as it arrives
        for start in range(0, len(body), MB):
            yield body[start:start + MB]

    with httpx.Client(base_url=server, timeout=120) as http:
        for content in (body, chunked()):
            r = http.post("/v1/completions", content=content,
                          headers={"content-type": "application/json"})
            assert r.status_code == 413, r.text[:500]
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["code"] == "request_too_large"
            _answers_normally(server)
    after = {pid: _memory_kb(pid) for pid in (router, proxy)}
    # a prompt under the body limit that cannot fit: refused without tokenizing it
    big_prompt = httpx.post(f"{server}/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": "word " * (700 * 1024), "max_tokens": 2})
    assert big_prompt.status_code == 400, big_prompt.text[:500]
    assert big_prompt.json()["error"]["code"] == "context_length_exceeded"
    _answers_normally(server)
    after_prompt = _memory_kb(router)
    print(f"\nrouter RSS before {before[router]['VmRSS']} kB, peak during the 50 MB bodies "
          f"{after[router]['VmHWM']} kB, after {after[router]['VmRSS']} kB; proxy RSS before "
          f"{before[proxy]['VmRSS']} kB, peak {after[proxy]['VmHWM']} kB, after "
          f"{after[proxy]['VmRSS']} kB; router after a 3.5 MB prompt: peak "
          f"{after_prompt['VmHWM']} kB, now {after_prompt['VmRSS']} kB")
    baseline = before[router]["VmRSS"]
    assert after[router]["VmHWM"] <= 1.1 * baseline, (before, after)
    assert after[router]["VmRSS"] <= 1.1 * baseline, (before, after)
    assert after_prompt["VmRSS"] <= 1.1 * baseline, (before, after_prompt)
    # the proxy, which refused them, read at most the limit (4 MiB) of each, never 50 MB
    assert after[proxy]["VmHWM"] <= before[proxy]["VmRSS"] + 25 * 1024, (before, after)


def test_oversized_headers_are_refused(server: str) -> None:
    r = httpx.post(f"{server}/v1/completions", timeout=60,
                   headers={"x-padding": "p" * 100_000},
                   json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 431, r.text
    assert r.json()["error"]["code"] == "headers_too_large"
    _answers_normally(server)


def test_bad_input_fails_alone_while_a_concurrent_request_completes(
        server: str, references: dict[str, Any]) -> None:
    good = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    bad_bodies: list[dict[str, Any]] = [
        {**good, "seed": 2**70},  # was: a 500 for this request and every one in its step
        {**good, "prompt": "caf\ud800"},
        {"model": MODEL, "messages": [{"role": "user", "content": "\udfff"}]},
        {"model": MODEL, "messages": [{"role": "tool", "content": "hi"}]},
    ]

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, timeout=120) as http:
            calls = [http.post("/v1/completions", json=good)]
            for body in bad_bodies:
                path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
                calls.append(http.post(path, content=json.dumps(body).encode(),
                                       headers={"content-type": "application/json"}))
            return list(await asyncio.gather(*calls))

    first, *refused = asyncio.run(main())
    assert first.status_code == 200, first.text
    assert first.json()["choices"][0]["text"] == references["completion"]["text"]
    for r in refused:
        assert r.status_code == 400, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    developer = httpx.post(f"{server}/v1/chat/completions", timeout=120, json={
        "model": MODEL, "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "developer", "content": "Answer briefly."},
                     {"role": "user", "content": CHAT_PROMPT}]})
    assert developer.status_code == 200, developer.text
    _answers_normally(server)
