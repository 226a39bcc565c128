"""cluster/'s scripts without a cluster: every shell script passes ``bash -n`` and
``shellcheck``; the helpers SkyPilot's variables feed (replica count, node IPs, model folder)
and the Serve config the cluster deploys (replicas, address, API keys, bad knobs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "cluster").glob("*.sh"))


def test_there_are_scripts() -> None:
    names = {path.name for path in SCRIPTS}
    assert {"start_head.sh", "start_worker.sh", "deploy.sh", "wait_ready.sh", "setup_node.sh",
            "run_node.sh", "common.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script: Path) -> None:
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script: Path) -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (make setup installs it as root)")
    done = subprocess.run(["shellcheck", "-x", str(script)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout


def _common(expression: str, **env: str) -> str:
    """Evaluate ``expression`` in bash after sourcing cluster/common.sh."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SKYPILOT_")}
    done = subprocess.run(["bash", "-c", f'source cluster/common.sh; {expression}'],
                          cwd=ROOT, env={**base, **env}, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_replicas_are_all_gpus_or_one_per_cpu_node() -> None:
    assert _common("num_replicas", SKYPILOT_NUM_NODES="3", SKYPILOT_NUM_GPUS_PER_NODE="8") == "24"
    assert _common("num_replicas", SKYPILOT_NUM_NODES="2", SKYPILOT_NUM_GPUS_PER_NODE="0") == "2"
    assert _common("num_replicas") == "1"  # by hand on one machine without SkyPilot's vars


def test_node_ips_come_from_skypilot_node_ips() -> None:
    ips = "10.0.0.5\n10.0.0.6\n10.0.0.7\n"
    assert _common("head_ip; this_ip", SKYPILOT_NODE_IPS=ips, SKYPILOT_NODE_RANK="2") == \
        "10.0.0.5\n10.0.0.7"
    done = subprocess.run(["bash", "-c", "source cluster/common.sh; this_ip"], cwd=ROOT,
                          env={"PATH": os.environ["PATH"], "SKYPILOT_NODE_RANK": "1",
                               "SKYPILOT_NODE_IPS": "10.0.0.5"}, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 1
    assert "SKYPILOT_NODE_IPS has no line 2 (rank 1)" in done.stderr


def test_model_dir(tmp_path: Path) -> None:
    assert _common("model_dir", MODEL_ID="") == ""
    assert _common("model_dir", MODEL_ID=str(tmp_path)) == str(tmp_path)  # a local path
    assert _common("model_dir", MODEL_ID="mistralai/Mistral-7B-v0.1",
                   RINGSERVE_MODELS="/models") == "/models/mistralai--Mistral-7B-v0.1"


def _render(tmp_path: Path, *args: str, keys: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RINGSERVE_API_KEYS"}
    if keys:
        env["RINGSERVE_API_KEYS"] = keys
    return subprocess.run([sys.executable, "-m", "cluster.render_config", "--out",
                           str(tmp_path / "serve.yaml"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_rendered_config_has_the_clusters_replicas_address_and_keys(tmp_path: Path) -> None:
    done = _render(tmp_path, "--replicas", "4", "--gpus-per-replica", "1", "--host", "0.0.0.0",
                   "--set", "model=/models/m", "--set", "max_model_len=8192",
                   "--set", "served_model_name=", keys="sk-1,sk-2")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "serve.yaml").stat().st_mode & 0o077 == 0  # keys inside: owner only
    config = yaml.safe_load((tmp_path / "serve.yaml").read_text())
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert config["proxy_location"] == "HeadOnly"
    args = config["applications"][0]["args"]
    assert args["num_replicas"] == 4 and args["replica_num_gpus"] == 1.0
    assert args["model"] == "/models/m" and args["max_model_len"] == 8192
    assert args["served_model_name"] is None  # empty: left as it was
    assert args["api_keys"] == ["sk-1", "sk-2"]


def test_bad_knob_is_one_line(tmp_path: Path) -> None:
    done = _render(tmp_path, "--replicas", "1", "--set", "max_num_seqs=0")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "render_config: error: bad app arg max_num_seqs: Input should be greater than or "
        "equal to 1"]
    assert not (tmp_path / "serve.yaml").exists()


def test_deploy_refuses_a_public_endpoint_without_keys(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SKYPILOT_", "RINGSERVE_"))}
    env.update(HOME=str(tmp_path), RINGSERVE_VENV=sys.prefix)
    done = subprocess.run(["bash", "cluster/deploy.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "ringserve-cluster: error: no API key: the API listens on 0.0.0.0:8000; set "
        "RINGSERVE_API_KEYS (sky launch ... --secret RINGSERVE_API_KEYS=sk-...) or "
        "RINGSERVE_ALLOW_NO_AUTH=1"]
