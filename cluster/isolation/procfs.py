"""Reading ``/proc``: one parser for ``/proc/<pid>/stat`` and the helpers built on it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` (or ``/proc/<pid>/task/<tid>/stat``) we read.

    The command name (field 2) is in parentheses and may itself hold spaces and ``)``, so the
    fields are split after the *last* ``)``: state is field 3, ppid 4, pgrp 5, session 6,
    utime 14 and stime 15 (in clock ticks).
    """

    state: str
    ppid: int
    pgrp: int
    session: int
    utime: int
    stime: int

    @property
    def alive(self) -> bool:
        """Running or sleeping: not a zombie (Z) nor dead (X)."""
        return self.state not in ("Z", "X")

    @property
    def cpu_ticks(self) -> int:
        return self.utime + self.stime


def read_stat(pid: int, tid: int | None = None) -> ProcStat | None:
    """The stat of a process (all its threads) or of one thread; None when it is gone."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # fields[0] is the state (field 3)
    return ProcStat(state=fields[0], ppid=int(fields[1]), pgrp=int(fields[2]),
                    session=int(fields[3]), utime=int(fields[11]), stime=int(fields[12]))


def is_running(pid: int) -> bool:
    """Alive and not a zombie (a killed Ray daemon may wait a moment for its reaper)."""
    stat = read_stat(pid)
    return stat is not None and stat.alive


def all_pids() -> list[int]:
    """Every process id in ``/proc`` except this process's own."""
    me = os.getpid()
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and int(e.name) != me]


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (``serve run`` and the Ray daemons it started keep
    it: ``ringserve serve`` starts it with ``start_new_session``)."""
    return [pid for pid in all_pids()
            if (stat := read_stat(pid)) is not None and stat.session == sid and stat.alive]


def cmdline(pid: int) -> str:
    """The process's command line, arguments joined by spaces; empty when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode("utf-8", "replace")


def environ(pid: int) -> dict[str, str]:
    """The environment the process started with; empty when it is gone or not ours."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    pairs = (item.decode("utf-8", "replace").partition("=") for item in raw if item)
    return {key: value for key, _, value in pairs}
