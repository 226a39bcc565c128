"""The headline serving comparison: ``ringserve serve`` vs llama.cpp's ``llama-server``.

Starts ``ringserve serve`` (its defaults unless ``--app-arg`` says otherwise; Ray in a private
network namespace, the API on 127.0.0.1:``--port``), then runs ``ringserve bench serve`` twice
with ``--llama-server`` (``$LLAMA_SERVER`` on the same embedded GGUF, ``-t`` all cores, ``-np``
the concurrency), the same seeded workload against both, one after the other:

* concurrency 1, ``--c1-requests`` requests (default 12): decode tok/s per stream (1 / median
  TPOT) and TTFT with nothing else running;
* concurrency 16, ``--c16-requests`` requests (default 48): output tok/s of completed
  requests, median TTFT, and how many were answered 200.

Workload (issue #13's): prompts of 24..200 words from bench/data/gpl-3.0.txt, 64..128 output
tokens, greedy, ``ignore_eos``, streamed, ``/v1/completions``. Writes
``--out-dir``/c1 and /c16 (results.json, results.md, PNG) and prints the three headline ratios
(ringserve / llama-server). Needs root (Ray's ports stay in a namespace) and the binary::

    LLAMA_SERVER=/path/to/llama-server python -m bench.serve_vs_llama
        [--out-dir bench/results/serve_vs_llama_cpu_2core] [--app-arg KEY=VALUE ...]

Prints; asserts nothing. About 8 minutes on the 2-core box.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench import serve_bench

BIN = Path(sys.executable).parent


def start_ringserve(port: int, app_args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``ringserve serve`` in its own process group; returns once /health answers 200."""
    out = open(log, "wb")  # the child keeps it; closed with the process
    proc = subprocess.Popen([str(BIN / "ringserve"), "serve", "--port", str(port),
                             "--log-file", "-", *app_args], stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"ringserve serve exited ({proc.returncode}); see {log}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"ringserve serve did not become healthy; see {log}")
            time.sleep(2)
    except BaseException:  # Ctrl-C too: never leave the server (its own session) behind
        stop(proc)
        raise


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT (ringserve serve stops Serve and deletes its namespace), then harder."""
    for sig, wait_s in ((signal.SIGINT, 90.0), (signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue


def headline(out: Path) -> list[str]:
    """The three figures README quotes, from the two runs' results.json."""
    def rows(name: str) -> dict[str, Any]:
        runs = json.loads((out / name / "results.json").read_text())["runs"]
        return {str(r["server"]): r for r in runs}

    c1, c16 = rows("c1"), rows("c16")
    d_ours, d_peer = (float(c1[s]["decode_tok_s"]) for s in ("ringserve", "llama-server"))
    o_ours, o_peer = (float(c16[s]["output_token_throughput"])
                      for s in ("ringserve", "llama-server"))
    t_ours, t_peer = (float(c16[s]["ttft_ms"]["median"]) for s in ("ringserve", "llama-server"))
    answered = {s: f"{c16[s]['completed']} of {c16[s]['sent']} answered 200"
                for s in ("ringserve", "llama-server")}
    return [
        f"concurrency 1, decode tok/s per stream: ringserve {d_ours:.1f}, llama-server "
        f"{d_peer:.1f}: {d_ours / d_peer:.2f}x",
        f"concurrency 16, output tok/s: ringserve {o_ours:.1f} ({answered['ringserve']}), "
        f"llama-server {o_peer:.1f} ({answered['llama-server']}): {o_ours / o_peer:.2f}x",
        f"concurrency 16, median TTFT: ringserve {t_ours / 1000:.2f} s, llama-server "
        f"{t_peer / 1000:.2f} s: {t_ours / t_peer:.2f}x (> 1 is slower)",
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8431)
    p.add_argument("--app-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--c1-requests", type=int, default=12)
    p.add_argument("--c16-requests", type=int, default=48)
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"
                                            / "serve_vs_llama_cpu_2core"))
    p.add_argument("--llama-server", default=None, help="the binary (default $LLAMA_SERVER)")
    args = p.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    proc = start_ringserve(args.port, args.app_arg, out / "ringserve-serve.log")
    try:
        url = f"http://127.0.0.1:{args.port}"
        model = serve_bench.probe_model(url, None)
        httpx.post(f"{url}/v1/completions", timeout=120,  # warm-up
                   json={"model": model, "prompt": "Hello", "max_tokens": 4})
        common = ["--url", url, "--llama-server",
                  *([args.llama_server] if args.llama_server else []),
                  "--label", "ringserve", "--label", "llama-server", "--seed", "0",
                  "--prompt-len", "24,200", "--output-len", "64,128", "--no-progress"]
        for name, concurrency, requests in (("c1", 1, args.c1_requests),
                                            ("c16", 16, args.c16_requests)):
            status = serve_bench.main([*common, "--concurrency", str(concurrency),
                                       "--num-requests", str(requests),
                                       "--out-dir", str(out / name)])
            if status != 0:
                return status
    finally:
        stop(proc)
    print("\n".join(headline(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
