"""``ringserve serve``: run the Serve application locally, with Ray's ports kept off the network.

Ray binds its own ports (GCS, dashboard, metrics, object manager, workers) on every interface,
whatever flags it is given. ``--isolate netns`` (the default where it can be done: root on
Linux with iproute2) therefore starts ``serve run`` inside a private network namespace whose
only interface is loopback, and a :class:`LoopbackForwarder` in this (the host) namespace
listens on ``--host:--port`` and pipes each TCP connection to the HTTP proxy inside. The
forwarder's upstream sockets are created by threads that entered the namespace with
``setns(2)``: setns moves only the calling thread, and a socket stays in the namespace it was
created in, so the listener lives on the host while the connections it opens live inside.

``--isolate none`` runs plain ``serve run`` (Ray's ports then listen on all interfaces; a
warning says so). Either way ``ringserve serve`` waits until ``/health`` answers, prints the
URL, and on Ctrl-C / SIGTERM stops the Serve process (SIGINT, then SIGTERM, then SIGKILL),
kills whatever of its Ray daemons is left and deletes the namespace, also when start-up fails.
"""

from __future__ import annotations

import argparse
import ctypes
import http.client
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

EXIT_USER_ERROR = 2
EXIT_FAILED = 1
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
SAFE_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}
# Stopping `serve run`: seconds to wait after SIGINT (Serve drains and shuts Ray down), then
# after SIGTERM, before SIGKILL. A second Ctrl-C skips straight to the shorter waits.
STOP_WAITS_S = (30.0, 10.0)
CONNECT_TIMEOUT_S = 10.0
BUFFER_BYTES = 64 * 1024
TMP_PREFIX = "rsv"  # /tmp/rsv<pid>-XXXXXXXX is a run's RAY_TMPDIR
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
# A ringserve error raised in a replica, as Ray logs it: "model.weights.WeightsError: msg".
USER_ERROR_LINE = re.compile(
    r"(?:^|\s)(?:model|app)\.[\w.]*?(\w+(?:Error|Missing)): (.+)$", re.MULTILINE)


class ServeCliError(Exception):
    """A problem the user can fix (port taken, bad flag, bad config): reported in one line."""


# Loopback forwarder ---------------------------------------------------------------------------
class _Pipe:
    """One forwarded connection: two sockets, two pump directions, closed when both are done."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self._lock = threading.Lock()
        self._running = 2
        self._reset = False

    def abort(self) -> None:
        """Stop both directions now: both peers see the connection end at once (the server a
        client disconnect, so generation is cancelled); the final close sends a reset."""
        with self._lock:
            self._reset = True
        for sock in (self.client, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a pump blocked in recv on it
            except OSError:
                pass

    def pump_done(self) -> bool:
        """One direction finished; the second to finish closes both sockets. True when closed."""
        with self._lock:
            self._running -= 1
            if self._running:
                return False
            reset = self._reset
        for sock in (self.client, self.upstream):
            if reset:  # RST instead of FIN: the other side must not take it for a clean end
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            sock.close()
        return True


class LoopbackForwarder:
    """Accept TCP connections on ``listener``; pipe each one to a socket made by ``connect``.

    Bytes are relayed as they arrive (at most :data:`BUFFER_BYTES` in flight per direction; a
    slow reader slows its writer), so SSE streams flow token by token. A half-close (EOF one
    way) is passed on with ``shutdown(SHUT_WR)`` while the other way keeps flowing; an error on
    either side resets both. If ``connect`` fails the client's connection is simply closed.
    """

    def __init__(self, listener: socket.socket, connect: Callable[[], socket.socket]) -> None:
        self._listener = listener
        self._connect = connect
        self._stopping = threading.Event()
        self._pipes: set[_Pipe] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name="ringserve-forwarder",
                                        daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return host, port

    def start(self) -> None:
        self._listener.settimeout(0.2)  # accept() wakes up to notice close()
        self._thread.start()

    def close(self) -> None:
        """Stop listening (the port is free once this returns) and reset open connections."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._listener.close()
        with self._lock:
            pipes = list(self._pipes)
        for pipe in pipes:
            pipe.abort()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)  # e.g. EMFILE: let connections finish rather than spin
                continue
            client.settimeout(None)
            threading.Thread(target=self._serve_connection, args=(client,),
                             name="ringserve-forward-conn", daemon=True).start()

    def _serve_connection(self, client: socket.socket) -> None:
        try:
            upstream = self._connect()
        except Exception:  # server not up yet, or going away: the client sees a closed socket
            client.close()
            return
        for sock in (client, upstream):
            _no_delay(sock)
        pipe = _Pipe(client, upstream)
        with self._lock:
            if self._stopping.is_set():
                pipe.abort()
            self._pipes.add(pipe)
        threading.Thread(target=self._pump, args=(pipe, upstream, client),
                         name="ringserve-forward-down", daemon=True).start()
        self._pump(pipe, client, upstream)

    def _pump(self, pipe: _Pipe, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(BUFFER_BYTES)
                if not data:
                    break
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)  # pass the half-close on; the other way keeps going
        except OSError:
            pipe.abort()
        if pipe.pump_done():
            with self._lock:
                self._pipes.discard(pipe)


