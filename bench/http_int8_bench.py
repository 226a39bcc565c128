"""fp32 vs int8 through HTTP, measured with ``ringserve bench serve`` (no Ray needed).

Starts two OpenAI-compatible servers in this process, each the real Router app (FastAPI,
admission control, SSE) over one in-process LLMServer with a real engine of the embedded
default model, served by uvicorn on 127.0.0.1: ``--port`` (quantization none) and
``--port + 1`` (int8). Then runs ``ringserve bench serve --url fp32 --url int8`` with the
workload below and prints its table and ratios (fp32 / int8), writing ``--out-dir``.
Ray Serve's own overhead is left out (bench/serve_overhead_bench.py measures that).

    python -m bench.http_int8_bench [--threads 2] [--port 21001] [--sweep 1,16]
        [--num-requests 16] [--out-dir bench/results/serve_int8_vs_fp32_cpu_2core]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

from app.llm_server import BatchItem, Event, LLMServer
from app.load import ReplicaLoad


class InProcessClient:
    """The router's ReplicaClient over one LLMServer in this process."""

    def __init__(self, server: LLMServer) -> None:
        self.server = server

    def replica_ids(self) -> list[str]:
        return ["r0"]

    async def stats(self, target: str | None) -> ReplicaLoad:
        return await self.server.stats(target=target)

    def generate_batch(self, target: str, items: list[BatchItem]) -> AsyncIterator[list[Event]]:
        return self.server.generate_batch(items, target=target)

    async def abort(self, target: str, request_ids: list[str]) -> None:
        await self.server.abort(request_ids, target=target)

    async def model_info(self) -> dict[str, object]:
        return await self.server.model_info()


def main() -> int:
    import uvicorn

    from app.config import AppConfig
    from app.main import build_engine
    from app.router import Router

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per engine (default: the replica default)")
    parser.add_argument("--port", type=int, default=21001)
    parser.add_argument("--sweep", default="1,16")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--output-len", default="32,64")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"
                                                 / "serve_int8_vs_fp32_cpu_2core"))
    args = parser.parse_args()
    servers = []
    for offset, quantization in enumerate(("none", "int8")):
        config = AppConfig(quantization=quantization, max_model_len=1024, max_num_seqs=16,
                           kv_cache_memory=512 * 1024**2, replica_torch_threads=args.threads)
        engine = build_engine(config.engine_args(), config)
        # the factory is called at once, so the loop variable is read before it moves on
        client = InProcessClient(LLMServer(lambda: engine, replica_id="r0"))  # noqa: B023
        router = Router(client, config)
        server = uvicorn.Server(uvicorn.Config(router.http_app, host="127.0.0.1",
                                               port=args.port + offset, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        servers.append(server)
    while not all(s.started for s in servers):
        time.sleep(0.1)
    print(f"fp32 at http://127.0.0.1:{args.port}, int8 at http://127.0.0.1:{args.port + 1}",
          file=sys.stderr)
    try:
        return subprocess.run(
            [sys.executable, "-m", "app.cli", "bench", "serve", "--no-progress",
             "--url", f"http://127.0.0.1:{args.port}", "--url", f"http://127.0.0.1:{args.port + 1}",
             "--sweep", args.sweep, "--num-requests", str(args.num_requests),
             "--prompt-len", "24,200", "--output-len", args.output_len, "--seed", "0",
             "--slo", "ttft:3000,tpot:200", "--out-dir", args.out_dir],
            timeout=3600).returncode
    finally:
        for server in servers:
            server.should_exit = True


if __name__ == "__main__":
    sys.exit(main())
