"""The Prometheus launcher and scripts without Ray: config writing, session discovery, a real
Prometheus started and stopped on a free loopback port, cluster/start_monitoring.sh, and
``ringserve serve --monitoring`` refusing a taken port before Ray starts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from app.cli import main
from cluster.monitoring import (
    PROMETHEUS_CONFIG,
    LocalPrometheus,
    find_discovery_file,
    metrics_targets,
    write_config,
)
from tests.cli_process import free_port, interrupt, ringserve_serve, wait_until_ok

REPO = Path(__file__).resolve().parents[1]
needs_prometheus = pytest.mark.skipif(not shutil.which("prometheus"),
                                      reason="Debian's prometheus is not installed")


def _session(root: Path, name: str, targets: list[str], age_s: float = 0.0) -> Path:
    path = root / "ray" / name / "prom_metrics_service_discovery.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": targets}]))
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_committed_config_scrapes_rays_discovery_file() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = config["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == [
        "/tmp/ray/session_latest/prom_metrics_service_discovery.json"]


def test_discovery_picks_this_runs_newest_session(tmp_path: Path) -> None:
    _session(tmp_path, "session_2026-01-01_old", ["127.0.0.1:1"], age_s=100)
    newest = _session(tmp_path, "session_2026-01-02_new", ["127.0.0.1:2"])
    (tmp_path / "ray" / "session_latest").symlink_to(newest.parent)
    assert find_discovery_file(tmp_path) == newest
    assert metrics_targets(newest) == ["127.0.0.1:2"]
    assert find_discovery_file(tmp_path / "nothing-here") is None


def test_written_config_points_at_the_session(tmp_path: Path) -> None:
    discovery = _session(tmp_path, "session_x", ["127.0.0.1:5"])
    path = write_config(discovery, tmp_path / "out", scrape_interval_s=2)
    config = yaml.safe_load(path.read_text())
    assert config["global"]["scrape_interval"] == "2s"
    assert config["scrape_configs"][0]["file_sd_configs"][0]["files"] == [str(discovery)]
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "config", str(path)],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr


@needs_prometheus
def test_local_prometheus_scrapes_the_discovered_target_and_stops(tmp_path: Path) -> None:
    port = free_port()
    # Prometheus's own /metrics is the target: the discovery file wiring is what is tested
    discovery = _session(tmp_path, "session_x", [f"127.0.0.1:{port}"])
    config = write_config(discovery, tmp_path / "prom", scrape_interval_s=1)
    prometheus = LocalPrometheus.start(config, tmp_path / "prom", port)
    try:
        prometheus.wait_ready()
        deadline = time.monotonic() + 60
        while True:
            with urllib.request.urlopen(f"{prometheus.url}/api/v1/targets", timeout=5) as r:
                targets = json.loads(r.read())["data"]["activeTargets"]
            if targets and targets[0]["health"] == "up":
                break
            assert time.monotonic() < deadline, targets
            time.sleep(0.5)
        assert targets[0]["scrapeUrl"] == f"http://127.0.0.1:{port}/metrics"
    finally:
        prometheus.stop()
    assert prometheus.proc.poll() is not None


def test_start_monitoring_script_is_clean_shell() -> None:
    script = REPO / "cluster" / "start_monitoring.sh"
    assert subprocess.run(["bash", "-n", str(script)], timeout=10).returncode == 0
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed")
    check = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0, check.stdout


@needs_prometheus
def test_start_monitoring_script_starts_prometheus_once(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "RINGSERVE_MONITORING_DIR": str(tmp_path), "PROMETHEUS_PORT": str(port),
           "RAY_TEMP_DIR": str(tmp_path / "ray")}
    script = str(REPO / "cluster" / "start_monitoring.sh")
    first = subprocess.run(["bash", script], env=env, capture_output=True, text=True,
                           timeout=60)
    pid = int((tmp_path / "prometheus.pid").read_text())
    try:
        assert first.returncode == 0, first.stderr
        assert f"http://127.0.0.1:{port}" in first.stdout
        config = yaml.safe_load((tmp_path / "prometheus.yml").read_text())
        assert config["scrape_configs"][0]["file_sd_configs"][0]["files"] == [
            f"{tmp_path}/ray/session_latest/prom_metrics_service_discovery.json"]
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()
            time.sleep(0.3)
        second = subprocess.run(["bash", script], env=env, capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 0 and "already running" in second.stdout
    finally:
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)


def test_serve_monitoring_refuses_a_taken_port_before_ray_starts(
        capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code = main(["serve", "--isolate", "none", "--port", str(free_port()), "--monitoring",
                     "--prometheus-port", str(port)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and f"127.0.0.1:{port}" in err, err


@needs_prometheus
@pytest.mark.slow
def test_serve_monitoring_scrapes_its_own_session(tmp_path: Path) -> None:
    """``ringserve serve --monitoring`` end to end: Prometheus, in Ray's namespace, forwarded
    to the host port, scrapes this run's session; Ctrl-C stops it with the rest."""
    from cluster.isolation.netns import netns_supported

    if not netns_supported():
        pytest.skip("needs root on Linux with iproute2 for a private network namespace")
    import httpx

    port, prom_port = free_port(), free_port()
    prom = f"http://127.0.0.1:{prom_port}"
    log = tmp_path / "serve.log"
    with ringserve_serve(["--port", str(port), "--monitoring", "--prometheus-port",
                          str(prom_port), "--scrape-interval", "1", "--log-file", str(log),
                          "--start-timeout", "200", "max_model_len=256", "max_num_seqs=2"]
                         ) as proc:
        wait_until_ok(proc, f"{prom}/-/ready", 240, log, interval_s=1)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={
            "model": "SmolLM2-135M-Instruct", "prompt": "Hello", "max_tokens": 5})
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 90
        generated = 0.0
        while generated < 5 and time.monotonic() < deadline:  # Ray exports ~10 s late
            time.sleep(2)
            result = httpx.get(f"{prom}/api/v1/query", timeout=5, params={
                "query": "sum(ray_ringserve_generated_tokens_total)"}).json()["data"]["result"]
            generated = float(result[0]["value"][1]) if result else 0.0
        assert generated >= 5  # the warm-up's tokens and this request's
        targets = httpx.get(f"{prom}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        files = {t["discoveredLabels"]["__meta_filepath"] for t in targets}
        assert len(files) == 1 and files.pop().startswith("/tmp/rsv")  # its own session's
        out, err = interrupt(proc)
    assert proc.returncode == 0, err
    assert f"Prometheus at {prom}" in err
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", prom_port), timeout=2)
