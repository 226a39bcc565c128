"""A two-node ringserve cluster on this machine, brought up the way SkyPilot brings up
sky/cluster.yaml: the YAML's own ``setup`` and ``run`` scripts, run with bash on each node
with SKYPILOT_NODE_RANK / SKYPILOT_NODE_IPS / SKYPILOT_NUM_NODES / SKYPILOT_NUM_GPUS_PER_NODE.

Each node is a private network namespace (:mod:`cluster.isolation`); a veth pair joins the
two, with an address on each end and no other route, so Ray, the Serve proxy and the test's
requests reach each other and nothing else. Nodes have 1 CPU each and LLM replicas reserve
0.6, so the two replicas (embedded model, CPU) land one per node. The test checks Ray sees 2
nodes, a replica on each, completions through the head's proxy answered by both replicas
(``X-Ringserve-Replica``), the API key wired through the YAML's envs, and that a second
``run`` keeps Ray and redeploys; at the end, the namespaces and everything in them are gone.
Root only (``ip netns``); skipped otherwise.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cluster import replica_probe
from cluster.isolation.netns import NetNamespace, netns_names, netns_supported, veth_pair
from cluster.isolation.procfs import cmdline, is_running
from cluster.isolation.ray_tmpdir import make_ray_tmpdir

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NETNS_PREFIXES = ("rs10n0", "rs10n1")  # node namespaces: rs10n0-<pid>, rs10n1-<pid>
TMP_PREFIX = "rs10t"
IPS = ("10.210.10.1", "10.210.10.2")
API_KEY = "sk-two-nodes"
MODEL = "SmolLM2-135M-Instruct"
RUN_TIMEOUT_S = 300  # each node's `run`, bounded
# Overrides, as `sky launch --env/--secret` would pass them: the embedded model on CPU.
OVERRIDES = {
    "MODEL_ID": "", "MAX_MODEL_LEN": "256", "MAX_NUM_SEQS": "4",
    "RINGSERVE_REPLICA_CPUS": "0.6", "RINGSERVE_NODE_CPUS": "1",
    "RINGSERVE_SERVE_ARGS": "router_num_cpus=0.25 kv_cache_memory=67108864",
    "RINGSERVE_API_KEYS": API_KEY, "RINGSERVE_VENV": sys.prefix,  # installed: setup skips
    "RINGSERVE_INSTALL_MONITORING": "0",  # no package installs here (Prometheus may run)
    "RINGSERVE_HEAD_WAIT_S": "120", "RINGSERVE_NODES_TIMEOUT_S": "120",
    "RINGSERVE_READY_TIMEOUT_S": "240",
}


class Node:
    """One node: its namespace, its own Ray temp dir, the environment SkyPilot would set."""

    def __init__(self, rank: int, namespace: NetNamespace, tmp: Path) -> None:
        self.rank = rank
        self.namespace = namespace
        self.tmp = tmp
        task = yaml.safe_load((ROOT / "sky" / "cluster.yaml").read_text())
        self.setup, self.run_script = task["setup"], task["run"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SKYPILOT_"))}
        env.update({k: str(v) for k, v in task["envs"].items()}, **OVERRIDES)
        env.update(SKYPILOT_NODE_RANK=str(rank), SKYPILOT_NODE_IPS="\n".join(IPS),
                   SKYPILOT_NUM_NODES=str(len(IPS)), SKYPILOT_NUM_GPUS_PER_NODE="0",
                   RINGSERVE_RAY_TMPDIR=str(tmp / "ray"),
                   RINGSERVE_MONITORING_DIR=str(tmp / "monitoring"),
                   RINGSERVE_SERVE_CONFIG=str(tmp / "serve_config.yaml"), HOME=str(tmp))
        self.env = env

    def bash(self, script: str, log_name: str) -> subprocess.Popen[bytes]:
        """Run ``script`` with bash inside the node, in the workdir (the checkout), logged."""
        log = open(self.tmp / log_name, "wb")  # the child holds it
        proc = subprocess.Popen([*self.namespace.exec_prefix(), "bash", "-c", script],
                                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        return proc

    def log(self, log_name: str) -> str:
        return (self.tmp / log_name).read_text(errors="replace")


@contextmanager
def two_nodes() -> Iterator[list[Node]]:
    """Two namespaces joined by a veth pair; removed, with all they ran, on the way out."""
    namespaces: list[NetNamespace] = []
    tmps: list[Path] = []
    try:
        for prefix in NETNS_PREFIXES:
            namespaces.append(NetNamespace.create(prefix))
            tmps.append(make_ray_tmpdir(TMP_PREFIX))
        veth_pair(namespaces[0], namespaces[1], IPS[0], IPS[1])
        pairs = zip(namespaces, tmps, strict=True)
        yield [Node(rank, ns, tmp) for rank, (ns, tmp) in enumerate(pairs)]
    finally:
        for namespace in namespaces:
            namespace.delete()
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)


def run_everywhere(nodes: list[Node], what: str, log_name: str) -> None:
    """The YAML's ``setup`` or ``run`` on every node at once, as SkyPilot runs it."""
    procs = [node.bash(node.setup if what == "setup" else node.run_script, log_name)
             for node in reversed(nodes)]  # the worker first: it must wait for the head
    for node, proc in zip(reversed(nodes), procs, strict=True):
        try:
            proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
        assert proc.returncode == 0, f"rank {node.rank} {what}:\n{node.log(log_name)[-4000:]}"


