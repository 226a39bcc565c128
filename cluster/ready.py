"""Wait until a ringserve cluster is whole: every node joined Ray, then (optionally) the API's
``/health`` reports every LLM replica healthy. Bounded: exits 1 with what is missing.

    python -m cluster.ready --ray 10.0.0.1:6379 --nodes 2 [--health http://127.0.0.1:8000 \\
        --replicas 2] [--timeout 600]

Runs on the head (``ray.init`` needs a raylet of the cluster on this machine).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import urllib.error
import urllib.request

POLL_S = 2.0


def _log(message: str) -> None:
    print(f"ringserve-cluster: {message}", file=sys.stderr, flush=True)


def alive_node_ips() -> list[str]:
    """IP of every alive node of the connected Ray cluster, sorted."""
    import ray

    return sorted(n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive"))


def wait_nodes(address: str, count: int, deadline: float) -> list[str]:
    """Connect to the cluster at ``address``; wait for ``count`` alive nodes; their IPs."""
    import ray

    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    try:
        ips = alive_node_ips()
        while len(ips) < count and time.monotonic() < deadline:
            time.sleep(POLL_S)
            ips = alive_node_ips()
        return ips
    finally:
        ray.shutdown()


def health(url: str) -> tuple[int, dict[str, object]]:
    """(status, body) of GET url/health; (0, {}) when nothing answers."""
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with no_proxy.open(f"{url}/health", timeout=5) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except (OSError, ValueError):
        return 0, {}


def wait_health(url: str, replicas: int, deadline: float) -> int:
    """Poll /health until ``replicas`` are healthy; the last healthy count seen."""
    healthy = 0
    while time.monotonic() < deadline:
        status, body = health(url)
        count = body.get("healthy_replicas")
        healthy = int(count) if status == 200 and isinstance(count, int) else 0
        if healthy >= replicas:
            return healthy
        time.sleep(POLL_S)
    return healthy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ray", required=True, help="the Ray head's GCS address, IP:PORT")
    parser.add_argument("--nodes", type=int, required=True, help="nodes the cluster must have")
    parser.add_argument("--health", default=None, help="API base URL whose /health to wait for")
    parser.add_argument("--replicas", type=int, default=1, help="healthy LLM replicas to wait for")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds in all")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.timeout
    ips = wait_nodes(args.ray, args.nodes, deadline)
    if len(ips) < args.nodes:
        _log(f"error: {len(ips)} of {args.nodes} nodes joined the Ray cluster at {args.ray} "
             f"within {args.timeout:.0f}s (joined: {', '.join(ips) or 'none'})")
        return 1
    _log(f"{len(ips)} nodes in the Ray cluster: {', '.join(ips)}")
    if args.health is None:
        return 0
    healthy = wait_health(args.health, args.replicas, deadline)
    if healthy < args.replicas:
        _log(f"error: {healthy} of {args.replicas} LLM replicas healthy at {args.health}/health "
             f"within {args.timeout:.0f}s (see `serve status` and the Ray logs on the head)")
        return 1
    _log(f"{healthy} LLM replicas healthy at {args.health}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
