"""The SkyPilot YAMLs in sky/ parse offline (``sky.Task.from_yaml``: no credentials, no
catalog) and say what docs/cloud.md says they do: every cloud a choice, GPUs that hold a 7B
model in bf16, the API port, the secrets, one GPU node per replica, the service's probe and
replica policy, and setup/run calling cluster/'s scripts.

SkyPilot lives in its own venv (``make setup``: .venv/sky); tests/sky_task_summary.py runs
there and reports what SkyPilot read, as JSON.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
YAMLS = ["serve.yaml", "cluster.yaml", "service.yaml"]
# Where each default accelerator is offered (docs/cloud.md has the instance types).
OFFERED = {"AWS": {"L4", "A10G", "H100"}, "GCP": {"L4", "A100", "H100"},
           "Azure": {"A10", "A100-80GB", "H100"}}
BF16_7B_GPUS = {"L4", "A10G", "A10", "A100", "A100-80GB", "H100"}  # 24 GB or more each


def _sky_python() -> str | None:
    """An interpreter with skypilot: $RINGSERVE_SKY_PYTHON, .venv/sky, or this one."""
    for candidate in (os.environ.get("RINGSERVE_SKY_PYTHON"),
                      str(ROOT / ".venv" / "sky" / "bin" / "python")):
        if candidate and Path(candidate).is_file():
            return candidate
    return sys.executable if importlib.util.find_spec("sky") else None


@pytest.fixture(scope="module")
def tasks() -> Iterator[dict[str, Any]]:
    python = _sky_python()
    if python is None:
        pytest.skip("skypilot is not installed (make setup puts it in .venv/sky)")
    env = {**os.environ, "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}
    done = subprocess.run([python, str(ROOT / "tests" / "sky_task_summary.py"),
                           *(f"sky/{name}" for name in YAMLS)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    read = json.loads(done.stdout.strip().splitlines()[-1])
    yield {name: read[f"sky/{name}"] for name in YAMLS}


@pytest.mark.parametrize("name", YAMLS)
def test_every_cloud_is_a_choice_with_gpus_for_a_7b_model(tasks: dict[str, Any],
                                                          name: str) -> None:
    offered: dict[str, set[str]] = {}
    for resources in tasks[name]["resources"]:
        assert resources["cloud"] is not None, "every choice names its cloud"
        assert len(resources["accelerators"]) == 1, resources
        (gpu, count), = resources["accelerators"].items()
        assert gpu in BF16_7B_GPUS and count == 1, resources
        assert resources["ports"] == ["8000"]
        assert resources["disk_size"] >= 64
        offered.setdefault(resources["cloud"], set()).add(gpu)
    assert offered == OFFERED


@pytest.mark.parametrize("name", YAMLS)
def test_model_and_secrets(tasks: dict[str, Any], name: str) -> None:
    task = tasks[name]
    assert task["envs"]["MODEL_ID"] == "mistralai/Mistral-7B-Instruct-v0.3"
    assert task["secret_refs"] == ["HF_TOKEN", "RINGSERVE_API_KEYS"]
    assert task["envs"]["RINGSERVE_ALLOW_NO_AUTH"] == "0"  # keys are required by default
    for secret in ("HF_TOKEN", "RINGSERVE_API_KEYS"):
        assert secret not in task["envs"]  # secrets are never plain envs (never logged)
    assert task["secrets_given"] == {"HF_TOKEN": "hf_test", "RINGSERVE_API_KEYS": "sk-test"}


@pytest.mark.parametrize("name", YAMLS)
def test_setup_and_run_call_the_cluster_scripts(tasks: dict[str, Any], name: str) -> None:
    task = tasks[name]
    assert task["workdir"] == "."
    assert task["setup"].strip() == "bash cluster/setup_node.sh"
    assert task["run"].strip() == "bash cluster/run_node.sh"
    for script in ("setup_node.sh", "run_node.sh"):
        assert (ROOT / "cluster" / script).is_file()


def test_node_counts(tasks: dict[str, Any]) -> None:
    assert [tasks[name]["num_nodes"] for name in YAMLS] == [1, 2, 1]
    assert tasks["serve.yaml"]["service"] is None and tasks["cluster.yaml"]["service"] is None


def test_service_probe_and_replica_policy(tasks: dict[str, Any]) -> None:
    service = tasks["service.yaml"]["service"]
    assert service["readiness_path"] == "/health"
    assert service["initial_delay_seconds"] >= 1200  # a 7B download and load on a fresh VM
    assert service["min_replicas"] == 1 and service["max_replicas"] == 4
    assert service["target_qps_per_replica"] == 4
    assert service["upscale_delay_seconds"] == 300
    assert service["downscale_delay_seconds"] == 1200
    assert tasks["service.yaml"]["envs"]["RINGSERVE_FOLLOW"] == "1"  # lasts while it serves
