"""A dead router's streams are aborted on the LLM replica (issue 14, item 1: kill the router).

Ray keeps a replica's stream running when its caller dies, so the LLM replica watches its
callers itself: every call names the router replica (``caller``), the router's load polls are
its heartbeat, and the requests of a caller silent for ``orphan_timeout_s`` are aborted. Real
LLMServer objects around FakeEngine (tests/conftest.py), no Ray; the Serve test that SIGKILLs
the router is in tests/test_app_reliability_serve.py.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from app.config import AppConfig
from app.llm_server import BatchItem, LLMServer
from app.replica_client import ServeReplicaClient
from model.requests import GenerationChunk, GenerationRequest, SamplingParams
from tests.conftest import FakeEngine, fake_status


def batch(prefix: str, count: int, max_tokens: int) -> list[BatchItem]:
    return [BatchItem(GenerationRequest(f"{prefix}{i}", (1, 2, 3),
                                        SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
            for i in range(count)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def read_until_running(stream: Any, engine: FakeEngine, running: int) -> None:
    """Read the stream's first events until the engine runs ``running`` sequences."""
    async for _ in stream:
        if len(engine.running) >= running:
            return
    raise AssertionError(f"the stream ended before {running} sequences ran")


def test_a_silent_callers_requests_are_aborted_and_a_polling_callers_run_on() -> None:
    engine = FakeEngine(total_slots=8, step_s=0.01, max_model_len=200_000)
    clock = FakeClock()
    server = LLMServer(lambda: engine, "r0", orphan_timeout_s=10.0, status_of=fake_status,
                       clock=clock)

    async def main() -> list[GenerationChunk]:
        dead = server.generate_batch(batch("dead", 3, 1000), caller="router-a")
        await read_until_running(dead, engine, 3)  # router-a read a little, then died
        live = server.generate_batch(batch("live", 2, 60), caller="router-b")
        await read_until_running(live, engine, 5)
        clock.now += 6.0
        await server.stats(caller="router-b")  # router-b keeps polling; router-a is silent
        assert server.reap_orphans() == 0  # nobody silent for 10 s yet
        clock.now += 6.0  # router-a: 12 s silent, router-b: 6 s
        assert server.reap_orphans() == 3
        for _ in range(100):  # cancelled within a few fake-engine steps
            if not any(s.startswith("dead") for s in engine.running):
                break
            await asyncio.sleep(0.01)
        chunks = [e for events in [ev async for ev in live] for e in events
                  if isinstance(e, GenerationChunk)]
        await dead.aclose()  # type: ignore[attr-defined]
        return chunks

    chunks = asyncio.run(main())
    assert not engine.running
    assert sorted(engine.aborted) == ["dead0", "dead1", "dead2"]
    assert server.orphans_aborted == 3
    finished = [c for c in chunks if c.finish_reason is not None]
    assert sorted(c.request_id for c in finished) == ["live0", "live1"]
    assert all(c.finish_reason == "length" and c.completion_tokens == 60 for c in finished)
    assert server.reap_orphans() == 0  # router-a is forgotten; nothing left to abort


def test_the_reaper_runs_by_itself_and_frees_the_slots() -> None:
    engine = FakeEngine(total_slots=4, step_s=0.01, max_model_len=200_000)
    server = LLMServer(lambda: engine, "r0", orphan_timeout_s=0.3, status_of=fake_status)

    async def main() -> float:
        stream = server.generate_batch(batch("o", 4, 100_000), caller="router-gone")
        await read_until_running(stream, engine, 4)
        loop = asyncio.get_running_loop()
        began = loop.time()
        while engine.running:  # nothing calls again: the reaper must notice alone
            assert loop.time() - began < 30, engine.running
            await asyncio.sleep(0.05)
        await stream.aclose()  # type: ignore[attr-defined]
        return loop.time() - began

    asyncio.run(main())
    assert server.orphans_aborted == 4 and len(engine.aborted) == 4
    assert engine.generated < 4 * 100_000


