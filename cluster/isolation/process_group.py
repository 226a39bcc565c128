"""Stopping what a run started: its process group in steps, then whatever is left."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable

PR_SET_PDEATHSIG = 1
# Stopping a child: seconds to wait after SIGINT (Serve drains and shuts Ray down), then after
# SIGTERM, before SIGKILL. Once ``hurry`` is set (a second Ctrl-C) each wait is at most 3 s.
STOP_WAITS_S = (30.0, 10.0)
HURRIED_WAIT_S = 3.0


def die_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGTERM should ``parent`` die without cleaning up
    (and at once, if it already has). Only safe to use before the parent starts threads."""
    libc = ctypes.CDLL(None, use_errno=True)

    def setup() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return setup


def stop_process_group(proc: subprocess.Popen[bytes], hurry: threading.Event,
                       waits_s: tuple[float, float] = STOP_WAITS_S) -> None:
    """SIGINT ``proc``'s process group, then SIGTERM, then SIGKILL, each after a bounded wait
    (``proc`` leads its group: started with ``start_new_session``)."""
    for sig, wait_s in ((signal.SIGINT, waits_s[0]), (signal.SIGTERM, waits_s[1]),
                        (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        hurried = min(wait_s, HURRIED_WAIT_S)
        deadline = time.monotonic() + (hurried if hurry.is_set() else wait_s)
        while proc.poll() is None and time.monotonic() < deadline:
            if hurry.is_set():
                deadline = min(deadline, time.monotonic() + HURRIED_WAIT_S)
            time.sleep(0.1)


def kill_all(list_pids: Callable[[], list[int]], grace_s: float = 3.0,
             limit_s: float = 15.0) -> list[int]:
    """SIGTERM what ``list_pids`` names, SIGKILL it after ``grace_s``; returns survivors.

    ``list_pids`` is asked again each round (a dying Ray daemon may start another process),
    so it must name only processes the caller started: a session, a namespace of its own.
    """
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
