"""Integration: real Ray Serve with its default pool runs 32 chat-length requests at once.

Before the paged cache every sequence reserved a whole 4096-row slot (189 MB on the embedded
model), so the default 2 GiB pool ran 11 sequences and a burst of 32 was partly shed. Now a
~100-token prompt with 64 output tokens holds 11 blocks of 16 positions: all 32 run together
(the replica's running count, read from ``/load``, reaches 32) and none is shed: with the
default shedding, as a request that can start at once has no predicted queue wait. Runs in a
private network namespace (root only; skipped otherwise), see tests/serve_harness.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from cluster.isolation.netns import netns_supported
from tests.serve_harness import serve_in_netns

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
PORT = 8177
NETNS_PREFIX = "rsP"
CONCURRENCY, OUTPUT_TOKENS = 32, 64
SENTENCE = "The rolling buffer keeps only the last window of keys and values in memory. "


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    if not netns_supported():
        pytest.skip("needs root and iproute2 for a private network namespace")
    # the defaults throughout (one replica, max_num_seqs 32, max_model_len 4096, the 2 GiB KV
    # pool, max_queue_wait_s 60): each request of the burst can start at once, so the
    # admission predicts no queue wait for it however slow the shared box measures.
    with serve_in_netns(NETNS_PREFIX, [], PORT, 1, start_timeout_s=240) as serve:
        yield serve.base


async def _burst_watching_load(base: str) -> tuple[list[httpx.Response], list[dict[str, Any]]]:
    limits = httpx.Limits(max_connections=CONCURRENCY + 4,
                          max_keepalive_connections=CONCURRENCY + 4)
    seen: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
        done = asyncio.Event()

        async def watch() -> None:
            while not done.is_set():
                seen.extend((await http.get("/load")).json()["replicas"])
                await asyncio.sleep(0.2)

        async def one(i: int) -> httpx.Response:
            body = {"model": MODEL, "prompt": f"Note {i}. " + SENTENCE * 7,
                    "max_tokens": OUTPUT_TOKENS, "temperature": 0, "ignore_eos": True}
            return await http.post("/v1/completions", json=body)

        watcher = asyncio.ensure_future(watch())
        responses = await asyncio.gather(*(one(i) for i in range(CONCURRENCY)))
        done.set()
        await watcher
    return list(responses), seen


def test_defaults_run_32_chat_requests_at_once_and_shed_none(server: str) -> None:
    before = httpx.get(f"{server}/load", timeout=10).json()["replicas"][0]
    assert before["total_slots"] == CONCURRENCY
    assert before["total_blocks"] * before["block_size"] >= 4096  # a 4096-token one fits
    responses, seen = asyncio.run(_burst_watching_load(server))
    codes = [r.status_code for r in responses]
    assert codes == [200] * CONCURRENCY, [r.text for r in responses if r.status_code != 200]
    usage = [r.json()["usage"] for r in responses]
    assert all(90 <= u["prompt_tokens"] <= 130 for u in usage), usage
    assert all(u["completion_tokens"] == OUTPUT_TOKENS for u in usage)
    assert max(s["running_sequences"] for s in seen) == CONCURRENCY
    busiest = max(seen, key=lambda s: s["used_blocks"])
    assert 0 < busiest["used_blocks"] <= CONCURRENCY * 12  # ~11 blocks a sequence
    assert busiest["used_blocks"] < busiest["total_blocks"] // 4
