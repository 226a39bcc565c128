"""A local Prometheus next to a Ray session: config for that session, start, wait, stop.

Ray writes, per session, ``<ray temp dir>/session_*/prom_metrics_service_discovery.json``
naming every node's metrics agent; ``session_latest`` points at the newest session on the
whole host (other users' too), so a local run points Prometheus at its own session's file.
:func:`write_config` copies cluster/prometheus.yml with that file and a scrape interval;
:class:`LocalPrometheus` runs Debian's ``prometheus`` binary on 127.0.0.1 (optionally through
an exec prefix such as ``ip netns exec NAME``, so it shares Ray's private network namespace);
:class:`MonitoringRun` is what ``ringserve serve --monitoring`` starts and stops.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

from cluster.isolation.forwarder import LoopbackForwarder
from cluster.isolation.netns import NetNamespace

CLUSTER_DIR = Path(__file__).resolve().parent
PROMETHEUS_CONFIG = CLUSTER_DIR / "prometheus.yml"
DISCOVERY_FILE = "prom_metrics_service_discovery.json"
DEFAULT_PORT = 9090


class MonitoringError(Exception):
    """Prometheus cannot be started (not installed, no Ray session found, failed): one line."""


def prometheus_binary() -> str:
    """Path of the ``prometheus`` binary (Debian's package installs /usr/bin/prometheus)."""
    found = shutil.which("prometheus")
    if not found:
        raise MonitoringError("the `prometheus` binary is not installed (Debian: apt-get "
                              "install prometheus; `make setup` does it where it can)")
    return found


def find_discovery_file(ray_temp_root: Path) -> Path | None:
    """The newest session's service-discovery file under ``ray_temp_root``, which is a
    RAY_TMPDIR (sessions under ``ray/``) or Ray's temp dir itself (sessions directly under it)."""
    candidates = [p for pattern in (f"session_*/{DISCOVERY_FILE}",
                                    f"ray/session_*/{DISCOVERY_FILE}")
                  for p in ray_temp_root.glob(pattern) if "session_latest" not in p.parts]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def wait_for_discovery_file(ray_temp_root: Path, timeout_s: float = 60.0) -> Path:
    deadline = time.monotonic() + timeout_s
    while True:
        found = find_discovery_file(ray_temp_root)
        if found is not None and _targets(found):
            return found
        if time.monotonic() > deadline:
            raise MonitoringError(f"no Ray session wrote {DISCOVERY_FILE} under "
                                  f"{ray_temp_root} within {timeout_s:.0f}s")
        time.sleep(0.5)


def _targets(discovery_file: Path) -> list[str]:
    """The scrape targets a discovery file names (empty while Ray is still writing it)."""
    try:
        groups = json.loads(discovery_file.read_text() or "[]")
    except (OSError, ValueError):
        return []
    return [t for group in groups for t in group.get("targets", [])]


def metrics_targets(discovery_file: Path) -> list[str]:
    """``host:port`` of every Ray metrics agent the file names."""
    return _targets(discovery_file)


def write_config(discovery_file: Path, out_dir: Path, scrape_interval_s: float = 10.0) -> Path:
    """cluster/prometheus.yml for one session's discovery file and scrape interval."""
    import yaml

    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    interval = f"{scrape_interval_s:g}s"
    config["global"]["scrape_interval"] = interval
    config["global"]["evaluation_interval"] = interval
    for job in config["scrape_configs"]:
        for sd in job.get("file_sd_configs", []):
            sd["files"] = [str(discovery_file)]
            sd["refresh_interval"] = interval
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class LocalPrometheus:
    """One Prometheus process on 127.0.0.1:``port``, its data in ``data_dir``."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path,
                 log: IO[bytes]) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self._log = log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, config: Path, data_dir: Path, port: int = DEFAULT_PORT,
              exec_prefix: list[str] | None = None, retention: str = "1d") -> LocalPrometheus:
        """Start Prometheus with ``config`` (its own session: stopped by :meth:`stop`)."""
        data_dir.mkdir(parents=True, exist_ok=True)
        log_path = data_dir / "prometheus.log"
        log = open(log_path, "wb")  # closed by stop()
        command = [*(exec_prefix or []), prometheus_binary(), f"--config.file={config}",
                   f"--storage.tsdb.path={data_dir / 'tsdb'}",
                   f"--storage.tsdb.retention.time={retention}",
                   f"--web.listen-address=127.0.0.1:{port}"]
        try:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            log.close()
            raise MonitoringError(f"cannot start prometheus: {exc}") from None
        return cls(proc, port, log_path, log)

    def wait_ready(self, url: str | None = None, timeout_s: float = 30.0) -> None:
        """Wait until ``/-/ready`` answers 200 (``url``: where this process reaches it)."""
        base = url or self.url
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise MonitoringError(f"prometheus exited ({self.proc.returncode}); log: "
                                      f"{self.log_path}: {self.log_tail()}")
            try:
                with opener.open(f"{base}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise MonitoringError(f"prometheus not ready within {timeout_s:.0f}s; log: "
                                      f"{self.log_path}")
            time.sleep(0.3)

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM Prometheus's process group, SIGKILL it after ``timeout_s``."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                continue
        self._log.close()


def start_for_session(ray_temp_root: Path, data_dir: Path, port: int = DEFAULT_PORT,
                      exec_prefix: list[str] | None = None, scrape_interval_s: float = 5.0
                      ) -> LocalPrometheus:
    """Find the Ray session under ``ray_temp_root``, write its config, start Prometheus."""
    discovery = wait_for_discovery_file(ray_temp_root)
    config = write_config(discovery, data_dir, scrape_interval_s)
    return LocalPrometheus.start(config, data_dir, port, exec_prefix)


class MonitoringRun:
    """``ringserve serve --monitoring``: Prometheus on one run's Ray session, in Ray's network
    namespace when there is one (forwarded from the host listener), else on 127.0.0.1."""

    def __init__(self, prometheus: LocalPrometheus, forwarder: LoopbackForwarder | None) -> None:
        self.prometheus = prometheus
        self.forwarder = forwarder

    @classmethod
    def start(cls, ray_temp_root: Path, ns: NetNamespace | None, listener: socket.socket,
              port: int, ready_url: str, scrape_interval_s: float) -> MonitoringRun:
        """Start it and wait until ``ready_url`` (where this process reaches it) answers;
        raises MonitoringError, having released what it took, when it cannot."""
        forwarder = None
        if ns is None:
            listener.close()  # only probed: Prometheus binds 127.0.0.1 itself
        else:
            forwarder = LoopbackForwarder(listener, ns.connector(port))
            forwarder.start()
        try:
            prometheus = start_for_session(ray_temp_root, ray_temp_root / "prometheus", port,
                                           ns.exec_prefix() if ns else None,
                                           scrape_interval_s=scrape_interval_s)
            prometheus.wait_ready(ready_url)
        except MonitoringError:
            if forwarder is not None:
                forwarder.close()
            raise
        return cls(prometheus, forwarder)

    def stop(self) -> None:
        if self.forwarder is not None:
            self.forwarder.close()
        self.prometheus.stop()

