"""Faults and slow clients without Ray (issue 14): fake replicas that die, clients that stall.

The replicas are real LLMServer objects around FakeEngine (tests/conftest.py) behind a
ReplicaClient that can "kill" one: its streams break and its polls fail, as a SIGKILLed Serve
replica's do. The Router's FastAPI app is driven in-process (httpx's ASGI transport, or raw
ASGI calls where a test must control how fast the client reads).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping
from typing import Any

import httpx

from app.admission import Accepted, AdmissionLimits, LoadBoard, Shed
from app.config import AppConfig
from app.edge import EdgeGuard, EdgeLimits, StallGuard, limits_from_env, proxy_env
from app.load import ReplicaLoad
from tests.conftest import (
    LocalClient,
    completion,
    make_local_cluster,
    make_router,
    replica_load,
)


class KillableClient(LocalClient):
    """LocalClient whose replicas can die: open streams raise, calls fail, like Serve's
    ActorDiedError for a killed replica."""

    def __init__(self, servers: dict[str, Any]) -> None:
        super().__init__(servers)
        self.dead: set[str] = set()

    def kill(self, target: str) -> None:
        self.dead.add(target)

    async def stats(self, target: Any) -> Any:
        if target in self.dead:
            raise RuntimeError(f"replica {target} died")
        return await super().stats(target)

    def generate_batch(self, target: Any, items: Any) -> Any:
        inner = super().generate_batch(target, items)

        async def stream() -> Any:
            try:
                async for events in inner:
                    if target in self.dead:
                        raise RuntimeError(f"replica {target} died")
                    yield events
            finally:
                await inner.aclose()

        if target in self.dead:
            raise RuntimeError(f"replica {target} died")
        return stream()


def killable(replicas: int, **engine: Any) -> KillableClient:
    return KillableClient(make_local_cluster(replicas, **engine).servers)


async def stream_events(http: httpx.AsyncClient, body: dict[str, Any]
                        ) -> tuple[int, list[dict[str, Any]], str | None]:
    """(status, the stream's JSON events, its replica header)."""
    async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = []
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
        return r.status_code, events, r.headers.get("x-ringserve-replica")


def snap(rid: str, healthy: bool = True) -> ReplicaLoad:
    return replica_load(rid, free_slots=4, total_slots=4, tokens_per_s=100.0,
                        prefill_tokens_per_s=100.0, healthy=healthy)


# LoadBoard ------------------------------------------------------------------------------


def test_an_answer_from_another_replica_marks_the_target_gone() -> None:
    board = LoadBoard()
    board.set_replicas(["a", "b"])
    board.report(snap("a"), 1.0, target="a")
    board.report(snap("b"), 1.0, target="b")
    assert board.healthy_ids() == ["a", "b"]
    # the poll aimed at "a" was answered by "b": Serve no longer has "a"
    board.report(snap("b"), 2.0, target="a")
    assert board.healthy_ids() == ["b"]
    board.report(snap("a"), 3.0, target="a")  # it answers again (restarted under its id)
    assert board.healthy_ids() == ["a", "b"]


def test_a_replica_that_stops_answering_turns_unhealthy_after_max_report_age() -> None:
    board = LoadBoard(AdmissionLimits(max_report_age_s=2.0))
    board.set_replicas(["a"])
    board.report(snap("a"), 10.0, target="a")
    assert board.healthy_ids(now=11.9) == ["a"]
    assert board.healthy_ids(now=12.1) == []
    assert "no healthy" in board.admit("r1", 5).message  # type: ignore[union-attr]


def test_forced_admission_never_sheds() -> None:
    board = LoadBoard(AdmissionLimits(max_queue_wait_s=0.1, max_waiting=0))
    board.set_replicas(["a"])
    board.report(replica_load("a", waiting_sequences=4, waiting_tokens=400,
                              running_sequences=4, free_slots=0, total_slots=4,
                              tokens_per_s=10.0, prefill_tokens_per_s=10.0), 1.0)
    assert isinstance(board.admit("r1", 10), Shed)
    placed = board.admit("r1", 10, force=True)
    assert isinstance(placed, Accepted) and placed.replica_id == "a"


# Replica death --------------------------------------------------------------------------


def test_killing_one_replica_fails_only_its_started_streams(tokenizer: Any) -> None:
    """r0 and r1 each run 2 streams and queue 2 more; r0 dies. r0's 2 started streams end with
    an error event; its 2 queued requests move to r1 and complete; r1's 4 complete."""
    client = killable(2, total_slots=2, step_s=0.02)
    router = make_router(client, tokenizer, max_waiting_per_replica=8, max_queue_wait_s=60)
    engines = {rid: s.engine for rid, s in client.servers.items()}

    async def main() -> None:
        await router.dispatcher.wait_ready(5)
        transport = httpx.ASGITransport(app=router.http_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            tasks = [asyncio.create_task(stream_events(http, completion(max_tokens=40)))
                     for _ in range(8)]
            for _ in range(200):
                await asyncio.sleep(0.01)
                if all(len(e.waiting) == 2 and e.generated >= 4 for e in engines.values()):
                    break  # both run 2 streams that have sent tokens, and queue 2
            assert all(len(e.waiting) == 2 and e.generated >= 4 for e in engines.values())
            client.kill("r0")
            results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        failed = [(s, ev, rep) for s, ev, rep in results if "error" in ev[-1]]
        ok = [(s, ev, rep) for s, ev, rep in results if "error" not in ev[-1]]
        assert all(s == 200 for s, _, _ in results)
        assert len(failed) == 2 and {rep for _, _, rep in failed} == {"r0"}
        for _, events, _ in failed:
            assert events[0]["choices"]  # it had streamed tokens before the kill
            assert set(events[-1]["error"]) == {"message", "type", "param", "code"}
            assert events[-1]["error"]["code"] == "no_healthy_replica" or \
                "replica" in events[-1]["error"]["message"]
        assert len(ok) == 6 and {rep for _, _, rep in ok} == {"r1"}
        for _, events, _ in ok:
            assert sum(len(e["choices"][0]["text"].split()) for e in events) == 40
        assert router.dispatcher.in_flight() == 0
        assert router.dispatcher.board.healthy_ids() == ["r1"]

    asyncio.run(main())


def test_health_is_503_while_no_replica_answers_and_200_once_one_does(tokenizer: Any) -> None:
    client = killable(1, step_s=0.01)
    router = make_router(client, tokenizer)

    async def main() -> None:
        transport = httpx.ASGITransport(app=router.http_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            assert (await http.get("/health")).status_code == 200
            client.kill("r0")
            for _ in range(100):  # within a few polls (stats_interval_s 0.05)
                r = await http.get("/health")
                if r.status_code != 200:
                    break
                await asyncio.sleep(0.02)
            assert r.status_code == 503, r.text
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            assert r.json()["error"]["code"] == "no_healthy_replica"
            queued = asyncio.create_task(http.post("/v1/completions", json=completion()))
            await asyncio.sleep(0.3)
            client.dead.clear()  # "Serve restarted it"
            for _ in range(100):
                r = await http.get("/health")
                if r.status_code == 200:
                    break
                await asyncio.sleep(0.02)
            assert r.status_code == 200, r.text
            r = await queued  # it waited for a healthy replica rather than failing
            assert r.status_code == 200, r.text

    asyncio.run(main())


def test_a_queued_request_fails_with_503_when_no_replica_comes_back(tokenizer: Any,
                                                                    monkeypatch: Any) -> None:
    import app.dispatcher as dispatcher

    monkeypatch.setattr(dispatcher, "REPLACE_WAIT_S", 0.5)
    client = killable(1, total_slots=1, step_s=0.02)
    router = make_router(client, tokenizer, max_waiting_per_replica=4, max_queue_wait_s=60)
    engine = client.servers["r0"].engine

    async def main() -> None:
        await router.dispatcher.wait_ready(5)
        transport = httpx.ASGITransport(app=router.http_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            running = asyncio.create_task(stream_events(http, completion(max_tokens=50)))
            queued = asyncio.create_task(http.post("/v1/completions", json=completion()))
            for _ in range(200):
                await asyncio.sleep(0.01)
                if engine.waiting and engine.generated >= 2:
                    break  # one streams, one waits
            client.kill("r0")
            status, events, _ = await asyncio.wait_for(running, 10)
            assert status == 200 and "error" in events[-1]
            r = await asyncio.wait_for(queued, 10)
            assert r.status_code == 503, r.text
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert router.dispatcher.in_flight() == 0

    asyncio.run(main())


# Slow and stalled clients ---------------------------------------------------------------


async def raw_stream(app: Any, body: dict[str, Any], read: Any) -> list[bytes]:
    """Drive the ASGI app directly; ``read(n)`` is awaited before the n-th body message is
    accepted (how fast this client reads)."""
    payload = json.dumps({**body, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path":
             b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(payload)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    sent = False
    disconnected = asyncio.Event()
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.body":
            await read(len(chunks))
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return chunks


def test_a_slow_reader_does_not_slow_other_streams(tokenizer: Any) -> None:
    """One client reads its first event, then nothing until the test lets it go on; the
    replica runs it and three fast streams together. The fast ones end while it is stuck at
    its first events, and its own sequence finishes on the replica meanwhile (buffered for
    it, not generated at its pace); released, it reads the whole answer (what waited for it
    comes coalesced, in fewer events). Nothing here depends on
    how fast the machine is."""
    client = make_local_cluster(1, total_slots=4, step_s=0.01)
    router = make_router(client, tokenizer)
    engine = client.servers["r0"].engine

    async def main() -> None:
        await router.dispatcher.wait_ready(5)
        slow_read = 0
        fast_done_at: list[int] = []
        release = asyncio.Event()

        async def slow(n: int) -> None:
            nonlocal slow_read
            slow_read = n
            if n >= 2:  # the headers and the first event, then it stops reading
                await release.wait()

        async def fast(_n: int) -> None:
            return None

        async def fast_stream() -> None:
            chunks = await raw_stream(router.http_app, completion(max_tokens=60), fast)
            assert b"[DONE]" in chunks[-2] + chunks[-1]
            fast_done_at.append(slow_read)

        slow_task = asyncio.create_task(raw_stream(router.http_app,
                                                   completion(max_tokens=60), slow))
        await asyncio.wait_for(asyncio.gather(*(fast_stream() for _ in range(3))), 60)
        assert max(fast_done_at) <= 2, fast_done_at
        for _ in range(3000):  # the slow one's sequence ends on the replica all the same
            if not engine.running:
                break
            await asyncio.sleep(0.01)
        assert not engine.running and slow_read <= 2, slow_read
        release.set()
        chunks = await asyncio.wait_for(slow_task, 30)
        text = b"".join(chunks).decode()
        assert text.endswith("data: [DONE]\n\n")
        # every token, though what waited for it arrives in fewer events (coalesced)
        events = [json.loads(e[len("data: "):]) for e in text.split("\n\n")
                  if e.startswith("data: {")]
        plen = len(tokenizer.encode("Hello there"))
        assert "".join(e["choices"][0]["text"] for e in events) == "".join(
            f"{200 + (plen + i) % 50} " for i in range(60))
        assert events[-1]["choices"][0]["finish_reason"] == "length"

    asyncio.run(main())


def test_a_stalled_client_is_cancelled_and_its_slot_freed(tokenizer: Any) -> None:
    """The client stops reading after 3 events; past stream_stall_timeout_s its request is
    cancelled on the replica (slot free) long before its 240 tokens were made."""
    client = make_local_cluster(1, total_slots=2, step_s=0.01)
    router = make_router(client, tokenizer, stream_stall_timeout_s=0.3)
    engine = client.servers["r0"].engine
    forever = asyncio.Event()

    async def stalls(n: int) -> None:
        if n >= 3:
            await forever.wait()

    async def main() -> None:
        await router.dispatcher.wait_ready(5)
        chunks = await asyncio.wait_for(
            raw_stream(router.http_app, completion(max_tokens=240), stalls), 10)
        assert len(chunks) == 3  # what it read; the rest was dropped
        for _ in range(100):
            if not engine.running:
                break
            await asyncio.sleep(0.01)
        assert not engine.running and engine.aborted, engine.aborted
        assert engine.generated < 240
        assert router.dispatcher.in_flight() == 0

    asyncio.run(main())


def test_stall_guard_passes_a_reading_client_through_untouched() -> None:
    received: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        received.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(5):
            await send({"type": "http.response.body", "body": b"x%d" % i, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        await asyncio.sleep(0.01)
        sent.append(message)

    async def main() -> None:
        guard = StallGuard(receive, send, 1.0)
        await app({}, guard.receive, guard.send)
        assert not guard.stalled.is_set()

    asyncio.run(main())
    assert received[0]["type"] == "http.request" and len(sent) == 7


def test_stall_timeout_knob_reaches_the_proxy(monkeypatch: Any) -> None:
    assert "RINGSERVE_STREAM_STALL_TIMEOUT_S" not in proxy_env(1024, 1024)
    for value, expected in (("2.5", 2.5), ("0", None)):
        env = proxy_env(1024, 1024, expected)
        assert env["RINGSERVE_STREAM_STALL_TIMEOUT_S"] == value
        monkeypatch.setenv("RINGSERVE_STREAM_STALL_TIMEOUT_S", value)
        assert limits_from_env().stall_timeout_s == expected
    assert AppConfig.model_validate({"stream_stall_timeout_s": "none"}).stream_stall_timeout_s \
        is None
    assert AppConfig().edge_limits().stall_timeout_s == 60.0
    from app.launch_plan import Launch, edge_env  # `ringserve serve` passes it too

    launch = Launch({"stream_stall_timeout_s": "5"}, None, "127.0.0.1", 8000)
    assert edge_env(launch)["RINGSERVE_STREAM_STALL_TIMEOUT_S"] == "5"
    config = {"applications": [{"args": {"stream_stall_timeout_s": 5}}, {"args": {}}]}
    assert "RINGSERVE_STREAM_STALL_TIMEOUT_S" not in edge_env(
        Launch({}, config, "127.0.0.1", 8000))  # the default 60 s, the more patient
    async def inner_app(scope: Any, receive: Any, send: Any) -> None:
        return None

    assert EdgeGuard(inner_app, EdgeLimits()).limits.stall_timeout_s == 60.0


# Counters -------------------------------------------------------------------------------


def test_request_counters_add_up_through_every_way_a_request_ends(tokenizer: Any) -> None:
    """Completed, cancelled (client left), deadline (504 while queued) and errored (replica
    died mid-stream) requests: /load's counters account for every accepted one."""
    client = killable(2, total_slots=1, step_s=0.01)
    router = make_router(client, tokenizer, max_waiting_per_replica=8, max_queue_wait_s=60)

    async def main() -> dict[str, Any]:
        await router.dispatcher.wait_ready(5)
        transport = httpx.ASGITransport(app=router.http_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            done = [await http.post("/v1/completions", json=completion(max_tokens=2))
                    for _ in range(3)]
            assert all(r.status_code == 200 for r in done)
            # fresh reports: one polled while the last request ran would still show it running
            # and tie the two replicas, so both long streams could queue on one of them
            await router.dispatcher.poll()
            long = [asyncio.create_task(stream_events(http, completion(max_tokens=100)))
                    for _ in range(2)]  # one per replica, both slots busy
            engines = [server.engine for server in client.servers.values()]
            for _ in range(300):  # (a fixed sleep was too short on a loaded box)
                await asyncio.sleep(0.01)
                if all(e.running for e in engines):
                    break
            assert all(e.running for e in engines), "the long streams did not fill both slots"
            late = await http.post("/v1/completions",
                                   json=completion(max_tokens=2, deadline_s=0.1))
            assert late.status_code == 504, late.text
            left = asyncio.create_task(http.post("/v1/completions", json=completion()))
            await asyncio.sleep(0.1)
            left.cancel()  # its client goes away while it waits
            client.kill("r0")
            results = await asyncio.gather(*long)
            assert sum(1 for _, events, _ in results if "error" in events[-1]) == 1
            await asyncio.sleep(0.2)
            return (await http.get("/load")).json()

    load = asyncio.run(main())
    tally = load["requests"]
    print(tally)
    assert load["in_flight"] == 0
    assert tally["accepted"] == 3 + 2 + 1 + 1
    assert (tally["completed"], tally["cancelled"], tally["errored"], tally["deadline"]) == (
        3 + 1, 1, 1, 1)
    assert tally["refused"] == 0
    assert tally["accepted"] == sum(tally[k] for k in ("completed", "cancelled", "errored",
                                                       "deadline", "refused"))


# Late refusal ---------------------------------------------------------------------------


def test_an_accepted_request_not_started_within_max_queue_wait_is_refused_429(
        tokenizer: Any) -> None:
    """One slot, busy with a long stream. Admission predicts a short wait from the engine's
    rate (the prior 64 tokens a sequence), so the next requests are accepted; they do not start
    within max_queue_wait_s, so each is answered 429 with Retry-After (a stream too: its
    headers had not been sent), never served late; one whose own deadline comes first is a
    504. A streamed request of two prompts is exempt and waits its turn. /load counts every
    one of them."""
    client = killable(1, total_slots=1, step_s=0.002, max_model_len=8192)
    router = make_router(client, tokenizer, max_waiting_per_replica=8, max_queue_wait_s=1.0)
    engine = client.servers["r0"].engine

    async def main() -> tuple[list[httpx.Response], int, list[dict[str, Any]], dict[str, Any]]:
        await router.dispatcher.wait_ready(5)
        transport = httpx.ASGITransport(app=router.http_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            long = asyncio.create_task(stream_events(http, completion(max_tokens=5000)))
            for _ in range(500):
                await asyncio.sleep(0.01)
                if engine.generated >= 5:
                    break
            assert engine.running, "the long stream never started"

            async def streamed(body: dict[str, Any]) -> httpx.Response:
                async with http.stream("POST", "/v1/completions",
                                       json={**body, "stream": True}) as r:
                    await r.aread()
                    return r

            refused = await asyncio.gather(
                http.post("/v1/completions", json=completion(max_tokens=2)),
                streamed(completion(max_tokens=2)),
                http.post("/v1/completions", json=completion(max_tokens=2, deadline_s=0.3)))
            assert engine.running, "the long stream ended before the others were refused"
            await router.dispatcher.poll()  # a report from before the refusals would shed it
            two = asyncio.create_task(stream_events(
                http, completion(prompt=["Hello there", "General Kenobi"], max_tokens=2)))
            await asyncio.sleep(1.5)  # past its max_queue_wait_s, still queued
            assert not two.done()
            long.cancel()  # the long stream's client leaves: the slot frees
            status, events, _ = await two
            await asyncio.sleep(0.2)
            return list(refused), status, events, (await http.get("/load")).json()

    refused, status, events, load = asyncio.run(main())
    late = refused[:2]
    for r in late:
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) >= 1
        error = r.json()["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "queue_wait_exceeded")
    assert refused[2].status_code == 504, refused[2].text
    assert status == 200 and len(events) == 2 * 2 and "error" not in events[-1], events
    started = set(engine.started_requests)
    assert len(started) == 1 + 2  # the long one and the two prompts: no refused one ran
    tally = load["requests"]
    assert (tally["accepted"], tally["refused"], tally["deadline"], tally["cancelled"],
            tally["completed"]) == (1 + 3 + 2, 2, 1, 1, 2), tally
    assert tally["accepted"] == sum(tally[k] for k in ("completed", "cancelled", "errored",
                                                       "deadline", "refused"))
    assert load["in_flight"] == 0


def test_a_hung_replica_neither_starting_nor_refusing_is_backed_up_by_the_router(
        tokenizer: Any, monkeypatch: Any) -> None:
    """The replica accepts the batch and answers its load polls but never starts or refuses
    the request (its engine stopped stepping): the router refuses it 429
    ``queue_wait_exceeded`` START_BY_GRACE_S past its start_by, aborts it on the replica, and
    counts it ``refused``."""
    import app.dispatcher as dispatcher_module

    monkeypatch.setattr(dispatcher_module, "START_BY_GRACE_S", 0.3)

    class HungClient(LocalClient):
        def __post_init__(self) -> None:
            super().__post_init__()
            self.aborted: list[str] = []

        def generate_batch(self, target: Any, items: Any) -> Any:
            self.calls.append((target, [i.request.request_id for i in items]))

            async def never() -> Any:
                await asyncio.Event().wait()
                yield []  # pragma: no cover - never reached

            return never()

        async def abort(self, target: Any, request_ids: Any) -> None:
            self.aborted.extend(request_ids)

    client = HungClient(make_local_cluster(1).servers)
    router = make_router(client, tokenizer, max_queue_wait_s=0.5)

    async def main() -> tuple[httpx.Response, dict[str, Any]]:
        await router.dispatcher.wait_ready(5)
        transport = httpx.ASGITransport(app=router.http_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            r = await asyncio.wait_for(
                http.post("/v1/completions", json=completion(max_tokens=2)), 30)
            await asyncio.sleep(0.1)
            return r, (await http.get("/load")).json()

    r, load = asyncio.run(main())
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "queue_wait_exceeded"
    assert int(r.headers["retry-after"]) >= 1
    assert len(client.calls) == 1 and client.aborted == client.calls[0][1]
    assert load["requests"]["refused"] == 1 and load["in_flight"] == 0
