"""`ringserve serve`: the loopback forwarder on its own, and the whole command end to end.

The forwarder tests use plain loopback sockets (no namespace, no root). The end-to-end test
(root only) starts ``ringserve serve --isolate netns`` on a free port, talks to the embedded
model through the forwarder from the host namespace, stops it with SIGINT and checks that the
port, the namespace and every process that ran in it are gone.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cluster.isolation.forwarder import LoopbackForwarder, bind_listener
from cluster.isolation.netns import NetNamespace, netns_supported
from cluster.isolation.procfs import is_running
from tests.cli_process import BIN, free_port, interrupt, ringserve_serve, wait_until_ok

MODEL = "SmolLM2-135M-Instruct"


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


# Forwarder ------------------------------------------------------------------------------------
class Upstream:
    """A loopback server whose accepted sockets the test drives directly."""

    def __init__(self) -> None:
        self.listener = bind_listener("127.0.0.1", 0)
        self.listener.settimeout(5)
        self.port = int(self.listener.getsockname()[1])

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)

    def accept(self) -> socket.socket:
        conn, _ = self.listener.accept()
        conn.settimeout(5)
        return conn


@pytest.fixture
def forwarded() -> Iterator[tuple[Upstream, LoopbackForwarder]]:
    upstream = Upstream()
    forwarder = LoopbackForwarder(bind_listener("127.0.0.1", 0), upstream.connect)
    forwarder.start()
    yield upstream, forwarder
    forwarder.close()
    upstream.listener.close()


def test_forwarder_relays_both_ways_and_passes_half_close_on(
        forwarded: tuple[Upstream, LoopbackForwarder]) -> None:
    upstream, forwarder = forwarded
    client = socket.create_connection(forwarder.address, timeout=5)
    server = upstream.accept()
    client.sendall(b"ping")
    assert server.recv(100) == b"ping"
    server.sendall(b"pong")
    assert client.recv(100) == b"pong"
    big = os.urandom(3 * 1024 * 1024)  # more than any buffer on the way: backpressure works
    sender = threading.Thread(target=client.sendall, args=(big,))
    sender.start()
    received = b""
    while len(received) < len(big):
        received += server.recv(1 << 20)
    sender.join(timeout=5)
    assert received == big
    client.shutdown(socket.SHUT_WR)  # the client is done sending ...
    assert server.recv(100) == b""   # ... the server sees EOF ...
    server.sendall(b"still answering")  # ... and can still answer
    server.close()
    assert _recv_all(client) == b"still answering"
    client.close()


def test_forwarder_streams_small_writes_promptly(
        forwarded: tuple[Upstream, LoopbackForwarder]) -> None:
    upstream, forwarder = forwarded
    client = socket.create_connection(forwarder.address, timeout=5)
    server = upstream.accept()
    # SSE-like: each event arrives whole and alone before the next is sent. A forwarder that
    # held bytes back for more would leave recv waiting until the socket's timeout: an error.
    for i in range(20):
        server.sendall(f"data: {i}\n\n".encode())
        assert client.recv(100) == f"data: {i}\n\n".encode()
    client.close()
    assert server.recv(100) == b""  # a client disconnect reaches the server
    server.close()


def test_forwarder_close_frees_port_and_resets_open_connections() -> None:
    upstream = Upstream()
    forwarder = LoopbackForwarder(bind_listener("127.0.0.1", 0), upstream.connect)
    forwarder.start()
    address = forwarder.address
    client = socket.create_connection(address, timeout=5)
    server = upstream.accept()
    forwarder.close()
    with pytest.raises(OSError):
        socket.create_connection(address, timeout=2)
    for sock in (client, server):  # both ends learn at once: EOF or a reset
        try:
            assert sock.recv(10) == b""
        except ConnectionResetError:
            pass
    server.close()
    client.close()
    upstream.listener.close()


def test_forwarder_closes_client_when_upstream_is_down() -> None:
    dead_port = free_port()

    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", dead_port), timeout=2)

    forwarder = LoopbackForwarder(bind_listener("127.0.0.1", 0), connect)
    forwarder.start()
    try:
        client = socket.create_connection(forwarder.address, timeout=5)
        assert client.recv(10) == b""
        client.close()
    finally:
        forwarder.close()


def test_taken_port_is_a_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([str(BIN / "ringserve"), "serve", "--port", str(port),
                                 "--isolate", "none"], capture_output=True, text=True,
                                timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"ringserve: error: cannot listen on 127.0.0.1:{port}: Address already in use"]


# End to end -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_serve_in_netns_through_the_forwarder(tmp_path: Path) -> None:
    if not netns_supported():
        pytest.skip("needs root on Linux with iproute2 for a private network namespace")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with ringserve_serve(["--port", str(port), "--isolate", "netns", "--log-file", str(log),
                          "--start-timeout", "150", "max_model_len=256", "max_num_seqs=4"]
                         ) as proc:
        namespace = NetNamespace(f"ringserve-{proc.pid}")
        wait_until_ok(proc, f"{base}/health", 150, log)
        inside = namespace.pids()
        assert len(inside) > 3  # serve run and Ray's daemons live in the namespace

        with httpx.Client(base_url=base, timeout=60) as http:
            assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [MODEL]
            r = http.post("/v1/completions", json={
                "model": MODEL, "prompt": "The capital of France is", "max_tokens": 8,
                "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] >= 1
            body = {"model": MODEL, "stream": True, "max_tokens": 16, "temperature": 0,
                    "messages": [{"role": "user", "content": "Name three colors."}]}
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                events = [line for line in response.iter_lines() if line.startswith("data:")]
            assert len(events) >= 3 and events[-1] == "data: [DONE]"
            assert '"chat.completion.chunk"' in events[0]

        out, err = interrupt(proc)
    assert proc.returncode == 0, err
    assert f"serving {MODEL} at {base}/v1" in out
    assert err.strip().splitlines()[-1] == "ringserve: stopped"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           timeout=10).stdout.split()
    assert namespace.name not in names
    alive = [pid for pid in inside if is_running(pid)]
    assert not alive, alive

