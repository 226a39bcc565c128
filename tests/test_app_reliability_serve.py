"""Reliability on real Ray Serve (issue 14): overload and long runs, on one instance it owns.

One Serve instance (2 LLM replicas, embedded SmolLM2-135M, CPU) in a private network namespace
serves the whole module:

1. 3x sustained overload (open loop): every request is answered 200, 429 with a computed
   Retry-After (on arrival, or once accepted but not started within max_queue_wait_s), or 504
   past its own deadline; accepted streams start within max_queue_wait_s plus one prefill; a
   client that honours Retry-After is served. ``soak`` marker: 60 s.
2. Steady mixed traffic with cancellations (20 s; ``soak``: 10 min): router and replica RSS
   grow < 5% after warm-up, every slot and cache block is free at the end, the router's
   counters add up (accepted = completed + cancelled + errored + deadline + refused) and match
   what clients saw.
   A client that stops reading is disconnected after stream_stall_timeout_s, its slot freed.

Killing replicas and the router: tests/test_app_faults_serve.py (an instance of its own).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.serve_harness import ServeInstance, can_make_netns, serve_in_netns

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
PORT = 8124
SLOTS, QUEUE, REPLICAS = 4, 4, 2
HEALTH_PERIOD_S = 2.0
MAX_QUEUE_WAIT_S = 3.0
HTTP_PATH_ALLOWANCE_S = 2.0  # client TTFT beyond the server's queue + prefill (see below)
PROMPT = "The capital of France is"
STALL_S = 2.0
STALL_TOKENS = 400
SERVER_ARGS = [f"num_replicas={REPLICAS}", f"max_num_seqs={SLOTS}", "max_model_len=512",
               f"max_waiting_per_replica={QUEUE}", f"health_check_period_s={HEALTH_PERIOD_S}",
               f"max_queue_wait_s={MAX_QUEUE_WAIT_S}", "batch_window_ms=5",
               "replica_num_cpus=0.5", "router_num_cpus=0.25",
               f"stream_stall_timeout_s={STALL_S}"]
OVERLOAD_S = float(os.environ.get("RINGSERVE_OVERLOAD_S", "15"))
SOAK_OVERLOAD_S = 60.0
STEADY_S = float(os.environ.get("RINGSERVE_STEADY_S", "20"))
SOAK_STEADY_S = 600.0


@pytest.fixture(scope="module")
def serve() -> Iterator[ServeInstance]:
    if not can_make_netns():
        pytest.skip("needs root and iproute2 for a private network namespace")
    # Socket send buffers of at most 64 KB (Linux defaults grow to 4 MB): a client that stops
    # reading fills them within seconds, as it would over a real network path.
    with serve_in_netns("rs14rel", SERVER_ARGS, PORT, REPLICAS,
                        sysctls=["net.ipv4.tcp_wmem=4096 16384 65536"]) as instance:
        yield instance


@dataclass
class StreamResult:
    """What one streamed request saw, on the test's monotonic clock."""

    status: int = 0
    started_at: float = 0.0
    headers_at: float | None = None
    first_token_at: float | None = None
    ended_at: float | None = None
    error: dict[str, Any] | None = None  # an error event inside the stream
    done: bool = False  # data: [DONE] after the last chunk
    # completion tokens, as the stream's usage chunk counts them (under load the server
    # merges a stream's chunks, so events undercount)
    tokens: int = 0
    replica: str | None = None
    queued_s: float | None = None  # the router's arrival -> first engine event (its header)
    retry_after: int | None = None
    body: dict[str, Any] = field(default_factory=dict)  # a non-200 answer's JSON

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started_at


async def stream_completion(http: httpx.AsyncClient, max_tokens: int,
                            started: asyncio.Event | None = None,
                            deadline_s: float | None = None,
                            prompt: str = PROMPT) -> StreamResult:
    body: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                            "temperature": 0, "ignore_eos": True, "stream": True,
                            "stream_options": {"include_usage": True}}
    if deadline_s is not None:
        body["deadline_s"] = deadline_s
    res = StreamResult(started_at=time.monotonic())
    async with http.stream("POST", "/v1/completions", json=body) as r:
        res.status = r.status_code
        res.headers_at = time.monotonic()
        res.replica = r.headers.get("x-ringserve-replica")
        if "x-ringserve-queue-ms" in r.headers:
            res.queued_s = int(r.headers["x-ringserve-queue-ms"]) / 1000
        if r.status_code != 200:
            res.body = json.loads(await r.aread())
            if "retry-after" in r.headers:
                res.retry_after = int(r.headers["retry-after"])
            res.ended_at = time.monotonic()
            return res
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                res.done = True
                break
            event = json.loads(data)
            if "error" in event:
                res.error = event["error"]
                res.ended_at = time.monotonic()
                continue
            if event.get("usage"):
                res.tokens = event["usage"]["completion_tokens"]
            if not event.get("choices"):  # the usage chunk
                continue
            if res.first_token_at is None:
                res.first_token_at = time.monotonic()
                if started is not None:
                    started.set()
    res.ended_at = res.ended_at or time.monotonic()
    return res


