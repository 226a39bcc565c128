"""Integration: the real app and a real Prometheus in one private network namespace.

One Serve instance (1 LLM replica, 2 slots, window 32 so rings wrap, a KV pool of 5 blocks
where two growing sequences need 6, so one is preempted) takes traffic that makes every
metric happen: completions, streaming chats, a bad request, an unknown model, a client that
disconnects mid-stream, a request that is still queued at its deadline (504) behind two that
outgrow the pool (a preemption) and a burst that is shed (429). Debian's ``prometheus``
(started here on 127.0.0.1 in the same namespace) scrapes Ray's metrics agent through this
run's own service-discovery file. Then: every metric of app/metrics.py is on Ray's metrics
endpoint, every panel query of every dashboard returns data from Prometheus, and the overview
is drawn to a PNG (RINGSERVE_DASHBOARD_PNG_DIR keeps it; default: pytest's tmp dir). Needs
root and iproute2 (skipped otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.metrics import METRICS, exported_names
from cluster.monitoring import (
    LocalPrometheus,
    metrics_targets,
    wait_for_discovery_file,
    write_config,
)
from dashboards.build import all_dashboards, concrete, panel_queries, to_json
from dashboards.render import prometheus_get, render

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
PORT = 8124  # inside the namespace: nothing else listens there
PROMETHEUS_PORT = 9090
BASE = f"http://127.0.0.1:{PORT}"
SLOTS = 2
# Window 32, blocks of 16: a sequence holds at most R = ceil(31 / 16) + 1 = 3 blocks. A block
# of SmolLM2-135M in fp32 is 2 * 30 layers * 16 * 3 KV heads * 64 * 4 bytes = 737280 bytes:
# 5 of them, so two sequences that both grow to 3 blocks cannot run together.
BLOCK_BYTES, POOL_BLOCKS = 737280, 5
SHORT_PROMPT = "Count to fifty:"  # under 16 tokens: one block at admission
SERVER_ARGS = ["num_replicas=1", f"max_num_seqs={SLOTS}", "max_model_len=256", "window=32",
               f"kv_cache_memory={BLOCK_BYTES * POOL_BLOCKS}", "max_waiting_per_replica=2",
               "batch_window_ms=5", "replica_num_cpus=0.5", "router_num_cpus=0.25",
               f"port={PORT}", "host=127.0.0.1"]
# Longer than W = 32 tokens: prompt + output pass the window, so the ring wraps.
LONG_PROMPT = ("The rolling buffer keeps the last W positions of every sequence, and the "
               "attention of each layer looks back at most W tokens. ") * 3
CLONE_NEWNET = 0x40000000
BIN = Path(sys.executable).parent
WAIT_FOR_METRICS_S = 240.0


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns failed")


def _ns_pids(name: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                         timeout=10).stdout
    return [int(p) for p in out.split()]


@dataclass
class Stack:
    base: str
    prometheus: LocalPrometheus
    ray_metrics: list[str]  # host:port of Ray's metrics agents
    started: float  # time.time() when Prometheus started


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2 for a private network namespace")
    if not shutil.which("prometheus"):
        pytest.skip("Debian's prometheus is not installed and `make setup` could not install "
                    "it (not root?)")
    prefix = os.environ.get("RINGSERVE_TEST_NETNS_PREFIX", "rsmon")
    name = f"{prefix}{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    proc: subprocess.Popen[bytes] | None = None
    prometheus: LocalPrometheus | None = None
    tmp = Path(tempfile.mkdtemp(prefix="rsm", dir="/tmp"))  # short: Ray's socket paths
    log = open(tmp / "serve.log", "wb")  # closed in teardown
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                       check=True, timeout=10)
        ns_fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
        _setns(ns_fd)  # this thread, and every process it starts, is in the namespace now
        os.close(ns_fd)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=str(tmp),
                   RAY_metrics_report_interval_ms="2000")
        proc = subprocess.Popen([str(BIN / "serve"), "run", "app.main:build_app", *SERVER_ARGS],
                                cwd=Path(__file__).resolve().parents[1], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (tmp / "serve.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "Serve did not become healthy"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{BASE}/health", timeout=5).status_code == 200:
                    break
            time.sleep(2)
        discovery = wait_for_discovery_file(tmp)
        config = write_config(discovery, tmp / "prometheus", scrape_interval_s=2)
        prometheus = LocalPrometheus.start(config, tmp / "prometheus", PROMETHEUS_PORT)
        prometheus.wait_ready()
        yield Stack(BASE, prometheus, metrics_targets(discovery), time.time())
    finally:
        if prometheus is not None:
            prometheus.stop()
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        _setns(original)  # first: this process must not count as one in the namespace
        os.close(original)
        for _ in range(20):  # what is left in the namespace is ours
            pids = [p for p in _ns_pids(name) if p != os.getpid()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        log.close()
        subprocess.run(["ip", "netns", "del", name], timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


# Traffic -------------------------------------------------------------------------------------
def _completion(max_tokens: int, prompt: str = LONG_PROMPT, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, **extra}


async def _running(http: httpx.AsyncClient) -> int:
    replicas = (await http.get("/load")).json()["replicas"]
    return sum(r["running_sequences"] for r in replicas)


async def _deadline_while_full(http: httpx.AsyncClient) -> int:
    """Fill both slots, then send a request with a tiny deadline: still queued -> 504.

    The two fills start with one block each and grow to R = 3 at position 32: the pool of 5
    cannot hold both, so the newer one is preempted (requeued, recomputed), and the late
    request queues behind it."""
    fill = [asyncio.create_task(http.post("/v1/completions",
                                          json=_completion(48, prompt=SHORT_PROMPT)))
            for _ in range(SLOTS)]
    started = time.monotonic()
    while await _running(http) < SLOTS:
        assert time.monotonic() - started < 60, "the slots never filled"
        await asyncio.sleep(0.05)
    late = await http.post("/v1/completions", json=_completion(4, deadline_s=0.2))
    for r in await asyncio.gather(*fill):
        assert r.status_code == 200, r.text
    return late.status_code


async def _stream_chat(http: httpx.AsyncClient) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": LONG_PROMPT}],
            "max_tokens": 24, "stream": True, "ignore_eos": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        lines = [line async for line in response.aiter_lines() if line.startswith("data:")]
    return lines[-1]


async def _disconnect(http: httpx.AsyncClient) -> None:
    """Read a few chunks of a long stream, then hang up."""
    async with http.stream("POST", "/v1/completions",
                           json=_completion(150, stream=True)) as response:
        assert response.status_code == 200, await response.aread()
        seen = 0
        async for line in response.aiter_lines():
            seen += line.startswith("data:")
            if seen >= 3:
                break


async def _traffic(base: str) -> dict[str, list[int]]:
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    codes: dict[str, list[int]] = {}
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as http:
        for _ in range(2):  # two rounds: counters grow between scrapes, so rates are > 0
            ok = await asyncio.gather(*(http.post("/v1/completions", json=_completion(16))
                                        for _ in range(2)))
            codes.setdefault("completions", []).extend(r.status_code for r in ok)
            ends = [await _stream_chat(http), await _stream_chat(http)]
            assert all(end == "data: [DONE]" for end in ends), ends
            bad = await http.post("/v1/completions", json={"model": MODEL, "prompt": 123})
            unknown = await http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
            codes.setdefault("bad", []).extend([bad.status_code, unknown.status_code])
            await _disconnect(http)
            codes.setdefault("deadline", []).append(await _deadline_while_full(http))
            burst = await asyncio.gather(*(http.post("/v1/completions", json=_completion(24))
                                           for _ in range(4 * SLOTS + 4)))
            codes.setdefault("burst", []).extend(r.status_code for r in burst)
            await asyncio.sleep(3)  # a scrape or two between the rounds
    return codes


@pytest.fixture(scope="module")
def traffic(stack: Stack) -> dict[str, list[int]]:
    return asyncio.run(_traffic(stack.base))


# Checks ----------------------------------------------------------------------------------------
def _ray_endpoint_names(targets: list[str]) -> set[str]:
    names = set()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for target in targets:
        with opener.open(f"http://{target}/metrics", timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line and not line.startswith("#"):
                    names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names


def _instant(prometheus_url: str, expr: str) -> list[dict[str, Any]]:
    return list(prometheus_get(prometheus_url, "query", {"query": expr})["result"])


def _empty_queries(prometheus_url: str) -> list[str]:
    empty = []
    for dashboard in all_dashboards():
        for title, expr in panel_queries(to_json(dashboard)):
            if not _instant(prometheus_url, concrete(expr, rate_interval="5m")):
                empty.append(f"{dashboard.name} / {title}: {expr}")
    return empty


def _wait_until(check: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_FOR_METRICS_S
    missing = check()
    while missing and time.monotonic() < deadline:
        time.sleep(3)
        missing = check()
    assert not missing, f"{what} after {WAIT_FOR_METRICS_S:.0f}s: {missing}"


def test_traffic_did_what_the_metrics_need(traffic: dict[str, list[int]]) -> None:
    pool = httpx.get(f"{BASE}/load", timeout=10).json()["replicas"][0]
    assert pool["total_blocks"] == POOL_BLOCKS and pool["block_size"] == 16, pool
    assert set(traffic["completions"]) == {200}
    assert traffic["bad"] == [400, 404, 400, 404]
    assert traffic["deadline"] == [504, 504]
    assert 429 in traffic["burst"] and 200 in traffic["burst"], traffic["burst"]
    assert not [c for c in traffic["burst"] if c >= 500]


def test_every_metric_is_on_rays_metrics_endpoint(stack: Stack,
                                                  traffic: dict[str, list[int]]) -> None:
    assert stack.ray_metrics, "the discovery file names no metrics agent"
    expected = {name for spec in METRICS for name in exported_names(spec)}
    _wait_until(lambda: sorted(expected - _ray_endpoint_names(stack.ray_metrics)),
                "missing on Ray's metrics endpoint")


def test_every_panel_query_returns_data(stack: Stack, traffic: dict[str, list[int]]) -> None:
    url = stack.prometheus.url
    targets = prometheus_get(url, "targets", {})["activeTargets"]
    assert targets and all(t["health"] == "up" for t in targets), targets
    _wait_until(lambda: _empty_queries(url), "panel queries without data")
    # the traffic ran across several scrapes: its busiest figures are positive, not just there
    for expr in ('sum(rate(ray_ringserve_requests_total{status="200"}[5m]))',
                 "sum(rate(ray_ringserve_generated_tokens_total[5m]))",
                 "sum(rate(ray_ringserve_ring_overwritten_rows_total[5m]))",
                 'histogram_quantile(0.5, sum by (le) (rate('
                 'ray_ringserve_time_to_first_token_seconds_bucket{side="router"}[5m])))',
                 'sum(ray_ringserve_shed_requests_total{reason="queue_full"})',
                 'sum(ray_ringserve_shed_requests_total{reason="deadline"})',
                 'sum(ray_ringserve_finished_requests_total{reason="abort"})',
                 "sum(ray_ringserve_preemptions_total)"):
        values = [float(r["value"][1]) for r in _instant(url, expr)]
        assert values and all(math.isfinite(v) and v > 0 for v in values), (expr, values)


def test_overview_renders_to_png(stack: Stack, traffic: dict[str, list[int]],
                                 tmp_path: Path) -> None:
    _wait_until(lambda: _empty_queries(stack.prometheus.url), "panel queries without data")
    out_dir = Path(os.environ.get("RINGSERVE_DASHBOARD_PNG_DIR") or tmp_path)
    minutes = (time.time() - stack.started) / 60  # all that Prometheus has seen
    for dashboard in all_dashboards():
        path = render(to_json(dashboard), stack.prometheus.url,
                      out_dir / f"dashboard-{dashboard.name}.png", minutes=minutes)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 20_000  # many charts with lines, not an empty canvas