def test_calls_without_a_caller_are_never_reaped() -> None:
    engine = FakeEngine(total_slots=2, step_s=0.01)
    clock = FakeClock()
    server = LLMServer(lambda: engine, "r0", orphan_timeout_s=1.0, status_of=fake_status,
                       clock=clock)

    async def main() -> int:
        stream = server.generate_batch(batch("anon", 1, 30))
        await read_until_running(stream, engine, 1)
        clock.now += 1000.0
        reaped = server.reap_orphans()
        rest = [e async for e in stream]
        assert rest
        return reaped

    assert asyncio.run(main()) == 0
    assert not engine.aborted


def test_the_serve_client_names_its_router_in_every_call() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    def method(name: str) -> Any:
        async def remote(*args: Any, **kwargs: Any) -> None:
            seen.append((name, kwargs))

        call = SimpleNamespace(remote=remote)
        call.options = lambda **_: SimpleNamespace(
            remote=lambda *a, **k: seen.append((name, k)))
        return call

    handle = SimpleNamespace(app_name="default", deployment_name="LLMServer",
                             stats=method("stats"), abort=method("abort"),
                             generate_batch=method("generate_batch"))
    client = ServeReplicaClient(handle)  # type: ignore[arg-type]

    async def main() -> None:
        await client.stats("r0")
        await client.abort("r0", ["x"])
        client.generate_batch("r0", [])

    asyncio.run(main())
    assert [name for name, _ in seen] == ["stats", "abort", "generate_batch"]
    assert all(kw["caller"] == client.caller and kw["target"] == "r0" for _, kw in seen)
    assert client.caller.startswith("router-")  # outside Serve: a random id of its own


def test_orphan_timeout_must_leave_room_for_the_heartbeat() -> None:
    assert AppConfig().orphan_timeout_s == 10.0
    assert AppConfig(orphan_timeout_s="none").orphan_timeout_s is None
    with pytest.raises(ValidationError, match="orphan_timeout_s"):
        AppConfig(orphan_timeout_s=0.5, stats_interval_s=0.2)


# The drain rate the router divides by -------------------------------------------------------

class CountingEngine(FakeEngine):
    """Reports a step-time rate of 100 tokens/s and whatever token totals the test sets."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.busy = True

    def stats(self) -> Any:
        from dataclasses import replace

        return replace(super().stats(), tokens_per_s=100.0, prefill_tokens_per_s=400.0,
                       running_sequences=1 if self.busy else 0, generated_tokens_total=self.total)


def test_reported_rates_are_what_the_replica_drains_per_wall_clock_second() -> None:
    engine = CountingEngine()
    clock = FakeClock()
    server = LLMServer(lambda: engine, "r0", status_of=fake_status, clock=clock)

    def poll(advance_s: float, tokens: int) -> Any:
        clock.now += advance_s
        engine.total += tokens
        return asyncio.run(server.stats())

    first = poll(0.0, 0)
    assert first.stats.tokens_per_s == 100.0  # nothing measured yet: the engine's own rate
    for _ in range(10):  # 2 s of work at 50 tokens per wall second: steps take half the time
        snap = poll(0.2, 10)
    assert snap.stats.tokens_per_s == pytest.approx(50.0)
    assert snap.stats.prefill_tokens_per_s == pytest.approx(200.0)  # scaled alike
    engine.busy = False
    for _ in range(5):  # an idle stretch is not slowness: it does not count
        snap = poll(1.0, 0)
    engine.busy = True
    for _ in range(60):  # 12 s at the full rate: the slow stretch has left the window
        snap = poll(0.2, 20)
    assert snap.stats.tokens_per_s == pytest.approx(100.0)
    for _ in range(60):  # never above the engine's own figure, never below the floor
        snap = poll(0.2, 0)
    assert snap.stats.tokens_per_s == pytest.approx(50.0)
