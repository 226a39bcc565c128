"""One ``ringserve serve`` run: start ``serve run``, wait for ``/health``, watch it, clean up.

:class:`ServeRun` holds what a run holds (the host port, the network namespace, the loopback
forwarder, the ``serve run`` process and its log, ``--monitoring``'s Prometheus) and
``close()`` releases it all in order, also when start-up fails. :func:`supervise` waits for
``/health``, prints the URL and watches the process until a signal; a failure is reported as
one line naming the first ringserve error in the log.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from app.launch_plan import Launch, ServeCliError, edge_env, serve_command
from cluster.isolation import IsolationError
from cluster.isolation.forwarder import LoopbackForwarder
from cluster.isolation.netns import NetNamespace
from cluster.isolation.process_group import die_with_parent, kill_all, stop_process_group
from cluster.isolation.procfs import session_pids
from cluster.monitoring import MonitoringError, MonitoringRun

EXIT_FAILED = 1
NETNS_PREFIX = "ringserve"  # a run's namespace is ringserve-<its pid>
SAFE_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}
TMP_PREFIX = "rsv"  # /tmp/rsv<pid>-XXXXXXXX is a run's RAY_TMPDIR
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
# A ringserve error raised in a replica, as Ray logs it: "model.weights.WeightsError: msg".
USER_ERROR_LINE = re.compile(
    r"(?:^|\s)(?:model|app)\.[\w.]*?(\w+(?:Error|Missing)): (.+)$", re.MULTILINE)


def log(message: str) -> None:
    print(f"ringserve: {message}", file=sys.stderr, flush=True)


def _get_json(url: str, timeout: float = 3.0) -> tuple[int, Any]:
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # our own server
    try:
        with no_proxy.open(url, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None


def _client_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _url(host: str, port: int) -> str:
    host = _client_host(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _report_failure(what: str, log_path: Path | None) -> None:
    """One error line naming the first ringserve error in the log, else the log's tail first."""
    text = ""
    if log_path is not None and log_path.exists():
        with open(log_path, "rb") as fh:  # the last MiB: a long run's log can be large
            fh.seek(max(0, log_path.stat().st_size - (1 << 20)))
            text = ANSI_ESCAPE.sub("", fh.read().decode("utf-8", "replace"))
    cause = USER_ERROR_LINE.search(text)
    where = f" (log: {log_path})" if log_path else ""
    if cause:
        log(f"error: {what}: {cause.group(1)}: {cause.group(2).strip()}{where}")
        return
    if text:
        print("\n".join(text.splitlines()[-30:]), file=sys.stderr)
    log(f"error: {what}{where}")


