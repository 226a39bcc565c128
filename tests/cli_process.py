"""A ``ringserve serve`` subprocess for end-to-end tests: start it, wait until a URL answers,
stop it with SIGINT as a user's Ctrl-C would (killing it only if it does not stop)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A loopback port free just now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(log: Path | None) -> str:
    return log.read_text()[-3000:] if log is not None and log.exists() else ""


def wait_until_ok(proc: subprocess.Popen[str], url: str, timeout_s: float,
                  log: Path | None = None, interval_s: float = 0.5) -> None:
    """Poll ``url`` until it answers 200; the test fails (with the log's tail) if ``proc``
    exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, (proc.communicate()[1], _tail(log))
        assert time.monotonic() < deadline, _tail(log)
        try:
            if httpx.get(url, timeout=3).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval_s)


def interrupt(proc: subprocess.Popen[str], timeout_s: float = 90.0) -> tuple[str, str]:
    """SIGINT, then the process's (stdout, stderr) once it exits; killed after ``timeout_s``
    (its return code then tells the test it did not stop by itself)."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate(timeout=10)


@contextmanager
def ringserve_serve(args: Sequence[str]) -> Iterator[subprocess.Popen[str]]:
    """``ringserve serve ARGS`` with its output captured; stopped the same way (SIGINT) if
    the test ends, passing or failing, without having stopped it."""
    proc = subprocess.Popen([str(BIN / "ringserve"), "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            interrupt(proc)
