"""``ringserve bench serve``: an OpenAI-compatible HTTP load generator (after ``vllm bench serve``).

It sends one seeded workload to one or more servers, one after the other, and measures what a
client sees. The workload: ``--num-requests`` prompts cut from a fixed real text shipped in the
repo (bench/data/gpl-3.0.txt, the GNU GPL v3 text) with word counts drawn uniformly from
``--prompt-len`` and ``max_tokens`` from ``--output-len``, all from ``--seed``; requests are
streamed (SSE), greedy, ``ignore_eos`` by default so every server produces the same lengths.
Load is a closed loop of ``--concurrency`` clients, or Poisson arrivals at ``--request-rate``
(optionally capped by ``--max-concurrency``); ``--duration-s`` bounds the run (no request
starts after it; those still running are cancelled ``--timeout-s`` later at the latest).

Per server and load point it reports TTFT, TPOT (per request: (E2E - TTFT) / (tokens - 1)),
ITL (every gap between streamed chunks) and E2E latency (mean, median, p90, p99, in ms),
request and token throughput, goodput (completed requests/s meeting ``--slo ttft:MS,tpot:MS``),
shed rate (429s) and every status code. ``completed + shed + failed == sent`` always holds.

``--sweep 1,4,16`` runs each concurrency in turn; results go to ``--out-dir``:
``results.json``, ``results.md`` (one Markdown table) and ``latency_vs_throughput.png``.
A second ``--url``, or ``--peer-cmd`` (a shell command starting a peer server that serves
``--peer-url``; it is stopped afterwards), runs the same workload against the peer and prints
the ratios first server / peer. ``--llama-server [BINARY]`` is the shortcut for
llama.cpp's server as that peer: BINARY (default ``$LLAMA_SERVER``) on the embedded default
GGUF (or ``--llama-model``) with ``-t`` the usable cores and ``-np`` the highest concurrency.
Before sending load it prints the machine (bench/machine.py: cores, AVX flags, measured memory
bandwidth and fp32 / int8 matmul FLOP/s; ``--no-machine`` skips the ~2 s measurement) and each
load point records the 1-minute load average before and after it (other jobs on the box skew
figures; that is why peers run in one run). A server that refuses the connection or answers
the model listing with an error ends the run with one line and exit status 1.

    ringserve bench serve --url http://127.0.0.1:8000 [--sweep 1,4,16] [--num-requests 48]
        [--request-rate 4] [--slo ttft:2000,tpot:100] [--url http://127.0.0.1:8080]
        [--peer-cmd "llama-server -m model.gguf --port 8080" --peer-url http://127.0.0.1:8080]
        [--llama-server /path/to/llama-server]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.machine import describe, machine_report

CORPUS = Path(__file__).parent / "data" / "gpl-3.0.txt"
SHED_STATUS = 429
PERCENTILES = (50, 90, 99)
EXIT_ERROR = 1


class BenchError(Exception):
    """A problem that ends the run with one line (unreachable server, bad arguments)."""


# Workload -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkItem:
    """One request: its prompt, how many tokens it asks for, and when it may start."""

    prompt: str
    prompt_words: int
    max_tokens: int
    arrival_s: float  # offset from the start; 0 for every request in closed-loop mode


def parse_range(text: str, name: str) -> tuple[int, int]:
    """'24,200' -> (24, 200); one number is a fixed length."""
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError as exc:
        raise BenchError(f"--{name}: expected MIN,MAX integers, got {text!r}") from exc
    lo, hi = (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    if len(parts) > 2 or lo < 1 or hi < lo:
        raise BenchError(f"--{name}: expected 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def build_workload(num_requests: int, prompt_len: tuple[int, int], output_len: tuple[int, int],
                   seed: int, request_rate: float | None, corpus: Path = CORPUS
                   ) -> list[WorkItem]:
    """The seeded workload: the same list for every server and load point."""
    words = corpus.read_text(encoding="utf-8").split()
    rng = random.Random(seed)
    items, clock = [], 0.0
    for _ in range(num_requests):
        count = rng.randint(*prompt_len)
        if count > len(words):
            raise BenchError(f"--prompt-len {count} words exceeds the corpus ({len(words)})")
        start = rng.randrange(0, len(words) - count + 1)
        if request_rate is not None:
            clock += rng.expovariate(request_rate)
        items.append(WorkItem(" ".join(words[start:start + count]), count,
                              rng.randint(*output_len), clock))
    return items


# One request ----------------------------------------------------------------------------------
@dataclass
class RequestResult:
    """What the client saw of one request."""

    max_tokens: int = 0  # what the request asked for
    status: int | None = None  # HTTP status; None when no response came (connection error)
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None  # from the server's usage, when it sends one

    @property
    def completed(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def shed(self) -> bool:
        return self.status == SHED_STATUS

    @property
    def tpot_s(self) -> float | None:
        if not self.completed or self.output_tokens < 2 or self.ttft_s is None:
            return None
        assert self.e2e_s is not None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def _request_body(endpoint: str, model: str, item: WorkItem, ignore_eos: bool
                  ) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": item.max_tokens, "temperature": 0.0,
                            "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": item.prompt}]
    else:
        body["prompt"] = item.prompt
    return body


def _chunk_tokens(event: dict[str, Any]) -> int:
    """Streamed chunks that carry text count as tokens (one chunk per token on most servers)."""
    count = 0
    for choice in event.get("choices") or []:
        text = choice.get("text")
        if text is None:
            text = (choice.get("delta") or {}).get("content")
        if text:
            count += 1
    return count


async def send_one(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                   timeout_s: float) -> RequestResult:
    """Stream one request, timing its first token, every later chunk and its end."""
    result = RequestResult(max_tokens=int(body["max_tokens"]))
    started = time.perf_counter()
    try:
        await asyncio.wait_for(_stream(client, url, body, result, started), timeout_s)
        if result.status == 200 and result.ttft_s is None and result.error is None:
            result.error = "the stream ended without a token"
    except asyncio.TimeoutError:
        result.error = f"timed out after {timeout_s:g}s"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    result.e2e_s = time.perf_counter() - started
    return result


async def _stream(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                  result: RequestResult, started: float) -> None:
    last: float | None = None
    counted = reported = 0
    async with client.stream("POST", url, json=body) as reply:
        result.status = reply.status_code
        if reply.status_code != 200:
            await reply.aread()
            return
        async for line in reply.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                result.error = str(event["error"])[:200]
                break
            usage = event.get("usage")
            if usage:
                result.prompt_tokens = usage.get("prompt_tokens")
                reported = int(usage.get("completion_tokens") or 0)
            tokens = _chunk_tokens(event)
            if tokens:
                now = time.perf_counter()
                if last is None:
                    result.ttft_s = now - started
                else:
                    result.itl_s.append(now - last)
                last = now
                counted += tokens
                result.output_tokens = counted
    # a server that packs several tokens into one chunk still reports them all in usage
    result.output_tokens = max(counted, reported)


# A load point ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadPoint:
    """How requests are offered: a closed loop of ``concurrency`` clients or Poisson arrivals."""

    concurrency: int | None
    request_rate: float | None
    max_concurrency: int | None

    def label(self) -> str:
        if self.request_rate is not None:
            cap = f", max {self.max_concurrency}" if self.max_concurrency else ""
            return f"rate {self.request_rate:g}/s{cap}"
        return f"concurrency {self.concurrency}"


async def run_load(url: str, model: str, endpoint: str, items: Sequence[WorkItem],
                   point: LoadPoint, ignore_eos: bool, timeout_s: float,
                   duration_s: float | None, progress: bool, desc: str
                   ) -> tuple[list[RequestResult], float]:
    """Offer the workload at one load point; returns per-request results and the wall time."""
    from tqdm import tqdm

    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    limit = point.concurrency or point.max_concurrency or len(items)
    gate = asyncio.Semaphore(limit)
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    bar = tqdm(total=len(items), desc=desc, unit="req", file=sys.stderr, disable=not progress)
    started = time.perf_counter()

    async def one(client: httpx.AsyncClient, item: WorkItem) -> None:
        delay = item.arrival_s - (time.perf_counter() - started)
        if delay > 0:
            await asyncio.sleep(delay)
        async with gate:
            if duration_s is not None and time.perf_counter() - started > duration_s:
                bar.update()
                return  # the time bound passed: not sent
            results.append(await send_one(client, url + path,
                                          _request_body(endpoint, model, item, ignore_eos),
                                          timeout_s))
            bar.update()

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        await asyncio.gather(*(one(client, item) for item in items))
    bar.close()
    return results, time.perf_counter() - started


# Figures --------------------------------------------------------------------------------------
def distribution_ms(values: Sequence[float]) -> dict[str, float | None]:
    """mean, median, p90, p99 (nearest-rank on the sorted values) in milliseconds."""
    if not values:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    ordered = sorted(v * 1000 for v in values)

    def rank(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]

    return {"mean": statistics.fmean(ordered), "median": statistics.median(ordered),
            "p90": rank(90), "p99": rank(99)}


def summarize(results: Sequence[RequestResult], wall_s: float,
              slo: dict[str, float]) -> dict[str, Any]:
    """Every figure the report shows for one server at one load point."""
    done = [r for r in results if r.completed]
    shed = sum(r.shed for r in results)
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in done)
    good = [r for r in done
            if (r.ttft_s is not None and r.ttft_s * 1000 <= slo.get("ttft", math.inf))
            and (r.tpot_s is None or r.tpot_s * 1000 <= slo.get("tpot", math.inf))]
    codes = Counter("error" if r.status is None else str(r.status) for r in results)
    errors = Counter(r.error for r in results if r.error)
    wall = max(wall_s, 1e-9)
    return {
        "sent": len(results), "completed": len(done), "shed": shed,
        "failed": len(results) - len(done) - shed,
        "shed_rate": shed / len(results) if results else 0.0,
        "status_codes": dict(sorted(codes.items())),
        "errors": dict(errors.most_common(5)),
        "wall_s": wall_s,
        "request_throughput": len(done) / wall,
        "output_token_throughput": output_tokens / wall,
        "total_token_throughput": (output_tokens + prompt_tokens) / wall,
        "output_tokens": output_tokens, "prompt_tokens": prompt_tokens,
        "goodput": len(good) / wall, "slo": slo,
        "ttft_ms": distribution_ms([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_ms": distribution_ms([t for r in done if (t := r.tpot_s) is not None]),
        "itl_ms": distribution_ms([gap for r in done for gap in r.itl_s]),
        "e2e_ms": distribution_ms([r.e2e_s for r in done if r.e2e_s is not None]),
    } | _decode_rate(done)


def _decode_rate(done: Sequence[RequestResult]) -> dict[str, float | None]:
    """One stream's decode speed as a client sees it: 1 / median TPOT (tokens/s)."""
    tpots = [t for r in done if (t := r.tpot_s) is not None]
    return {"decode_tok_s": 1 / statistics.median(tpots) if tpots else None}