def client(base: str, connections: int = 256, timeout_s: float = 120) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=base, timeout=timeout_s, limits=limits)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


# 1. Overload ----------------------------------------------------------------------------


async def _capacity(base: str, max_tokens: int) -> tuple[float, float]:
    """(requests/s the server completes when full, TTFT of a lone request on an idle one)."""
    async with client(base) as http:
        lone = await stream_completion(http, max_tokens)
        assert lone.status == 200 and lone.ttft is not None
        began = time.monotonic()
        full = await asyncio.gather(*(stream_completion(http, max_tokens)
                                      for _ in range(SLOTS * REPLICAS)))
        assert all(r.status == 200 and r.done for r in full), \
            [(r.status, r.replica, r.body, r.error) for r in full if r.status != 200 or not r.done]
        return len(full) / (time.monotonic() - began), lone.ttft


async def _overload(base: str, rate: float, duration_s: float, max_tokens: int
                    ) -> tuple[list[StreamResult], list[int]]:
    """Open-loop arrivals at ``rate``/s for ``duration_s``; plus one client that honours
    Retry-After until it is served (its attempts' statuses are returned)."""
    results: list[asyncio.Task[StreamResult]] = []
    patient: list[int] = []

    async with client(base, connections=1024, timeout_s=120) as http:
        async def honours_retry_after() -> None:
            await asyncio.sleep(duration_s / 3)  # well into the overload
            for _ in range(60):
                r = await stream_completion(http, max_tokens)
                patient.append(r.status)
                if r.status == 200:
                    assert r.done and r.error is None, r
                    return
                assert r.status == 429 and r.retry_after is not None, r
                await asyncio.sleep(r.retry_after)

        patient_task = asyncio.create_task(honours_retry_after())
        began = time.monotonic()
        i = 0
        while time.monotonic() - began < duration_s:
            # every fourth request carries a tight deadline of its own (504 if still queued)
            deadline = 0.5 if i % 4 == 3 else None
            results.append(asyncio.create_task(stream_completion(http, max_tokens,
                                                                 deadline_s=deadline)))
            i += 1
            await asyncio.sleep(max(0.0, began + i / rate - time.monotonic()))
        done = await asyncio.wait_for(asyncio.gather(*results), 180)
        await asyncio.wait_for(patient_task, 180)
    return list(done), patient


def _check_overload(serve: ServeInstance, duration_s: float) -> None:
    max_tokens = 16
    capacity, prefill = asyncio.run(_capacity(serve.base, max_tokens))
    rate = 3 * capacity
    results, patient = asyncio.run(_overload(serve.base, rate, duration_s, max_tokens))
    codes: dict[int, int] = {}
    for r in results:
        codes[r.status] = codes.get(r.status, 0) + 1
    accepted = [r for r in results if r.status == 200]
    ttfts = [r.ttft for r in accepted if r.ttft is not None]
    late = sum(1 for r in results if r.status == 429
               and r.body["error"]["code"] == "queue_wait_exceeded")
    print(f"\noverload {duration_s:g}s: capacity {capacity:.2f} req/s, offered {rate:.2f} "
          f"req/s ({len(results)} requests), statuses {codes} ({late} of the 429s refused "
          f"late: accepted, not started within {MAX_QUEUE_WAIT_S:g}s), accepted p50/p99 TTFT "
          f"{sorted(ttfts)[len(ttfts) // 2]:.2f}/{p99(ttfts):.2f}s (bound "
          f"{MAX_QUEUE_WAIT_S:g}s + lone TTFT {prefill:.2f}s), Retry-After client: {patient}")
    slowest = sorted(accepted, key=lambda r: r.ttft or 0)[-5:]
    print("slowest TTFTs (client s = router queue s + HTTP path s): " + ", ".join(
        f"{r.ttft:.2f} = {r.queued_s:.2f} + {(r.ttft or 0) - (r.queued_s or 0):.2f}"
        for r in slowest))
    assert set(codes) <= {200, 429, 504}, codes
    assert codes.get(200, 0) > 0 and codes.get(429, 0) > 0, codes
    for r in accepted:  # an accepted stream runs to its end (or, once started, never 504s)
        assert r.done and r.error is None and r.tokens == max_tokens, r
    for r in results:
        if r.status == 429:
            assert r.retry_after is not None and r.retry_after >= 1, r
            assert r.body["error"]["type"] == "rate_limit_error", r.body
        if r.status == 504:
            assert r.body["error"]["code"] is not None or r.body["error"]["message"], r.body
    assert len(ttfts) == len(accepted)
    assert all(r.queued_s is not None and 0 <= r.queued_s <= (r.ttft or 0) for r in accepted)
    queued = [r.queued_s or 0.0 for r in accepted]
    # The admission promise is max_queue_wait_s + one prefill: a request not started by then
    # is refused (429 queue_wait_exceeded), however wrong the wait prediction was. One that
    # starts just before that waits for the engine step in progress, then its own prefill in a
    # full batch, slower than the lone one on a loaded box: measured p99 ran 0.1-0.3 s over
    # (README, Reliability; 0.5-1.6 s before late refusals). The test allows 1 s for that, on
    # the server's own measure (X-Ringserve-Queue-Ms: router arrival -> first engine event).
    promise = MAX_QUEUE_WAIT_S + 1.0 + prefill
    assert p99(queued) <= promise, sorted(queued)[-5:]
    # What the client sees adds the HTTP path: Serve's proxy and the router's event loop on a
    # box whose 2 cores the replicas, the router, the proxy and this client saturate. Measured
    # 0.3-1.7 s for the slowest streams (README, Reliability); the test allows 2 s.
    assert p99(ttfts) <= promise + HTTP_PATH_ALLOWANCE_S, [
        (r.ttft, r.queued_s) for r in slowest]
    assert patient[-1] == 200, patient
    health = httpx.get(f"{serve.base}/health", timeout=10)
    assert health.status_code == 200 and health.json()["healthy_replicas"] == REPLICAS


