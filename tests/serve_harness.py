"""Real Ray Serve in a private network namespace, for integration tests that own an instance.

``serve_in_netns(prefix, args, port, replicas)`` makes a network namespace with
:mod:`cluster.isolation` (root only; the caller skips otherwise), moves this thread into it,
starts ``serve run app.main:build_app ARGS`` there and yields once ``/health`` reports
``replicas`` healthy LLM replicas. Teardown stops Serve, kills whatever is left in the
namespace (all ours) and deletes it. Ray binds ports on all interfaces; inside the namespace
only loopback exists.

The helpers find Serve's processes inside that namespace only: by process title
(:func:`serve_process`) or, for one replica, by its Serve replica id (:func:`replica_pid`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from cluster.isolation.netns import NetNamespace, netns_supported
from cluster.isolation.process_group import stop_process_group
from cluster.isolation.ray_tmpdir import make_ray_tmpdir

BIN = Path(sys.executable).parent


def can_make_netns() -> bool:
    return netns_supported()


class ServeInstance:
    """A running Serve app: its base URL, namespace and log."""

    def __init__(self, netns: NetNamespace, base: str, log: Path) -> None:
        self.netns = netns
        self.base = base
        self.log = log

    def processes(self, role: str) -> list[int]:
        """Pids of this namespace's processes whose command line names ``role``."""
        found = []
        for pid in self.netns.pids():
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if role in title:
                found.append(pid)
        return found

    def serve_process(self, role: str) -> int:
        found = self.processes(role)
        assert len(found) == 1, (role, found)
        return found[0]

    def replica_pid(self, replica_id: str, role: str = "ServeReplica:default:LLMServer"
                    ) -> int:
        """Pid of the Serve replica whose unique id is ``replica_id``: the one process of
        ``role`` that holds its own log file (``replica_<app>_<deployment>_<id>.log``) open."""
        for pid in self.processes(role):
            fd_dir = Path(f"/proc/{pid}/fd")
            try:
                targets = [os.readlink(fd_dir / fd) for fd in os.listdir(fd_dir)]
            except OSError:
                continue
            if any(t.endswith(f"_{replica_id}.log") for t in targets):
                return pid
        raise AssertionError(f"no {role} process holds the log of replica {replica_id}")


@contextmanager
def serve_in_netns(prefix: str, args: Sequence[str], port: int, replicas: int,
                   start_timeout_s: float = 300, sysctls: Sequence[str] = ()
                   ) -> Iterator[ServeInstance]:
    """``sysctls``: ``key=value`` settings of the namespace's own network stack."""
    # RINGSERVE_TEST_NETNS_PREFIX keeps namespaces of concurrent runs on one box apart
    namespace = NetNamespace.create(os.environ.get("RINGSERVE_TEST_NETNS_PREFIX", "") + prefix)
    proc: subprocess.Popen[bytes] | None = None
    tmp = make_ray_tmpdir(prefix)
    log_path = tmp / "serve.log"
    log = open(log_path, "wb")  # closed in teardown
    base = f"http://127.0.0.1:{port}"
    try:
        for setting in sysctls:
            subprocess.run([*namespace.exec_prefix(), "sysctl", "-q", "-w", setting],
                           check=True, timeout=10)
        with namespace.entered():  # this thread (the test's HTTP clients) and serve run
            env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
            env.update(RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=str(tmp))
            proc = subprocess.Popen(
                [str(BIN / "serve"), "run", "app.main:build_app", *args, f"port={port}",
                 "host=127.0.0.1"], cwd=Path(__file__).resolve().parents[1], env=env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + start_timeout_s
            while True:
                assert proc.poll() is None, log_path.read_text()[-4000:]
                assert time.monotonic() < deadline, "Serve did not become healthy"
                try:
                    r = httpx.get(f"{base}/health", timeout=5)
                    if r.status_code == 200 and r.json()["healthy_replicas"] == replicas:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(2)
            yield ServeInstance(namespace, base, log_path)
    finally:
        if proc is not None:
            stop_process_group(proc, threading.Event(), waits_s=(60.0, 10.0))
        namespace.delete()  # outside it: Ray daemons left in the namespace are ours
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