def probe(head: Node) -> dict[str, Any]:
    """Inside the head: the alive nodes' IPs, each LLM replica's id and node IP."""
    done = subprocess.run([*head.namespace.exec_prefix(), sys.executable, "-m",
                           "cluster.replica_probe", f"{IPS[0]}:6379"], cwd=ROOT,
                          env=head.env, capture_output=True, text=True, timeout=120)
    found = replica_probe.parse(done.stdout)
    assert found is not None, done.stderr[-3000:]
    return found


async def _burst(n: int) -> list[httpx.Response]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=f"http://{IPS[0]}:8000", timeout=120,
                                 headers=headers, trust_env=False) as http:
        body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8,
                "temperature": 0, "ignore_eos": True}
        return await asyncio.gather(*(http.post("/v1/completions", json=body)
                                      for _ in range(n)))


def gcs_servers(node: Node) -> list[int]:
    return [pid for pid in node.namespace.pids() if "gcs_server" in cmdline(pid).split(" ")[0]]


def test_two_node_cluster_from_the_cluster_yaml() -> None:
    if not netns_supported():
        pytest.skip("needs root on Linux with iproute2 (ip netns) for two private namespaces")
    inside: list[int] = []
    names: list[str] = []
    with two_nodes() as nodes:
        head, worker = nodes
        names = [node.namespace.name for node in nodes]
        run_everywhere(nodes, "setup", "setup.log")
        assert "already installed" in head.log("setup.log")
        run_everywhere(nodes, "run", "run.log")
        assert f"serving at http://{IPS[0]}:8000/v1" in head.log("run.log")

        found = probe(head)
        assert found["nodes"] == sorted(IPS)  # Ray sees both nodes
        replica_nodes = {r["replica_id"]: r["node_ip"] for r in found["replicas"]}
        assert sorted(replica_nodes.values()) == sorted(IPS)  # one LLM replica on each node

        with head.namespace.entered():  # a client next to the head's proxy
            denied = httpx.get(f"http://{IPS[0]}:8000/v1/models", trust_env=False, timeout=30)
            responses = asyncio.run(_burst(8))
        assert denied.status_code == 401  # RINGSERVE_API_KEYS reached the router
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        assert all(r.json()["usage"]["completion_tokens"] == 8 for r in responses)
        answered_by = set()
        for r in responses:
            answered_by |= set(r.headers["x-ringserve-replica"].split(","))
        assert answered_by == set(replica_nodes)  # both replicas answered

        run_everywhere(nodes, "run", "rerun.log")  # a second `run` on the live cluster
        assert "Ray head already up" in head.log("rerun.log")
        assert "already in the Ray cluster" in worker.log("rerun.log")
        assert len(gcs_servers(head)) == 1 and not gcs_servers(worker)
        assert probe(head)["nodes"] == sorted(IPS)
        inside = head.namespace.pids() + worker.namespace.pids()
        assert inside
    left = set(names) & set(netns_names())
    assert not left, left
    alive = [pid for pid in inside if is_running(pid)]
    assert not alive, alive


def test_worker_with_unreachable_head_fails_clearly(tmp_path: Path) -> None:
    if not netns_supported():
        pytest.skip("needs root on Linux with iproute2 (ip netns) for a private namespace")
    namespace = NetNamespace.create("rs10u")  # loopback only: the head's address goes nowhere
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SKYPILOT_"))}
        env.update(SKYPILOT_NODE_RANK="1", SKYPILOT_NODE_IPS="10.210.99.1\n10.210.99.2",
                   SKYPILOT_NUM_NODES="2", SKYPILOT_NUM_GPUS_PER_NODE="0",
                   RINGSERVE_VENV=sys.prefix, RINGSERVE_HEAD_WAIT_S="4", HOME=str(tmp_path))
        done = subprocess.run([*namespace.exec_prefix(), "bash", "cluster/run_node.sh"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert not namespace.pids()  # no Ray was started
    finally:
        namespace.delete()
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(
        "ringserve-cluster: error: the Ray head at 10.210.99.1:6379 is unreachable after 4s")