def test_3x_overload_every_request_is_answered(serve: ServeInstance) -> None:
    _check_overload(serve, OVERLOAD_S)


@pytest.mark.soak
def test_3x_overload_for_60s(serve: ServeInstance) -> None:
    _check_overload(serve, SOAK_OVERLOAD_S)


# Steady mixed traffic (the long run) ---------------------------------------------------


def _rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


async def _mixed_traffic(base: str, duration_s: float, workers: int, on_warm: Any
                         ) -> dict[str, int]:
    """``workers`` closed-loop clients for ``duration_s``, cycling through: a completion, a
    streamed chat, a stream cancelled after 3 events, an n=2 completion, one with a tight
    deadline. ``on_warm()`` runs once a quarter of the time has passed. Client-side counts."""
    counts = {"ok": 0, "cancelled": 0, "shed": 0, "refused": 0, "deadline": 0}

    def refusal(status: int, body: dict[str, Any]) -> str:
        """A 429 on arrival is "shed"; one after acceptance (not started in time) "refused"."""
        if status != 429:
            return "deadline"
        return "refused" if body["error"]["code"] == "queue_wait_exceeded" else "shed"
    end = time.monotonic() + duration_s
    warm_at = time.monotonic() + duration_s / 4

    async def worker(w: int, http: httpx.AsyncClient) -> None:
        i = w
        while time.monotonic() < end:
            kind = i % 5
            i += 1
            if kind == 2:
                body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 64, "stream": True,
                        "ignore_eos": True}
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        assert r.status_code in (429, 504), await r.aread()
                        counts[refusal(r.status_code, json.loads(await r.aread()))] += 1
                        continue
                    seen = 0
                    async for line in r.aiter_lines():
                        seen += line.startswith("data: ")
                        if seen >= 3:
                            break  # leaving the block closes the connection mid-stream
                counts["cancelled"] += 1
                continue
            if kind == 1:
                res = await stream_completion(http, 16)
                if res.status == 200:
                    assert res.done and res.error is None, res
            else:
                body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8 + 8 * (i % 3),
                        "n": 2 if kind == 3 else 1}
                if kind == 4:
                    body["deadline_s"] = 0.3
                r = await http.post("/v1/completions", json=body)
                res = StreamResult(status=r.status_code,
                                   body=r.json() if r.status_code != 200 else {})
            assert res.status in (200, 429, 504), res
            counts["ok" if res.status == 200 else refusal(res.status, res.body)] += 1
            if res.status == 429:
                await asyncio.sleep(1.0)

    async def warm() -> None:
        await asyncio.sleep(max(0.0, warm_at - time.monotonic()))
        await asyncio.to_thread(on_warm)

    async with client(base) as http:
        await asyncio.wait_for(asyncio.gather(warm(), *(worker(w, http)
                                                         for w in range(workers))),
                               duration_s + 300)
    return counts


