"""``ringserve serve``: run the Serve application locally, with Ray's ports kept off the network.

Ray binds its own ports (GCS, dashboard, metrics, object manager, workers) on every interface,
whatever flags it is given. ``--isolate netns`` (the default where it can be done: root on
Linux with iproute2) therefore starts ``serve run`` inside a private network namespace whose
only interface is loopback, and a loopback forwarder in this (the host) namespace listens on
``--host:--port`` and pipes each TCP connection to the HTTP proxy inside. The namespace, the
forwarder and the process clean-up live in :mod:`cluster.isolation`; the launch plan (which
app args or config, which address, which ``serve run`` command) in :mod:`app.launch_plan`, one
run's start, watch and clean-up in :mod:`app.serve_run`; this module is the CLI.

``--isolate none`` runs plain ``serve run`` (Ray's ports then listen on all interfaces; a
warning says so). Either way ``ringserve serve`` waits until ``/health`` answers, prints the
URL, and on Ctrl-C / SIGTERM stops the Serve process (SIGINT, then SIGTERM, then SIGKILL),
kills whatever of its Ray daemons is left and deletes the namespace, also when start-up fails.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from app.launch_plan import DEFAULT_HOST, DEFAULT_PORT, ServeCliError, plan_launch, thread_split
from app.serve_run import TMP_PREFIX, ServeRun, log, supervise
from cluster.isolation import IsolationError
from cluster.isolation.forwarder import bind_listener
from cluster.isolation.netns import netns_supported
from cluster.isolation.ray_tmpdir import make_ray_tmpdir

EXIT_USER_ERROR = 2


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


def serve(args: argparse.Namespace) -> int:
    """``ringserve serve``; a mistake the user can fix is one line on stderr and status 2."""
    try:
        return _serve(args)
    except (ServeCliError, IsolationError) as exc:
        log(f"error: {exc}")
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
    log(thread_split(launch))
    if isolate == "none":
        assert listener is not None
        listener.close()
        listener = None
    with _stop_signals() as (stop, hurry):  # handlers first: a Ctrl-C from here on cleans up
        run = ServeRun(tmp=make_ray_tmpdir(TMP_PREFIX), listener=listener,
                       prom_listener=prom_listener)
        try:
            run.start(launch, args, isolate)
            return supervise(run, launch, args, stop)
        finally:
            if stop.is_set():
                log("stopping")
            run.close(hurry)
            if stop.is_set():
                log("stopped")


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
