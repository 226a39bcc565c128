"""Print what SkyPilot reads from task YAMLs (``sky.Task.from_yaml``, offline), as JSON.

    .venv/sky/bin/python tests/sky_task_summary.py sky/serve.yaml [...]

tests/test_sky_yamls.py runs it with the interpreter that has skypilot: ``make setup`` puts
skypilot in .venv/sky, apart from the test venv (its click<8.2 pin would hold transformers,
which the tokenizer tests compare against, back to an older release).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml

import sky  # SkyPilot, in .venv/sky only (mypy: the repo's sky/ folder holds YAMLs)

GIVEN_SECRETS = [("HF_TOKEN", "hf_test"), ("RINGSERVE_API_KEYS", "sk-test")]


def summary(path: str) -> dict[str, Any]:
    task = sky.Task.from_yaml(path)
    with open(path) as fh:
        given = sky.Task.from_yaml_config(yaml.safe_load(fh), secrets_overrides=GIVEN_SECRETS)
    service = task.service
    return {
        "num_nodes": task.num_nodes, "workdir": task.workdir, "setup": task.setup,
        "run": task.run, "envs": dict(task.envs),
        "secret_refs": sorted(ref.name for ref in task._managed_secret_refs),
        "secrets_given": {k: v.get_secret_value() for k, v in given.secrets.items()},
        "resources": [{"cloud": None if r.cloud is None else str(r.cloud),
                       "accelerators": dict(r.accelerators or {}), "ports": r.ports,
                       "disk_size": r.disk_size} for r in task.resources],
        "service": None if service is None else {
            "readiness_path": service.readiness_path,
            "initial_delay_seconds": service.initial_delay_seconds,
            "min_replicas": service.min_replicas, "max_replicas": service.max_replicas,
            "target_qps_per_replica": service.target_qps_per_replica,
            "upscale_delay_seconds": service.upscale_delay_seconds,
            "downscale_delay_seconds": service.downscale_delay_seconds},
    }


if __name__ == "__main__":
    print(json.dumps({path: summary(path) for path in sys.argv[1:]}))
