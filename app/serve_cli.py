"""``ringserve serve``: run the Serve application locally, with Ray's ports kept off the network.

Ray binds its own ports (GCS, dashboard, metrics, object manager, workers) on every interface,
whatever flags it is given. ``--isolate netns`` (the default where it can be done: root on
Linux with iproute2) therefore starts ``serve run`` inside a private network namespace whose
only interface is loopback, and a loopback forwarder in this (the host) namespace listens on
``--host:--port`` and pipes each TCP connection to the HTTP proxy inside. The namespace, the
forwarder and the process clean-up live in :mod:`cluster.isolation`; this module is the CLI
and the launch plan (which app args or config, which address, which ``serve run`` command).

``--isolate none`` runs plain ``serve run`` (Ray's ports then listen on all interfaces; a
warning says so). Either way ``ringserve serve`` waits until ``/health`` answers, prints the
URL, and on Ctrl-C / SIGTERM stops the Serve process (SIGINT, then SIGTERM, then SIGKILL),
kills whatever of its Ray daemons is left and deletes the namespace, also when start-up fails.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

from cluster.isolation import IsolationError
from cluster.isolation.forwarder import LoopbackForwarder, bind_listener
from cluster.isolation.netns import NetNamespace, netns_supported
from cluster.isolation.process_group import die_with_parent, kill_all, stop_process_group
from cluster.isolation.procfs import session_pids
from cluster.isolation.ray_tmpdir import make_ray_tmpdir
from cluster.monitoring import MonitoringError, MonitoringRun

EXIT_USER_ERROR = 2
EXIT_FAILED = 1
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
NETNS_PREFIX = "ringserve"  # a run's namespace is ringserve-<its pid>
SAFE_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}
TMP_PREFIX = "rsv"  # /tmp/rsv<pid>-XXXXXXXX is a run's RAY_TMPDIR
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
# A ringserve error raised in a replica, as Ray logs it: "model.weights.WeightsError: msg".
USER_ERROR_LINE = re.compile(
    r"(?:^|\s)(?:model|app)\.[\w.]*?(\w+(?:Error|Missing)): (.+)$", re.MULTILINE)


class ServeCliError(Exception):
    """A problem the user can fix (port taken, bad flag, bad config): reported in one line."""


# The serve process ----------------------------------------------------------------------------
def _serve_executable() -> str:
    beside = Path(sys.executable).parent / "serve"
    found = str(beside) if beside.exists() else shutil.which("serve")
    if not found:
        raise ServeCliError("the Ray Serve CLI (`serve`) is not installed next to this Python")
    return found


def parse_app_args(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ServeCliError(f"app args are key=value, got {item!r}")
        out[key] = value
    return out


@dataclass(frozen=True)
class Launch:
    """What ``serve run`` runs: app args for ``app.main:build_app`` or a Serve config mapping,
    and the address the API is offered at (host/port are not part of the app args)."""

    app_args: dict[str, str]
    config: dict[str, Any] | None
    host: str
    port: int


def plan_launch(args: argparse.Namespace) -> Launch:
    """Read and check the app args or config file; address: flags, then args/config, then
    127.0.0.1:8000. Bad knobs are caught here, before Ray starts."""
    if args.config and args.app_args:
        raise ServeCliError("give either --config or app args, not both")
    host, port = DEFAULT_HOST, str(DEFAULT_PORT)
    config: dict[str, Any] | None = None
    app_args = parse_app_args(args.app_args)
    if args.config:
        import yaml

        try:
            config = yaml.safe_load(Path(args.config).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ServeCliError(f"cannot read --config {args.config}: {exc}") from None
        if not isinstance(config, dict):
            raise ServeCliError(f"--config {args.config} is not a Serve config mapping")
        http = config.get("http_options") or {}
        host, port = str(http.get("host") or host), str(http.get("port") or port)
        for application in config.get("applications") or []:
            if isinstance(application, dict) and \
                    application.get("import_path") == "app.main:build_app":
                check_app_args(dict(application.get("args") or {}))
    else:
        host = app_args.pop("host", "") or host
        port = app_args.pop("port", "") or port
        check_app_args(app_args)
    host = args.host or host
    try:
        number = args.port or int(port)
    except ValueError:
        raise ServeCliError(f"port {port!r} is not a number") from None
    if not 1 <= number <= 65535:
        raise ServeCliError(f"port {number} is not in 1..65535")
    return Launch(app_args, config, host, number)


def edge_env(launch: Launch) -> dict[str, str]:
    """Environment for Serve's proxy to enforce the apps' size limits and stall timeout
    (app/edge.py); with a config file, the largest of its applications' (each router checks
    its own)."""
    from app.config import AppConfig
    from app.edge import proxy_env

    arg_sets = ([dict(a.get("args") or {}) for a in launch.config.get("applications") or []]
                if launch.config is not None else [dict(launch.app_args)])
    configs = [AppConfig.model_validate(args) for args in arg_sets] or [AppConfig()]
    stalls = [c.stream_stall_timeout_s for c in configs]  # the most patient app's (None: never)
    return proxy_env(max(c.max_body_bytes for c in configs),
                     max(c.max_header_bytes for c in configs),
                     None if None in stalls else max(s for s in stalls if s is not None))


def check_app_args(values: dict[str, Any]) -> None:
    """Validate knobs with AppConfig (as build_app will); the first problem as ServeCliError."""
    from pydantic import ValidationError

    from app.config import AppConfig

    try:
        AppConfig.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "app args"
        raise ServeCliError(f"bad app arg {where}: {first['msg']}") from None


def thread_split(launch: Launch) -> str:
    """The torch threads each CPU replica will use on this machine (printed at start)."""
    from app.config import AppConfig, available_cpus

    values: dict[str, Any] = dict(launch.app_args)
    for application in (launch.config or {}).get("applications") or []:
        if isinstance(application, dict) and application.get("import_path") == \
                "app.main:build_app":
            values = dict(application.get("args") or {})
    config = AppConfig.model_validate(values)
    cpus = available_cpus()
    replicas = config.autoscaling.max_replicas if config.autoscaling else config.num_replicas
    threads = config.replica_threads(cpus)
    how = "replica_torch_threads" if config.replica_torch_threads else (
        f"{cpus} cores, router {config.router_num_cpus * config.router_replicas:g} CPU")
    return (f"{replicas} LLM replica(s) x {threads} torch thread(s) each on CPU ({how}; "
            "set replica_torch_threads=N to change)")


def serve_command(launch: Launch, host: str, port: int, tmp: Path) -> list[str]:
    """``serve run`` for the app args or the config file, its HTTP proxy at host:port."""
    if launch.config is not None:
        import yaml

        config = {**launch.config, "http_options": {
            **(launch.config.get("http_options") or {}), "host": host, "port": port}}
        path = tmp / "serve_config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return [_serve_executable(), "run", str(path)]
    app_args = {**launch.app_args, "host": host, "port": str(port)}
    return [_serve_executable(), "run", "app.main:build_app",
            *(f"{k}={v}" for k, v in app_args.items())]


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
        _log(f"error: {what}: {cause.group(1)}: {cause.group(2).strip()}{where}")
        return
    if text:
        print("\n".join(text.splitlines()[-30:]), file=sys.stderr)
    _log(f"error: {what}{where}")


@contextmanager
def _stop_signals() -> Iterator[tuple[threading.Event, threading.Event]]:
    """(stop, hurry): the first SIGINT/SIGTERM/SIGHUP sets stop, a second one hurry."""
    stop, hurry = threading.Event(), threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        (hurry if stop.is_set() else stop).set()
        if hurry.is_set():
            print("ringserve: stopping faster", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, handler)
                for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield stop, hurry
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _log(message: str) -> None:
    print(f"ringserve: {message}", file=sys.stderr, flush=True)


def serve(args: argparse.Namespace) -> int:
    """``ringserve serve``; a mistake the user can fix is one line on stderr and status 2."""
    try:
        return _serve(args)
    except (ServeCliError, IsolationError) as exc:
        _log(f"error: {exc}")
        return EXIT_USER_ERROR


def _isolation_mode(asked: str) -> str:
    """``netns`` or ``none`` for ``--isolate``: auto is netns where it can work."""
    if asked == "netns" and not netns_supported():
        raise ServeCliError("--isolate netns needs root on Linux with iproute2 (`ip`)")
    if asked == "auto":
        return "netns" if netns_supported() else "none"
    return asked


def _serve(args: argparse.Namespace) -> int:
    """Start, wait for /health, serve until a signal, clean up."""
    launch = plan_launch(args)
    isolate = _isolation_mode(args.isolate)
    # Bind (or probe) the host port first: a taken port is a one-line error before Ray starts.
    listener: socket.socket | None = bind_listener(launch.host, launch.port)
    # --monitoring: Prometheus's port is checked now too; it is served once Ray is up
    prom_listener = (bind_listener(launch.host, args.prometheus_port) if args.monitoring
                     else None)
    _log(thread_split(launch))
    if isolate == "none":
        assert listener is not None
        listener.close()
        listener = None
    with _stop_signals() as (stop, hurry):  # handlers first: a Ctrl-C from here on cleans up
        run = _Run(tmp=make_ray_tmpdir(TMP_PREFIX), listener=listener,
                   prom_listener=prom_listener)
        try:
            run.start(launch, args, isolate)
            return _supervise(run, launch, args, stop)
        finally:
            if stop.is_set():
                _log("stopping")
            run.close(hurry)
            if stop.is_set():
                _log("stopped")


@dataclass
class _Run:
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
            _log("warning: --isolate none: Ray's internal ports (GCS, dashboard, metrics, "
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
            self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        where = f"network namespace {self.ns.name}" if self.ns else "the host network"
        _log(f"starting Ray Serve in {where}"
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
            self.ns = NetNamespace.create(NETNS_PREFIX)
        except IsolationError as exc:
            if not fallback:
                raise
            _log(f"warning: {exc}; falling back to --isolate none")
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
        _log(f"Prometheus at {where} (dashboards: `ringserve dashboards push` to a Grafana, "
             "or `ringserve dashboards render`)")


def _supervise(run: _Run, launch: Launch, args: argparse.Namespace,
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


def add_serve_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``ringserve serve`` on the CLI's subparsers."""
    p = sub.add_parser(
        "serve", help="start the Ray Serve app locally (Ray's ports kept off the network)",
        description="Start the OpenAI-compatible server with `serve run`. App args are "
        "AppConfig knobs as key=value (docs/serving.md lists them); or pass --config.")
    p.add_argument("app_args", nargs="*", metavar="KEY=VALUE",
                   help="application args for app.main:build_app, e.g. max_model_len=2048")
    p.add_argument("--config", default=None,
                   help="a Serve config YAML (e.g. cluster/serve_config.yaml) instead of app "
                   "args; its http_options host/port are overridden by --host/--port")
    p.add_argument("--host", default=None,
                   help=f"address the API listens on (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=None,
                   help=f"port the API listens on (default {DEFAULT_PORT})")
    p.add_argument("--isolate", choices=("auto", "netns", "none"), default="auto",
                   help="netns: run Ray in a private network namespace and forward only the "
                   "API port; none: plain serve run (Ray listens on all interfaces); auto "
                   "(default): netns when root on Linux with iproute2, else none")
    p.add_argument("--start-timeout", type=float, default=600.0,
                   help="seconds to wait for /health before giving up (default 600)")
    p.add_argument("--monitoring", action="store_true",
                   help="also run Prometheus (Debian's prometheus binary) scraping this run's "
                   "Ray metrics, at --host:--prometheus-port (cluster/monitoring.py)")
    p.add_argument("--prometheus-port", type=int, default=9090,
                   help="port of --monitoring's Prometheus (default 9090)")
    p.add_argument("--scrape-interval", type=float, default=5.0,
                   help="--monitoring's scrape interval in seconds (default 5)")
    p.add_argument("--log-file", default=None,
                   help="where serve run's output goes (default "
                   "$RINGSERVE_CACHE_DIR/logs/serve-PORT.log; '-' for this terminal)")