def _no_delay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; ServeCliError (one line) when it is taken."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ServeCliError(f"cannot resolve --host {host}: {exc}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ServeCliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


# Network namespace ----------------------------------------------------------------------------
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _enter_netns(path: str) -> None:
    """Move the calling thread (only it) into the network namespace at ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc().setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({path}): {os.strerror(errno)}")
    finally:
        os.close(fd)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15,
                          check=check)


def netns_supported() -> bool:
    """Root on Linux with iproute2: the conditions under which ``ip netns`` can work."""
    return sys.platform.startswith("linux") and os.geteuid() == 0 and bool(shutil.which("ip"))


class NetNamespace:
    """A private network namespace with loopback up; ``delete()`` kills what runs in it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = f"/var/run/netns/{name}"
        self._connector: ThreadPoolExecutor | None = None

    @classmethod
    def create(cls, prefix: str = "ringserve") -> NetNamespace:
        existing = set(_ip("netns", "list", check=False).stdout.split())
        existing -= cls.sweep(existing, prefix)
        name = f"{prefix}-{os.getpid()}"
        while name in existing:  # a namespace left behind by a killed run with our pid
            name = f"{prefix}-{os.getpid()}-{os.urandom(2).hex()}"
        try:
            _ip("netns", "add", name)
        except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            raise ServeCliError(f"cannot create network namespace: {detail.strip()}") from None
        ns = cls(name)
        try:
            _ip("-n", name, "link", "set", "lo", "up")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            ns.delete()
            raise ServeCliError(f"cannot bring up lo in {name}: {exc}") from None
        return ns

    @classmethod
    def sweep(cls, names: set[str], prefix: str) -> set[str]:
        """Delete namespaces a killed run left behind (its pid gone, nothing inside)."""
        pattern = re.compile(rf"{re.escape(prefix)}-(\d+)(?:-[0-9a-f]{{4}})?")
        swept = set()
        for name in names:
            match = pattern.fullmatch(name)
            if match and not Path(f"/proc/{match.group(1)}").exists() and not cls(name).pids():
                _ip("netns", "del", name, check=False)
                swept.add(name)
        return swept

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def connector(self, port: int) -> Callable[[], socket.socket]:
        """A ``connect()`` for the forwarder: a TCP connection to 127.0.0.1:port inside."""
        if self._connector is None:
            self._connector = ThreadPoolExecutor(
                max_workers=4, thread_name_prefix=f"{self.name}-connect",
                initializer=_enter_netns, initargs=(self.path,))
        pool = self._connector

        def connect() -> socket.socket:
            future = pool.submit(socket.create_connection, ("127.0.0.1", port),
                                 CONNECT_TIMEOUT_S)
            sock = future.result(timeout=CONNECT_TIMEOUT_S + 1)
            sock.settimeout(None)
            return sock

        return connect

    def pids(self) -> list[int]:
        out = _ip("netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]

    def delete(self) -> None:
        """Stop the connector threads, kill every process inside, delete the namespace."""
        if self._connector is not None:
            self._connector.shutdown(wait=True, cancel_futures=True)
            self._connector = None
        kill_all(self.pids)
        _ip("netns", "del", self.name, check=False)


def sweep_temp_dirs() -> None:
    """Remove RAY_TMPDIRs that killed runs left behind (their pid is gone)."""
    for path in Path("/tmp").glob(f"{TMP_PREFIX}*-*"):
        pid = path.name[len(TMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)


def session_pids(sid: int) -> list[int]:
    """Processes of session ``sid`` (``serve run`` and the Ray daemons it started keep it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # state ppid pgrp session ...
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


def kill_all(list_pids: Callable[[], list[int]], grace_s: float = 3.0,
             limit_s: float = 15.0) -> list[int]:
    """SIGTERM what ``list_pids`` names, SIGKILL it after ``grace_s``; returns survivors."""
    started = time.monotonic()
    sig = signal.SIGTERM
    while True:
        pids = list_pids()
        if not pids or time.monotonic() - started > limit_s:
            return pids
        if time.monotonic() - started > grace_s:
            sig = signal.SIGKILL
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.2)


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


def _child_setup(parent: int) -> Callable[[], None]:
    """preexec_fn: the serve process gets SIGTERM should this process die without cleaning up."""
    libc = _libc()

    def setup() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return setup


def stop_process(proc: subprocess.Popen[bytes], hurry: threading.Event) -> None:
    """SIGINT the serve process group, then SIGTERM, then SIGKILL, each after a bounded wait."""
    for sig, wait_s in ((signal.SIGINT, STOP_WAITS_S[0]), (signal.SIGTERM, STOP_WAITS_S[1]),
                        (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + (min(wait_s, 3.0) if hurry.is_set() else wait_s)
        while proc.poll() is None and time.monotonic() < deadline:
            if hurry.is_set():
                deadline = min(deadline, time.monotonic() + 3.0)
            time.sleep(0.1)


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
    except ServeCliError as exc:
        _log(f"error: {exc}")
        return EXIT_USER_ERROR


def _serve(args: argparse.Namespace) -> int:
    """Start, wait for /health, serve until a signal, clean up."""
    launch = plan_launch(args)
    host, port = launch.host, launch.port
    isolate = args.isolate
    if isolate == "netns" and not netns_supported():
        raise ServeCliError("--isolate netns needs root on Linux with iproute2 (`ip`)")
    if isolate == "auto":
        isolate = "netns" if netns_supported() else "none"
    # Bind (or probe) the host port first: a taken port is a one-line error before Ray starts.
    listener: socket.socket | None = bind_listener(host, port)
    # --monitoring: Prometheus's port is checked now too; it is served once Ray is up
    prom_listener = bind_listener(host, args.prometheus_port) if args.monitoring else None
    if isolate == "none":
        assert listener is not None
        listener.close()
        listener = None

    with _stop_signals() as (stop, hurry):  # handlers first: a Ctrl-C from here on cleans up
        sweep_temp_dirs()
        # RAY_TMPDIR: private (ray.init must not find another local cluster) and short (Ray's
        # unix socket paths live under it and must stay within 107 bytes).
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir="/tmp"))
        ns: NetNamespace | None = None
        forwarder: LoopbackForwarder | None = None
        proc: subprocess.Popen[bytes] | None = None
        log: IO[bytes] | None = None
        monitoring: _Monitoring | None = None
        log_path: Path | None = None
        try:
            if isolate == "netns":
                try:
                    ns = NetNamespace.create()
                except ServeCliError as exc:
                    if args.isolate == "netns":
                        raise
                    _log(f"warning: {exc}; falling back to --isolate none")
                    isolate = "none"
                    assert listener is not None
                    listener.close()
                    listener = None
            if isolate == "none":
                _log("warning: --isolate none: Ray's internal ports (GCS, dashboard, metrics, "
                     "workers) listen on all interfaces")
            inner_host = "127.0.0.1" if ns is not None else host
            command = serve_command(launch, inner_host, port, tmp)
            if ns is not None:
                command = ns.exec_prefix() + command
            env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
            env.update(SAFE_ENV, RAY_TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
            if args.log_file != "-":
                log_path = Path(args.log_file or _default_log(port)).expanduser()
                log_path.parent.mkdir(parents=True, exist_ok=True)
                log = open(log_path, "wb")  # noqa: SIM115 - closed in finally
            where = f"network namespace {ns.name}" if ns else "the host network"
            _log(f"starting Ray Serve in {where}"
                 + (f" (log: {log_path})" if log_path else ""))
            # No threads yet: preexec_fn is only safe before the forwarder starts.
            proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT if log else None,
                                    start_new_session=True,
                                    preexec_fn=_child_setup(os.getpid()))
            if ns is not None:
                assert listener is not None
                forwarder = LoopbackForwarder(listener, ns.connector(port))
                forwarder.start()
                listener = None
            base = _url(host, port)
            model = _wait_healthy(proc, base, args.start_timeout, stop)
            if model is None:
                if stop.is_set():
                    return 0
                _report_failure("serve run exited during start-up" if proc.poll() is not None
                                else f"no healthy replica within {args.start_timeout:.0f}s",
                                log_path)
                return EXIT_FAILED
            print(f"ringserve: serving {model} at {base}/v1 (Ctrl-C to stop)", flush=True)
            if prom_listener is not None:
                monitoring = _Monitoring.start(tmp, ns, prom_listener, host, args)
                prom_listener = None
            while not stop.wait(0.5):
                if proc.poll() is not None:
                    _report_failure(f"serve run exited (status {proc.returncode})", log_path)
                    return EXIT_FAILED
            return 0
        finally:
            if stop.is_set():
                _log("stopping")
            if listener is not None:
                listener.close()
            if forwarder is not None:
                forwarder.close()
            if prom_listener is not None:
                prom_listener.close()
            if monitoring is not None:
                monitoring.stop()
            if proc is not None:
                stop_process(proc, hurry)
                if ns is None:
                    kill_all(lambda: session_pids(proc.pid))
            if ns is not None:
                ns.delete()
            if log is not None:
                log.close()
            shutil.rmtree(tmp, ignore_errors=True)
            if stop.is_set():
                _log("stopped")


class _Monitoring:
    """``--monitoring``: Prometheus (cluster/monitoring.py) on this run's Ray session, in
    Ray's namespace when there is one and forwarded to --host:--prometheus-port."""

    def __init__(self, prometheus: Any, forwarder: LoopbackForwarder | None) -> None:
        self.prometheus = prometheus
        self.forwarder = forwarder

    @classmethod
    def start(cls, tmp: Path, ns: NetNamespace | None, listener: socket.socket, host: str,
              args: argparse.Namespace) -> _Monitoring:
        from cluster.monitoring import MonitoringError, start_for_session

        port = args.prometheus_port
        forwarder = None
        if ns is None:
            listener.close()  # only probed: Prometheus binds 127.0.0.1 itself
        else:
            forwarder = LoopbackForwarder(listener, ns.connector(port))
            forwarder.start()
        try:
            prometheus = start_for_session(
                tmp, tmp / "prometheus", port, ns.exec_prefix() if ns else None,
                scrape_interval_s=args.scrape_interval)
            prometheus.wait_ready(_url(host if ns else "127.0.0.1", port))
        except MonitoringError as exc:
            if forwarder is not None:
                forwarder.close()
            raise ServeCliError(f"--monitoring: {exc}") from None
        _log(f"Prometheus at {_url(host if ns else '127.0.0.1', port)} (dashboards: "
             "`ringserve dashboards push` to a Grafana, or `ringserve dashboards render`)")
        return cls(prometheus, forwarder)

    def stop(self) -> None:
        if self.forwarder is not None:
            self.forwarder.close()
        self.prometheus.stop()


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
