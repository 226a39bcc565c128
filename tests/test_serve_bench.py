"""``ringserve bench serve`` against real HTTP servers on 127.0.0.1.

The server under load is the real Router app (FastAPI, OpenAI API, admission control) over
in-process LLMServer replicas around FakeEngine (tests/conftest.py), served by uvicorn on a free
loopback port in a thread: real sockets, SSE streaming and 429 shedding, no Ray. The
load generator runs as the ``ringserve`` CLI in a subprocess.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

from app.config import AppConfig
from app.router import Router, load_router_tokenizer
from bench.serve_bench import (
    build_workload,
    distribution_ms,
    llama_server_command,
    parse_slo,
    summarize,
)
from tests.conftest import make_local_cluster


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ThreadServer:
    """uvicorn serving an ASGI app on 127.0.0.1 in a daemon thread."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def router_server() -> Iterator[ThreadServer]:
    # one replica, 2 slots, nothing may queue: a closed loop of 6 clients gets some 429s
    config = AppConfig.model_validate({"batch_window_ms": 5, "stats_interval_s": 0.02,
                                       "max_waiting_per_replica": 0})
    router = Router(make_local_cluster(replicas=1, total_slots=2, step_s=0.002), config,
                    tokenizer=load_router_tokenizer(None))
    server = ThreadServer(router.http_app)
    yield server
    server.stop()


def bench_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", "bench", "serve", "--no-progress",
                           *args], capture_output=True, text=True, timeout=300)


def test_bench_serve_against_a_real_server(router_server: ThreadServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = bench_cli("--url", router_server.url, "--sweep", "1,6", "--num-requests", "12",
                       "--prompt-len", "4,40", "--output-len", "4,12", "--seed", "3",
                       "--slo", "ttft:5000,tpot:1000", "--out-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert "| server | load |" in result.stdout
    machine_line = result.stdout.splitlines()[0]  # the machine, measured, before the load
    assert machine_line.startswith("machine: ") and "memory " in machine_line, result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["latency_vs_throughput.png",
                                                      "results.json", "results.md"]
    assert (out / "latency_vs_throughput.png").read_bytes()[:4] == b"\x89PNG"
    assert "| concurrency 6 |" in (out / "results.md").read_text()
    saved = json.loads((out / "results.json").read_text())
    machine = saved["machine"]
    assert machine["cores"] >= 1 and machine["memory_gb_s"] > 0
    assert machine["fp32_matmul_gflop_s"] > 0 and isinstance(machine["simd"], list)
    runs = saved["runs"]
    assert [r["load"] for r in runs] == ["concurrency 1", "concurrency 6"]
    workload = build_workload(12, (4, 40), (4, 12), 3, None)
    for run in runs:
        assert run["completed"] + run["shed"] + run["failed"] == run["sent"] == 12
        assert sum(run["status_codes"].values()) == run["sent"]
        assert run["status_codes"].get("429", 0) == run["shed"]
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            dist = run[key]
            assert 0 < dist["median"] <= dist["p90"] <= dist["p99"], (key, dist)
        assert run["ttft_ms"]["median"] <= run["e2e_ms"]["median"]
        assert run["goodput"] <= run["request_throughput"] + 1e-9
        done = [r for r in run["requests"] if r["status"] == 200 and r["error"] is None]
        # FakeEngine produces exactly max_tokens tokens: the client counted every one
        assert done and all(r["output_tokens"] == r["max_tokens"] for r in done)
        assert sorted(r["max_tokens"] for r in run["requests"]) == sorted(
            w.max_tokens for w in workload)
        assert run["output_tokens"] == sum(r["output_tokens"] for r in done)
        assert len(run["loadavg_1m"]) == 2
        assert run["decode_tok_s"] == pytest.approx(1000 / run["tpot_ms"]["median"])
    assert runs[0]["completed"] == 12  # one at a time: nothing is shed
    assert runs[1]["shed"] > 0  # 6 clients, 2 slots, no queue: some are refused with 429


def test_bench_serve_poisson_with_a_peer_prints_ratios(router_server: ThreadServer) -> None:
    result = bench_cli("--url", router_server.url, "--url", router_server.url, "--no-machine",
                       "--request-rate", "50", "--max-concurrency", "2", "--num-requests", "6",
                       "--prompt-len", "4,8", "--output-len", "3,5")
    assert result.returncode == 0, result.stderr
    assert f"{router_server.url} / {router_server.url} #2, rate 50/s, max 2: output tok/s" in (
        result.stdout)


def test_refused_url_gives_one_line_and_fails() -> None:
    result = bench_cli("--url", f"http://127.0.0.1:{free_port()}", "--num-requests", "2")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot connect" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_server_answering_404_gives_one_line_and_fails() -> None:
    server = ThreadServer(FastAPI())  # no routes: every path is a 404
    try:
        result = bench_cli("--url", server.url, "--num-requests", "2")
    finally:
        server.stop()
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "answered HTTP 404" in lines[0], result.stderr


def test_llama_server_peer_needs_a_binary(router_server: ThreadServer,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLAMA_SERVER", raising=False)
    for extra in ([], ["/nonexistent/llama-server"]):
        result = bench_cli("--url", router_server.url, "--no-machine", "--num-requests", "1",
                           "--llama-server", *extra)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "--llama-server" in lines[0], result.stderr


def test_llama_server_command_serves_the_default_gguf_on_loopback(tmp_path: Path) -> None:
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    command, url = llama_server_command(str(binary), None, slots=16, threads=2)
    words = command.split()
    assert words[0] == str(binary) and words[words.index("-m") + 1].endswith(".gguf")
    assert words[words.index("-np") + 1] == "16" and words[words.index("-t") + 1] == "2"
    assert words[words.index("-c") + 1] == str(16 * 1024)
    assert words[words.index("--host") + 1] == "127.0.0.1"
    assert url == f"http://127.0.0.1:{words[words.index('--port') + 1]}"


def test_figures() -> None:
    dist = distribution_ms([0.001 * i for i in range(1, 101)])
    assert (dist["median"], dist["p90"], dist["p99"]) == pytest.approx((50.5, 90.0, 99.0))
    assert parse_slo("ttft:200,tpot:50") == {"ttft": 200.0, "tpot": 50.0}
    assert summarize([], 1.0, {})["sent"] == 0
    first = build_workload(5, (3, 9), (2, 4), 1, 2.0)
    assert first == build_workload(5, (3, 9), (2, 4), 1, 2.0)  # seeded
    assert all(3 <= w.prompt_words <= 9 and 2 <= w.max_tokens <= 4 for w in first)
    assert [w.arrival_s for w in first] == sorted(w.arrival_s for w in first)