@dataclass
class ServeRun:
    """What one ``ringserve serve`` holds while it runs; ``close()`` releases it in order."""

    tmp: Path  # RAY_TMPDIR: private (ray.init must find no other local cluster), short paths
    listener: socket.socket | None = None  # the host port, until the forwarder takes it
    ns: NetNamespace | None = None
    forwarder: LoopbackForwarder | None = None
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    log_path: Path | None = None
    prom_listener: socket.socket | None = None  # --monitoring's port, until Prometheus runs
    monitoring: MonitoringRun | None = None

    def start(self, launch: Launch, args: argparse.Namespace, isolate: str) -> None:
        """Make the namespace (or fall back), start ``serve run``, start forwarding."""
        if isolate == "netns":
            self._make_namespace(fallback=args.isolate != "netns")
        if self.ns is None:
            log("warning: --isolate none: Ray's internal ports (GCS, dashboard, metrics, "
                 "workers) listen on all interfaces")
        inner_host = "127.0.0.1" if self.ns is not None else launch.host
        command = serve_command(launch, inner_host, launch.port, self.tmp)
        if self.ns is not None:
            command = self.ns.exec_prefix() + command
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(SAFE_ENV, RAY_TMPDIR=str(self.tmp), PYTHONUNBUFFERED="1")
        env.update(edge_env(launch))
        if args.log_file != "-":
            self.log_path = Path(args.log_file or _default_log(launch.port)).expanduser()
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log = open(self.log_path, "wb")  # closed in close()
        where = f"network namespace {self.ns.name}" if self.ns else "the host network"
        log(f"starting Ray Serve in {where}"
             + (f" (log: {self.log_path})" if self.log_path else ""))
        # No threads yet: preexec_fn is only safe before the forwarder starts.
        self.proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self.log,
                                     stderr=subprocess.STDOUT if self.log else None,
                                     start_new_session=True,
                                     preexec_fn=die_with_parent(os.getpid()))
        if self.ns is not None:
            assert self.listener is not None
            self.forwarder = LoopbackForwarder(self.listener, self.ns.connector(launch.port))
            self.forwarder.start()
            self.listener = None

    def _make_namespace(self, fallback: bool) -> None:
        try:
            # RINGSERVE_NETNS_PREFIX: runs of several users on one host keep their names apart
            self.ns = NetNamespace.create(os.environ.get("RINGSERVE_NETNS_PREFIX", NETNS_PREFIX))
        except IsolationError as exc:
            if not fallback:
                raise
            log(f"warning: {exc}; falling back to --isolate none")
            if self.listener is not None:
                self.listener.close()
                self.listener = None

    def close(self, hurry: threading.Event) -> None:
        """Free the port, stop Serve and every Ray process it left, delete the namespace."""
        if self.listener is not None:
            self.listener.close()
        if self.forwarder is not None:
            self.forwarder.close()
        if self.prom_listener is not None:
            self.prom_listener.close()
        if self.monitoring is not None:
            self.monitoring.stop()
        proc = self.proc
        if proc is not None:
            stop_process_group(proc, hurry)
            if self.ns is None:
                kill_all(lambda: session_pids(proc.pid))
        if self.ns is not None:
            self.ns.delete()
        if self.log is not None:
            self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


    def start_monitoring(self, host: str, args: argparse.Namespace) -> None:
        """``--monitoring``: Prometheus on this run's Ray session, once Serve answers."""
        assert self.prom_listener is not None
        listener, self.prom_listener = self.prom_listener, None
        where = _url(host if self.ns else "127.0.0.1", args.prometheus_port)
        try:
            self.monitoring = MonitoringRun.start(self.tmp, self.ns, listener,
                                                  args.prometheus_port, where,
                                                  args.scrape_interval)
        except MonitoringError as exc:
            raise ServeCliError(f"--monitoring: {exc}") from None
        log(f"Prometheus at {where} (dashboards: `ringserve dashboards push` to a Grafana, "
             "or `ringserve dashboards render`)")


def supervise(run: ServeRun, launch: Launch, args: argparse.Namespace,
               stop: threading.Event) -> int:
    """Wait for /health, print the URL, then watch ``serve run`` until a signal."""
    proc = run.proc
    assert proc is not None
    base = _url(launch.host, launch.port)
    model = _wait_healthy(proc, base, args.start_timeout, stop)
    if model is None:
        if stop.is_set():
            return 0
        _report_failure("serve run exited during start-up" if proc.poll() is not None
                        else f"no healthy replica within {args.start_timeout:.0f}s",
                        run.log_path)
        return EXIT_FAILED
    print(f"ringserve: serving {model} at {base}/v1 (Ctrl-C to stop)", flush=True)
    if run.prom_listener is not None:
        run.start_monitoring(launch.host, args)
    while not stop.wait(0.5):
        if proc.poll() is not None:
            _report_failure(f"serve run exited (status {proc.returncode})", run.log_path)
            return EXIT_FAILED
    return 0


def _default_log(port: int) -> Path:
    from model.gguf_file import cache_root

    return cache_root() / "logs" / f"serve-{port}.log"


def _wait_healthy(proc: subprocess.Popen[bytes], base: str, timeout_s: float,
                  stop: threading.Event) -> str | None:
    """Poll /health until it answers 200; the served model's name, or None on failure/stop."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set() and proc.poll() is None:
        try:
            status, _ = _get_json(f"{base}/health")
            if status == 200:
                _, models = _get_json(f"{base}/v1/models")
                data = (models or {}).get("data") or [{}]
                return str(data[0].get("id") or "the model")
        except (OSError, ValueError, http.client.HTTPException):
            pass  # not listening yet, closed by the forwarder (nothing inside yet), half-up
        stop.wait(0.5)
    return None
