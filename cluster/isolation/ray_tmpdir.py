"""Private ``RAY_TMPDIR`` folders: ``/tmp/<prefix><pid>-XXXXXXXX``.

Private, so ``ray.init`` inside a run never finds another local cluster (``/tmp/ray`` is
shared by everyone on the host); short, because Ray's unix socket paths live under it and
must stay within 107 bytes. A folder whose pid is gone is left over from a killed run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path("/tmp")


def make_ray_tmpdir(prefix: str) -> Path:
    """A new private folder named after this process; sweeps stale ones first."""
    sweep_ray_tmpdirs(prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=ROOT))


def find_ray_tmpdir(prefix: str, pid: int) -> Path | None:
    """The folder process ``pid`` made with :func:`make_ray_tmpdir`, if it is there."""
    return next(iter(ROOT.glob(f"{prefix}{pid}-*")), None)


def sweep_ray_tmpdirs(prefix: str) -> None:
    """Remove folders that killed runs left behind (their pid is gone)."""
    for path in ROOT.glob(f"{prefix}*-*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)
