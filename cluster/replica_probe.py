"""Ask every LLM replica of a running ringserve where and how it runs.

    python -m cluster.replica_probe GCS_ADDRESS      (run where the cluster's Ray is reachable)

prints one line ``PROBE {"nodes": [...], "replicas": [...]}``: the alive nodes' IPs, and for
each LLM replica its Serve replica id (the ``X-Ringserve-Replica`` header's value), node IP,
pid, torch thread count and ``OMP_NUM_THREADS``. The overhead benchmark reads the threads,
the two-node test the placement.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

PROBE_PREFIX = "PROBE "
CALL_TIMEOUT_S = 60


def describe(actor: Any) -> dict[str, Any]:
    """Runs inside a replica actor (through ``__ray_call__``)."""
    import os

    import ray
    import torch
    from ray import serve

    return {"replica_id": serve.get_replica_context().replica_id.unique_id,
            "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
            "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def probe(address: str) -> dict[str, Any]:
    """Connect a driver to the cluster at ``address`` and describe every LLM replica."""
    import ray

    from app.main import LLM_DEPLOYMENT

    ray.init(address=address, namespace="serve", logging_level=logging.ERROR, log_to_driver=False)
    try:
        replicas = []
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry["name"]
            if name.startswith("SERVE_REPLICA::") and f"#{LLM_DEPLOYMENT}#" in name:
                actor = ray.get_actor(name, namespace=entry["namespace"])
                replicas.append(ray.get(actor.__ray_call__.remote(describe),
                                        timeout=CALL_TIMEOUT_S))
        nodes = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
        return {"nodes": nodes, "replicas": replicas}
    finally:
        ray.shutdown()


def parse(stdout: str) -> dict[str, Any] | None:
    """The probe's result from its output; None when it printed none."""
    for line in stdout.splitlines():
        if line.startswith(PROBE_PREFIX):
            return dict(json.loads(line[len(PROBE_PREFIX):]))
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(PROBE_PREFIX + json.dumps(probe(args[0])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