def _check_steady(serve: ServeInstance, duration_s: float) -> None:
    pids = {"router": serve.serve_process("ServeReplica:default:Router")}
    for k, pid in enumerate(sorted(serve.processes("ServeReplica:default:LLMServer"))):
        pids[f"replica{k}"] = pid
    before = httpx.get(f"{serve.base}/load", timeout=10).json()["requests"]
    warm: dict[str, int] = {}
    counts = asyncio.run(_mixed_traffic(
        serve.base, duration_s, 2 * SLOTS,
        lambda: warm.update({name: _rss_kb(pid) for name, pid in pids.items()})))
    began = time.monotonic()
    while True:  # the cancelled streams' aborts land within moments
        load = httpx.get(f"{serve.base}/load", timeout=10).json()
        if load["in_flight"] == 0 and all(r["running_sequences"] == 0 and r["ended_since_report"]
                                          == 0 for r in load["replicas"]):
            break
        assert time.monotonic() - began < 30, load
        time.sleep(0.2)
    end = {name: _rss_kb(pid) for name, pid in pids.items()}
    growth = {name: (end[name] - warm[name]) / warm[name] for name in pids}
    delta = {k: load["requests"][k] - before[k] for k in before}
    print(f"\nsteady {duration_s:g}s: clients saw {counts}; router counted {delta}; RSS after "
          f"warm-up {warm} kB, at the end {end} kB, growth "
          f"{ {k: f'{100 * v:+.2f}%' for k, v in growth.items()} }")
    for r in load["replicas"]:  # every slot and every KV cache block free again
        assert r["free_slots"] == r["total_slots"] and r["waiting_sequences"] == 0, r
        assert r["used_blocks"] == 0, r
    assert delta["accepted"] == sum(delta[k] for k in ("completed", "cancelled", "errored",
                                                       "deadline", "refused")), delta
    assert delta["accepted"] == (counts["ok"] + counts["cancelled"] + counts["deadline"]
                                 + counts["refused"]), (delta, counts)
    assert delta["errored"] == 0 and delta["deadline"] == counts["deadline"], (delta, counts)
    assert delta["refused"] == counts["refused"], (delta, counts)
    assert counts["ok"] > 0 and counts["cancelled"] > 0
    for name, g in growth.items():
        assert g < 0.05, (name, warm[name], end[name])


def test_steady_mixed_traffic_leaks_nothing(serve: ServeInstance) -> None:
    _check_steady(serve, STEADY_S)


@pytest.mark.soak
def test_steady_mixed_traffic_for_10_minutes(serve: ServeInstance) -> None:
    _check_steady(serve, SOAK_STEADY_S)


# Stalled client ------------------------------------------------------------------------


def test_a_stalled_client_is_disconnected_and_its_slot_freed(serve: ServeInstance) -> None:
    """A client reads the headers and one event of a long, fat stream (top_logprobs=20: ~2 KB
    per token), then stops reading with a 4 KB receive buffer. Once every buffer on the way is
    full, the proxy sees no progress for stream_stall_timeout_s: the request is cancelled (its
    slot frees long before 400 tokens) and the connection closed without [DONE]."""
    body = json.dumps({"model": MODEL, "max_tokens": STALL_TOKENS, "ignore_eos": True,
                       "stream": True, "logprobs": True, "top_logprobs": 20,
                       "messages": [{"role": "user", "content": "Tell me a long story."}]})
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               f"{body}").encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(60)
    sock.connect(("127.0.0.1", PORT))
    try:
        sock.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1024)
        assert head.startswith(b"HTTP/1.1 200"), head[:2000]
        while b"data: " not in head:
            head += sock.recv(1024)
        began = time.monotonic()

        def running() -> int:
            return sum(r["running_sequences"] + r["ended_since_report"] for r in httpx.get(
                f"{serve.base}/load", timeout=10).json()["replicas"])

        while running() == 0:  # a report from before it started shows none: wait for one
            assert time.monotonic() - began < 30, "the stream never showed as running"
            time.sleep(0.05)
        while True:  # the client reads nothing more
            if running() == 0:
                break
            assert time.monotonic() - began < 120, "the stalled stream was never cancelled"
            time.sleep(0.2)
        freed_after = time.monotonic() - began
        rest = b""
        sock.settimeout(30)
        while True:  # what was buffered on the way, then the server's close
            piece = sock.recv(65536)
            if not piece:
                break
            rest += piece
    finally:
        sock.close()
    events = (head + rest).count(b"data: ")
    print(f"\nstalled client: slot free {freed_after:.1f}s after it stopped reading "
          f"(stall timeout {STALL_S:g}s); it had been sent {events} of {STALL_TOKENS} events")
    assert b"[DONE]" not in rest, "the stream ran to its end: it was never cancelled"
    assert events < STALL_TOKENS
    _answers(serve.base)


def _answers(base: str) -> None:
    r = httpx.post(f"{base}/v1/completions", timeout=60,
                   json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4})
    assert r.status_code == 200, r.text

