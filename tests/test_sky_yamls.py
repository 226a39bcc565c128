"""The SkyPilot YAMLs in sky/ parse offline (``sky.Task.from_yaml``: no credentials, no
catalog) and say what docs/cloud.md says they do: every cloud a choice, GPUs that hold a 7B
model in bf16, the API port, the secrets, one GPU node per replica, the service's probe and
replica policy, and setup/run calling cluster/'s scripts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

sky = pytest.importorskip("sky", reason="skypilot is in the test extra: make setup")

ROOT = Path(__file__).resolve().parents[1]
YAMLS = ["serve.yaml", "cluster.yaml", "service.yaml"]
# Where each default accelerator is offered (docs/cloud.md has the instance types).
OFFERED = {"AWS": {"L4", "A10G", "H100"}, "GCP": {"L4", "A100", "H100"},
           "Azure": {"A10", "A100-80GB", "H100"}}
BF16_7B_GPUS = {"L4", "A10G", "A10", "A100", "A100-80GB", "H100"}  # 24 GB or more each


def _task(name: str) -> Any:
    return sky.Task.from_yaml(str(ROOT / "sky" / name))


@pytest.mark.parametrize("name", YAMLS)
def test_every_cloud_is_a_choice_with_gpus_for_a_7b_model(name: str) -> None:
    task = _task(name)
    offered: dict[str, set[str]] = {}
    for resources in task.resources:
        assert resources.cloud is not None, "every choice names its cloud"
        assert resources.accelerators is not None and len(resources.accelerators) == 1
        (gpu, count), = resources.accelerators.items()
        assert gpu in BF16_7B_GPUS and count == 1, resources
        assert resources.ports == ["8000"]
        assert resources.disk_size >= 64
        offered.setdefault(str(resources.cloud), set()).add(gpu)
    assert offered == OFFERED


@pytest.mark.parametrize("name", YAMLS)
def test_model_and_secrets(name: str) -> None:
    task = _task(name)
    assert task.envs["MODEL_ID"] == "mistralai/Mistral-7B-Instruct-v0.3"
    assert {ref.name for ref in task._managed_secret_refs} == {"HF_TOKEN", "RINGSERVE_API_KEYS"}
    assert task.envs["RINGSERVE_ALLOW_NO_AUTH"] == "0"  # keys are required by default
    for secret in ("HF_TOKEN", "RINGSERVE_API_KEYS"):
        assert secret not in task.envs  # secrets are never plain envs (never logged)
    config = yaml.safe_load((ROOT / "sky" / name).read_text())
    given = sky.Task.from_yaml_config(config, secrets_overrides=[
        ("HF_TOKEN", "hf_test"), ("RINGSERVE_API_KEYS", "sk-test")])
    assert given.secrets["HF_TOKEN"].get_secret_value() == "hf_test"
    assert given.secrets["RINGSERVE_API_KEYS"].get_secret_value() == "sk-test"


@pytest.mark.parametrize("name", YAMLS)
def test_setup_and_run_call_the_cluster_scripts(name: str) -> None:
    task = _task(name)
    assert task.workdir == "."
    assert task.setup.strip() == "bash cluster/setup_node.sh"
    assert task.run.strip() == "bash cluster/run_node.sh"
    for script in ("setup_node.sh", "run_node.sh"):
        assert (ROOT / "cluster" / script).is_file()


def test_node_counts() -> None:
    assert _task("serve.yaml").num_nodes == 1
    assert _task("cluster.yaml").num_nodes == 2
    assert _task("service.yaml").num_nodes == 1
    assert _task("serve.yaml").service is None and _task("cluster.yaml").service is None


def test_service_probe_and_replica_policy() -> None:
    task = _task("service.yaml")
    service = task.service
    assert service.readiness_path == "/health"
    assert service.initial_delay_seconds >= 1200  # a 7B download and load on a fresh VM
    assert service.min_replicas == 1 and service.max_replicas == 4
    assert service.target_qps_per_replica == 4
    assert service.upscale_delay_seconds == 300 and service.downscale_delay_seconds == 1200
    assert task.envs["RINGSERVE_FOLLOW"] == "1"  # the replica's job lasts while it serves