def parse_slo(text: str | None) -> dict[str, float]:
    """'ttft:2000,tpot:100' -> {'ttft': 2000.0, 'tpot': 100.0} (milliseconds)."""
    if not text:
        return {}
    slo: dict[str, float] = {}
    for part in text.split(","):
        key, _, value = part.partition(":")
        if key not in ("ttft", "tpot") or not value:
            raise BenchError(f"--slo: expected ttft:MS,tpot:MS, got {text!r}")
        try:
            slo[key] = float(value)
        except ValueError as exc:
            raise BenchError(f"--slo: {value!r} is not a number of milliseconds") from exc
    return slo


# Servers --------------------------------------------------------------------------------------
def probe_model(url: str, model: str | None, timeout_s: float = 10.0) -> str:
    """Ask ``url``/v1/models which model it serves; BenchError in one line when it cannot."""
    try:
        reply = httpx.get(url + "/v1/models", timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise BenchError(f"{url}: cannot connect ({type(exc).__name__}: {exc})") from exc
    if reply.status_code != 200:
        raise BenchError(f"{url}/v1/models answered HTTP {reply.status_code}; is this an "
                         "OpenAI-compatible server?")
    try:
        served = [m["id"] for m in reply.json()["data"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"{url}/v1/models did not answer an OpenAI model list") from exc
    if model is not None:
        return model
    if not served:
        raise BenchError(f"{url}/v1/models lists no model")
    return str(served[0])


class PeerProcess:
    """A peer server started from ``--peer-cmd`` in its own process group, stopped at exit."""

    def __init__(self, command: str, url: str, start_timeout_s: float) -> None:
        self.url = url
        self.proc = subprocess.Popen(shlex.split(os.path.expandvars(command)),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + start_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"--peer-cmd exited with status {self.proc.returncode} "
                                 "before serving")
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"--peer-cmd: {url} did not answer within {start_timeout_s:g}s")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def llama_server_command(binary: str | None, model: str | None, slots: int,
                         threads: int, ctx_per_slot: int = 1024) -> tuple[str, str]:
    """(command, url) that start llama.cpp's llama-server as the peer on a free port.

    ``binary`` None means ``$LLAMA_SERVER``; ``model`` None the embedded default GGUF. One
    slot per client (``-np``), ``ctx_per_slot`` tokens each (prompt + output of the default
    workload fit in 1024), ``threads`` compute threads, CPU only, loopback only.
    """
    binary = binary or os.environ.get("LLAMA_SERVER")
    if not binary:
        raise BenchError("--llama-server: give the binary or set LLAMA_SERVER (llama.cpp's "
                         "llama-server; see bench/README.md for how to build it)")
    found = shutil.which(binary)
    if found is None:
        raise BenchError(f"--llama-server: {binary} is not an executable")
    if model is None:
        from model.default_model import default_model_path

        model = str(default_model_path())
    port = _free_port()
    command = shlex.join([found, "-m", model, "-t", str(threads), "-np", str(slots),
                          "-c", str(slots * ctx_per_slot), "-ngl", "0", "--host", "127.0.0.1",
                          "--port", str(port)])
    return command, f"http://127.0.0.1:{port}"


# Report ---------------------------------------------------------------------------------------
_COLUMNS = (
    ("server", lambda r: r["server"]), ("load", lambda r: r["load"]),
    ("sent", lambda r: str(r["sent"])), ("ok", lambda r: str(r["completed"])),
    ("shed", lambda r: str(r["shed"])), ("failed", lambda r: str(r["failed"])),
    ("req/s", lambda r: f"{r['request_throughput']:.2f}"),
    ("out tok/s", lambda r: f"{r['output_token_throughput']:.1f}"),
    ("goodput", lambda r: f"{r['goodput']:.2f}"),
    ("decode tok/s", lambda r: "-" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.1f}"),
    ("TTFT med/p99 ms", lambda r: _pair(r["ttft_ms"])),
    ("TPOT med/p99 ms", lambda r: _pair(r["tpot_ms"])),
    ("ITL med/p99 ms", lambda r: _pair(r["itl_ms"])),
    ("E2E med/p99 ms", lambda r: _pair(r["e2e_ms"])),
    ("load avg", lambda r: "/".join(f"{x:.1f}" for x in r.get("loadavg_1m", ())) or "-"),
)
# ratio first server / peer: throughputs and latencies (a latency ratio > 1 is slower)
_RATIOS = (("output tok/s", "output_token_throughput", None), ("req/s", "request_throughput",
           None), ("decode tok/s per stream (1/median TPOT)", "decode_tok_s", None),
           ("median TTFT", "ttft_ms", "median"), ("median TPOT", "tpot_ms", "median"),
           ("median E2E", "e2e_ms", "median"))


def _pair(dist: dict[str, float | None]) -> str:
    if dist["median"] is None or dist["p99"] is None:
        return "-"
    return f"{dist['median']:.0f} / {dist['p99']:.0f}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One Markdown table, a row per server and load point."""
    lines = ["| " + " | ".join(name for name, _ in _COLUMNS) + " |",
             "|" + "|".join("---" for _ in _COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(row) for _, cell in _COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def ratio_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per load point: first server's figures over each other server's."""
    lines = []
    servers = list(dict.fromkeys(r["server"] for r in rows))
    for peer in servers[1:]:
        for load in dict.fromkeys(r["load"] for r in rows):
            ours = next((r for r in rows if r["server"] == servers[0] and r["load"] == load), None)
            theirs = next((r for r in rows if r["server"] == peer and r["load"] == load), None)
            if ours is None or theirs is None:
                continue
            parts = []
            for name, key, sub in _RATIOS:
                a, b = ours[key], theirs[key]
                if sub is not None:
                    a, b = a[sub], b[sub]
                parts.append(f"{name} {a / b:.2f}x" if a is not None and b else f"{name} -")
            lines.append(f"{servers[0]} / {peer}, {load}: " + ", ".join(parts))
    return lines


def write_plot(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """Median TTFT and TPOT against output tokens/s, a line per server; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for server in dict.fromkeys(r["server"] for r in rows):
        mine = [r for r in rows if r["server"] == server]
        for ax, key in zip(axes, ("ttft_ms", "tpot_ms"), strict=True):
            points = [(r["output_token_throughput"], r[key]["median"]) for r in mine
                      if r[key]["median"] is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=server)
                for r, (x, y) in zip(mine, points, strict=False):
                    ax.annotate(r["load"].split()[-1], (x, y), fontsize=7)
    for ax, title in zip(axes, ("median TTFT (ms)", "median TPOT (ms)"), strict=True):
        ax.set_xlabel("output tokens/s (completed requests)")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("latency vs throughput (labels: concurrency or rate)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# Command line ---------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench serve`` options (shared by ``ringserve bench serve`` and ``python -m``)."""
    p.add_argument("--url", action="append", default=[],
                   help="server base URL, e.g. http://127.0.0.1:8000 (repeat to compare peers)")
    p.add_argument("--peer-cmd", default=None,
                   help="shell command that starts a peer server (e.g. llama-server ...); "
                        "$LLAMA_SERVER is expanded")
    p.add_argument("--peer-url", default=None, help="the URL --peer-cmd's server answers on")
    p.add_argument("--peer-start-timeout", type=float, default=300.0)
    p.add_argument("--llama-server", nargs="?", const="", default=None, metavar="BINARY",
                   help="start llama.cpp's llama-server (BINARY, default $LLAMA_SERVER) on "
                        "the default GGUF as the peer, -t cores -np max concurrency")
    p.add_argument("--llama-model", default=None,
                   help="with --llama-server: the GGUF it serves (default the embedded one)")
    p.add_argument("--label", action="append", default=[],
                   help="a name per server, in order (--url ones, then the peer)")
    p.add_argument("--no-machine", action="store_true",
                   help="skip measuring the machine (memory bandwidth, matmul FLOP/s)")
    p.add_argument("--model", default=None, help="model name to send; default each server's "
                   "first /v1/models entry")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=None,
                   help="closed loop with this many clients (default 1 without --request-rate)")
    p.add_argument("--sweep", default=None, help="comma-separated concurrencies, run in turn")
    p.add_argument("--request-rate", type=float, default=None,
                   help="Poisson arrivals at this many requests/s instead of a closed loop")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="with --request-rate: most requests in flight at once")
    p.add_argument("--prompt-len", default="24,200", help="prompt words MIN,MAX (uniform)")
    p.add_argument("--output-len", default="64,128", help="max_tokens MIN,MAX (uniform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ignore-eos", action="store_true",
                   help="do not send ignore_eos (servers then stop at end-of-sequence)")
    p.add_argument("--duration-s", type=float, default=None,
                   help="start no request after this many seconds of a load point")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per-request time limit")
    p.add_argument("--slo", default=None, help="goodput SLO, e.g. ttft:2000,tpot:100 (ms)")
    p.add_argument("--out-dir", default=None,
                   help="write results.json, results.md and latency_vs_throughput.png here")
    p.add_argument("--no-progress", action="store_true")


def _load_points(args: argparse.Namespace) -> list[LoadPoint]:
    if args.request_rate is not None:
        if args.sweep or args.concurrency:
            raise BenchError("--request-rate excludes --concurrency and --sweep")
        if args.request_rate <= 0:
            raise BenchError("--request-rate must be > 0")
        return [LoadPoint(None, args.request_rate, args.max_concurrency)]
    if args.sweep:
        try:
            levels = [int(c) for c in args.sweep.split(",")]
        except ValueError as exc:
            raise BenchError(f"--sweep: expected integers, got {args.sweep!r}") from exc
    else:
        levels = [args.concurrency or 1]
    if any(c < 1 for c in levels):
        raise BenchError("concurrency must be >= 1")
    return [LoadPoint(c, None, None) for c in levels]


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``; 0 when every server completed a request."""
    urls = [u.rstrip("/") for u in args.url]
    if args.peer_cmd and args.llama_server is not None:
        raise BenchError("--llama-server is a --peer-cmd: give one of them")
    if args.peer_cmd and not args.peer_url:
        raise BenchError("--peer-cmd needs --peer-url (where the peer answers)")
    if not urls:
        raise BenchError("give at least one --url")
    if args.num_requests < 1:
        raise BenchError("--num-requests must be >= 1")
    points = _load_points(args)
    slo = parse_slo(args.slo)
    items = build_workload(args.num_requests, parse_range(args.prompt_len, "prompt-len"),
                           parse_range(args.output_len, "output-len"), args.seed,
                           args.request_rate)
    peer_cmd, peer_url = args.peer_cmd, args.peer_url
    if args.llama_server is not None:
        slots = max(p.concurrency or p.max_concurrency or 16 for p in points)
        peer_cmd, peer_url = llama_server_command(args.llama_server or None, args.llama_model,
                                                  slots, machine_report(measured=False)["cores"])
    targets = [(url, probe_model(url, args.model)) for url in urls]
    machine: dict[str, Any] | None = None
    if not args.no_machine:
        machine = machine_report()
        print(describe(machine), flush=True)
    rows: list[dict[str, Any]] = []
    peer: PeerProcess | None = None
    try:
        if peer_cmd:
            print(f"peer: {peer_cmd}", file=sys.stderr)
            peer = PeerProcess(peer_cmd, peer_url.rstrip("/"), args.peer_start_timeout)
            targets.append((peer.url, probe_model(peer.url, args.model)))
        labels: list[str] = []
        for i, (url, model) in enumerate(targets):
            label = url if url not in labels else f"{url} #{labels.count(url) + 1}"
            labels.append(url)
            if i < len(args.label):
                label = args.label[i]
            for point in points:
                load_before = os.getloadavg()[0]
                results, wall = asyncio.run(run_load(
                    url, model, args.endpoint, items, point, not args.no_ignore_eos,
                    args.timeout_s, args.duration_s, not args.no_progress,
                    f"{label} {point.label()}"))
                row = {"server": label, "url": url, "model": model, "load": point.label(),
                       "concurrency": point.concurrency, "request_rate": point.request_rate,
                       **summarize(results, wall, slo),
                       "loadavg_1m": [load_before, os.getloadavg()[0]],
                       "requests": [asdict(r) for r in results]}
                rows.append(row)
    finally:
        if peer is not None:
            peer.stop()
    table = markdown_table(rows)
    print(table)
    for line in ratio_lines(rows):
        print(line)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        workload = {"num_requests": args.num_requests, "prompt_len": args.prompt_len,
                    "output_len": args.output_len, "seed": args.seed,
                    "endpoint": args.endpoint, "ignore_eos": not args.no_ignore_eos,
                    "corpus": CORPUS.name, "slo": slo}
        (out / "results.json").write_text(json.dumps(
            {"workload": workload, "machine": machine, "command": sys.argv, "runs": rows},
            indent=1))
        header = [describe(machine), ""] if machine is not None else []
        (out / "results.md").write_text("\n".join([*header, table, "", *ratio_lines(rows)])
                                        + "\n")
        if not write_plot(rows, out / "latency_vs_throughput.png"):
            print("bench serve: no PNG plot (matplotlib is not installed: "
                  "pip install 'ringserve[bench]')", file=sys.stderr)
        print(f"wrote {out}/results.json, results.md", file=sys.stderr)
    failed = [r["server"] for r in rows if r["completed"] == 0]
    if failed:
        first = next(r for r in rows if r["completed"] == 0)
        print(f"bench serve: no request completed on {first['server']} ({first['load']}): "
              f"status codes {first['status_codes']}, errors {first['errors']}",
              file=sys.stderr)
        return EXIT_ERROR
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.serve_bench``: the same as ``ringserve bench serve``."""
    parser = argparse.ArgumentParser(prog="ringserve bench serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except BenchError as exc:
        print(f"bench serve: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
