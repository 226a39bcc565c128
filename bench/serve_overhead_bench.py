"""What the router and Ray Serve cost: the engine called directly vs. the same work over HTTP.

Issue #4 asks that, at concurrency 16, serving through HTTP (FastAPI router + Ray Serve +
one LLM replica) keep at least 90% of the output tokens/s of the same engine called directly.
This benchmark measures both in one run, on the same seeded workload:

* workload: ``--requests`` requests (default 64) from a seeded RNG (``--seed``), built with
  :func:`bench.throughput_bench.build_workload`: prompt lengths uniform in ``--prompt-len``
  (default 16..256), random token ids (special ids left out), output lengths uniform in
  ``--output-len`` (default 32..128). Greedy, ``ignore_eos``: every request generates exactly
  its output length on both paths (checked: the engine's chunk count, the HTTP response's
  ``usage.completion_tokens``).
* phase A, engine direct: ``Engine.from_args`` with the replica's settings (``max_num_seqs``
  = concurrency, ``max_model_len`` = longest prompt + longest output, ``max_num_batched_tokens``,
  the embedded default model), driven through its async ``generate`` API (the path the replica
  uses) in a closed loop with at most ``--concurrency`` (default 16) requests in flight. The
  engine is then shut down and freed, so the two phases never share the CPU.
* phase B, HTTP through Serve: ``ringserve serve --isolate netns`` as a subprocess (Ray inside a
  private network namespace, only the API port forwarded to 127.0.0.1) with ONE LLM replica and
  the same engine settings. After ``/health`` answers and a warm-up, the same workload goes to
  ``POST /v1/completions`` (token-id prompts, ``max_tokens`` = output length, ``temperature``
  0, ``ignore_eos``) from an httpx client at the same concurrency, at 127.0.0.1 only. The
  server is stopped at the end (SIGINT, then harder), also on errors.

Both phases get one warm-up (2 short requests) first. Reported per phase: wall time of the
workload and output tokens/s; then ratio = HTTP / direct, overhead = 1 - ratio, and whether
it is within ``--target`` (default 10%).

Fairness: phase A's engine is built from the same app settings as the server's replica
(``AppConfig.engine_args``: the serving quantization default ``auto``, or ``--app-arg
quantization=...``), with the torch threads the replica takes (``AppConfig.replica_threads``:
the cores the router does not need, 2 on a 2-core box with one replica); ``--threads N`` sets
``replica_torch_threads=N`` on the server and N in phase A. After phase B a probe connects
to the Ray cluster inside the namespace and asks the replica for ``torch.get_num_threads()``;
both counts are printed, with the CPU cores each phase used (from /proc) to show where the
time went: the LLM replica, the router, Serve's HTTP proxy, the loopback forwarder, the rest
of Ray, and the client. The machine's other load (another developer's work on a shared box)
is printed too.

Needs root on Linux (Ray must not listen beyond loopback: ``--isolate netns``). Prints;
asserts nothing; progress lines go to stderr. The default run takes about 2.5 minutes on 2
cores; ``--quick`` (16 short requests) well under a minute.

    python -m bench.serve_overhead_bench [--requests 64] [--concurrency 16] [--seed 0]
        [--prompt-len 16,256] [--output-len 32,128] [--max-num-batched-tokens 512]
        [--threads N] [--port 8431] [--stream] [--app-arg KEY=VALUE ...] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from app.serve_run import NETNS_PREFIX, TMP_PREFIX
from bench.throughput_bench import (
    PAD_ID,
    WARMUP_OUTPUT_LEN,
    WARMUP_PROMPT_LEN,
    WorkItem,
    _log,
    build_workload,
    int_pair,
    run_ours_async,
)
from cluster import replica_probe
from cluster.isolation.netns import NetNamespace, netns_supported
from cluster.isolation.process_group import die_with_parent
from cluster.isolation.procfs import cmdline, environ, read_stat
from cluster.isolation.ray_tmpdir import find_ray_tmpdir

DEFAULTS = {"requests": 64, "prompt_len": (16, 256), "output_len": (32, 128)}
QUICK = {"requests": 16, "prompt_len": (16, 64), "output_len": (16, 48)}
DEFAULT_PORT = 8431
# Server-side app args beyond the engine settings: none; the router's shedding defaults stay
# (a request that is shed counts as failed in the table). Add more with --app-arg KEY=VALUE.
SERVER_APP_ARGS: dict[str, str] = {}
STOP_WAIT_S = 90.0  # after SIGINT: ringserve drains Serve, kills Ray, deletes the namespace
HURRY_WAIT_S = 30.0  # after a second SIGINT (ringserve's "stop faster")
PROBE_TIMEOUT_S = 120.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """Something that stops the benchmark (server did not start, ...): one line."""


@dataclass
class PhaseResult:
    """One phase over the whole workload."""

    name: str
    wall_s: float
    output_tokens: int  # generated, as counted on that path
    torch_threads: str
    cpu_cores: dict[str, float] = field(default_factory=dict)  # who used how many cores
    machine_cores: float = 0.0  # all busy CPU on the box over the phase
    engine_thread_cores: float = 0.0  # the busiest thread of the engine's process
    failures: int = 0

    @property
    def output_tps(self) -> float:
        return self.output_tokens / self.wall_s


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


# CPU accounting (/proc) -------------------------------------------------------------------
def _machine_busy_ticks() -> int:
    """Busy jiffies of all CPUs since boot (user+nice+system+irq+softirq+steal)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields]
    return values[0] + values[1] + values[2] + sum(values[5:8])


def _proc_ticks(pid: int, tid: int | None = None) -> int | None:
    """utime + stime of a process (all its threads) or of one of its threads, in jiffies;
    None when it is gone."""
    stat = read_stat(pid, tid)
    return stat.cpu_ticks if stat is not None else None


def _role(cmdline: str) -> str:
    if "ServeReplica:" in cmdline and "LLMServer" in cmdline:
        return "LLM replica"
    if "ServeReplica:" in cmdline and "Router" in cmdline:
        return "router"
    if "ProxyActor" in cmdline:
        return "Serve HTTP proxy"
    return "rest of Ray"


class CpuMeter:
    """CPU time of named processes (and of the whole machine) between start() and stop(),
    and of the busiest thread of ``engine_pid`` (with 1 torch thread: the engine's step
    thread, which runs the model; the process's other threads are its asyncio/RPC side)."""

    def __init__(self, roles: dict[int, str], engine_pid: int) -> None:
        self.roles = roles
        self.engine_pid = engine_pid
        self._start: dict[int, int] = {}
        self._threads: dict[int, int] = {}
        self._machine = 0
        self._t0 = 0.0

    def _thread_ticks(self) -> dict[int, int]:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{self.engine_pid}/task")]
        except OSError:
            return {}
        return {tid: t for tid in tids if (t := _proc_ticks(self.engine_pid, tid)) is not None}

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._machine = _machine_busy_ticks()
        self._start = {pid: t for pid in self.roles if (t := _proc_ticks(pid)) is not None}
        self._threads = self._thread_ticks()

    def stop(self) -> tuple[dict[str, float], float, float]:
        """Cores used per role, by the whole machine, and by the engine's busiest thread."""
        elapsed = time.perf_counter() - self._t0
        machine = (_machine_busy_ticks() - self._machine) / CLK_TCK / elapsed
        cores: dict[str, float] = {}
        for pid, began in self._start.items():
            ended = _proc_ticks(pid)
            if ended is None:
                continue
            role = self.roles[pid]
            cores[role] = cores.get(role, 0.0) + (ended - began) / CLK_TCK / elapsed
        threads = self._thread_ticks()
        busiest = max((t - self._threads.get(tid, 0) for tid, t in threads.items()), default=0)
        return cores, machine, busiest / CLK_TCK / elapsed


# Phase A: the engine called directly --------------------------------------------------------
def server_app_args(args: argparse.Namespace) -> dict[str, str]:
    """The app arguments phase B's server gets (phase A's engine is built from the same)."""
    return {"num_replicas": "1", "max_num_seqs": str(args.concurrency),
            "max_model_len": str(args.max_model_len),
            "max_num_batched_tokens": str(args.max_num_batched_tokens),
            **({} if args.threads is None else {"replica_torch_threads": str(args.threads)}),
            **SERVER_APP_ARGS, **dict(args.app_arg)}


def _app_config(args: argparse.Namespace) -> Any:
    from app.config import AppConfig

    return AppConfig.model_validate(server_app_args(args))


def _engine_args(args: argparse.Namespace) -> Any:
    """The engine settings the server's LLM replica builds (quantization included: the
    serving default ``auto``, or ``--app-arg quantization=...``), without progress bars."""
    return dataclasses.replace(_app_config(args).engine_args(), progress=False)


async def phase_direct(args: argparse.Namespace, threads: int
                       ) -> tuple[PhaseResult, list[WorkItem], list[WorkItem]]:
    """Load the engine, build the workload from its vocabulary, run it; free the engine."""
    import torch

    from model.engine import Engine

    torch.set_num_threads(threads)
    _log(f"phase A: loading the engine (max_num_seqs {args.concurrency}, max_model_len "
         f"{args.max_model_len}, max_num_batched_tokens {args.max_num_batched_tokens}, "
         f"{torch.get_num_threads()} torch threads)")
    engine = Engine.from_args(_engine_args(args))
    if engine.cache.num_blocks < args.concurrency * engine.cache.table_len:
        raise BenchError(f"the KV pool's {engine.cache.num_blocks} blocks hold fewer than "
                         f"{args.concurrency} sequences of {args.max_model_len} tokens")
    excluded = engine.tokenizer.special_ids | engine.tokenizer.eos_token_ids | {PAD_ID}
    vocab = engine.config.vocab_size
    items = build_workload(args.requests, args.prompt_len, args.output_len, vocab, excluded,
                           args.seed)
    warm = build_workload(2, WARMUP_PROMPT_LEN, WARMUP_OUTPUT_LEN, vocab, excluded,
                          args.seed + 1)
    try:
        _log("phase A: warm-up (2 short requests)")
        await run_ours_async(engine, warm, 2, "warmup")
        meter = CpuMeter({os.getpid(): "engine (this process)"}, os.getpid())
        _log(f"phase A: {len(items)} requests at concurrency {args.concurrency} ...")
        meter.start()
        wall, counts = await run_ours_async(engine, items, args.concurrency, "direct")
        cores, machine, busiest = meter.stop()
    finally:
        await engine.shutdown()
    wrong = sum(1 for n, item in zip(counts, items, strict=True) if n != item.output_len)
    if wrong:
        _log(f"warning: phase A: {wrong} requests produced the wrong number of tokens")
    result = PhaseResult("engine direct", wall, sum(counts), str(torch.get_num_threads()),
                         cores, machine, busiest, wrong)
    _log(f"phase A: {wall:.1f} s, {result.output_tps:.1f} output tok/s")
    del engine
    gc.collect()
    return result, items, warm


# Phase B: HTTP through ringserve serve --------------------------------------------------------
class Server:
    """``ringserve serve`` in a private network namespace; ``stop()`` leaves nothing behind."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = f"http://127.0.0.1:{args.port}"

    def command(self) -> list[str]:
        app_args = server_app_args(self.args)
        beside = Path(sys.executable).parent / "ringserve"
        launcher = [str(beside)] if beside.exists() else [sys.executable, "-m", "app.cli"]
        return [*launcher, "serve", "--isolate", "netns", "--host", "127.0.0.1",
                "--port", str(self.args.port), "--start-timeout", str(self.args.start_timeout),
                *(f"{k}={v}" for k, v in app_args.items())]

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        command = self.command()
        _log("phase B: " + " ".join(command[1:]))
        # Its own session: a Ctrl-C here reaches only this process, which stops it in order.
        # Its stdout ("serving ... at ...") goes to our stderr with the other progress lines.
        # The server stops (SIGTERM, handled like Ctrl-C) should this process die.
        self.proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                     stdout=sys.stderr, start_new_session=True,
                                     preexec_fn=die_with_parent(os.getpid()))

    @property
    def namespace(self) -> NetNamespace | None:
        """The server's network namespace, while it exists."""
        prefix = os.environ.get("RINGSERVE_NETNS_PREFIX", NETNS_PREFIX)  # as ringserve serve
        return NetNamespace.find(prefix, self.proc.pid) if self.proc else None

    @property
    def netns(self) -> str | None:
        namespace = self.namespace
        return namespace.name if namespace is not None else None

    def ray_tmpdir(self) -> Path | None:
        return find_ray_tmpdir(TMP_PREFIX, self.proc.pid) if self.proc else None

    def netns_pids(self) -> list[int]:
        namespace = self.namespace
        return namespace.pids() if namespace is not None else []

    async def wait_healthy(self, client: Any) -> str:
        """Poll /health until a replica is up; the served model's name."""
        import httpx

        assert self.proc is not None
        deadline = time.monotonic() + self.args.start_timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"ringserve serve exited with status {self.proc.returncode} "
                                 "during start-up (see its lines above and its log)")
            try:
                response = await client.get("/health", timeout=5.0)
                last = f"/health answered {response.status_code}"
                if response.status_code == 200:
                    models = (await client.get("/v1/models", timeout=10.0)).json()
                    return str(models["data"][0]["id"])
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}"
            await asyncio.sleep(1.0)
        raise BenchError(f"the server was not healthy within {self.args.start_timeout:.0f} s "
                         f"({last})")

    def stop(self) -> None:
        """SIGINT (ringserve stops Serve and Ray, deletes the namespace), a second SIGINT to
        hurry, then SIGKILL and our own clean-up of whatever is left."""
        proc = self.proc
        if proc is None:
            return
        namespace = self.namespace
        tmp = self.ray_tmpdir()
        for wait_s in (STOP_WAIT_S, HURRY_WAIT_S):
            if proc.poll() is not None:
                break
            _log("phase B: stopping the server")
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                _log(f"warning: the server did not stop within {wait_s:.0f} s")
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if namespace is not None and namespace.exists():
            _log(f"warning: namespace {namespace.name} was left behind; deleting it and its "
                 "processes")
            namespace.delete()
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        left = self.netns
        _log(f"phase B: server stopped (status {proc.returncode}); namespace "
             f"{'still there: ' + left if left else 'gone'}")

    def probe_threads(self) -> list[dict[str, Any]] | str:
        """Ask each LLM replica for its torch thread count; an error text on failure."""
        name, tmp = self.netns, self.ray_tmpdir()
        if name is None or tmp is None:
            return "namespace or RAY_TMPDIR not found"
        ports = list((tmp / "ray" / "session_latest").glob("gcs_server_port_*"))
        if not ports:
            return "GCS port file not found"
        address = f"127.0.0.1:{ports[0].read_text().strip()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=str(tmp))
        env.update(_gcs_auth_env(self.netns_pids()))  # Ray's token auth, as the GCS has it
        try:
            done = subprocess.run(
                ["ip", "netns", "exec", name, sys.executable, "-m", "cluster.replica_probe",
                 address], env=env, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                check=False)
        except subprocess.TimeoutExpired:
            return f"probe timed out after {PROBE_TIMEOUT_S:.0f} s"
        found = replica_probe.parse(done.stdout)
        if found is not None:
            return list(found["replicas"])
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"probe failed (status {done.returncode}): {tail[:300]}"


def _gcs_auth_env(pids: Sequence[int]) -> dict[str, str]:
    """RAY_AUTH_* from the GCS process's environment: a driver must use the same mode."""
    for pid in pids:
        if not cmdline(pid).split(" ", 1)[0].endswith("gcs_server"):
            continue
        return {k: v for k, v in environ(pid).items() if k.startswith("RAY_AUTH")}
    return {}


async def _send(client: Any, model: str, item: WorkItem, stream: bool
                ) -> tuple[int | None, str | None]:
    """One completion; (completion_tokens, None) or (None, what went wrong)."""
    body: dict[str, Any] = {"model": model, "prompt": list(item.prompt_ids),
                            "max_tokens": item.output_len, "temperature": 0.0,
                            "ignore_eos": True}
    if not stream:
        response = await client.post("/v1/completions", json=body)
        if response.status_code != 200:
            return None, f"HTTP {response.status_code}: {response.text[:200]}"
        usage = response.json().get("usage") or {}
        return int(usage.get("completion_tokens", -1)), None
    body.update(stream=True, stream_options={"include_usage": True})
    tokens: int | None = None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return None, f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            usage = json.loads(line[len("data: "):]).get("usage")
            if usage:
                tokens = int(usage["completion_tokens"])
    return tokens, None if tokens is not None else "stream ended without usage"


async def run_http(client: Any, model: str, items: Sequence[WorkItem], concurrency: int,
                   stream: bool) -> tuple[float, list[int | None], list[str]]:
    """Closed loop over HTTP: a semaphore keeps C requests in flight (as run_ours_async)."""
    gate = asyncio.Semaphore(concurrency)
    errors: list[str] = []

    async def one(item: WorkItem) -> int | None:
        async with gate:
            tokens, error = await _send(client, model, item, stream)
            if error is not None:
                errors.append(error)
            return tokens

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(item) for item in items))
    return time.perf_counter() - started, list(counts), errors


async def phase_http(args: argparse.Namespace, server: Server, items: Sequence[WorkItem],
                     warm: Sequence[WorkItem]) -> PhaseResult:
    import httpx

    limits = httpx.Limits(max_connections=args.concurrency + 4,
                          max_keepalive_connections=args.concurrency + 4)
    timeout = httpx.Timeout(args.request_timeout, connect=10.0)
    async with httpx.AsyncClient(base_url=server.base, timeout=timeout, limits=limits,
                                 trust_env=False) as client:  # no proxy: loopback only
        model = await server.wait_healthy(client)
        _log(f"phase B: serving {model}; warm-up (2 short requests)")
        _, _, errors = await run_http(client, model, warm, 2, args.stream)
        if errors:
            raise BenchError(f"warm-up request failed: {errors[0]}")
        roles = {pid: _role(cmdline(pid)) for pid in server.netns_pids()}
        assert server.proc is not None
        roles[server.proc.pid] = "loopback forwarder"
        roles[os.getpid()] = "HTTP client (this process)"
        replica = next((pid for pid, role in roles.items() if role == "LLM replica"), -1)
        meter = CpuMeter(roles, replica)
        _log(f"phase B: {len(items)} requests at concurrency {args.concurrency} over HTTP"
             f"{' (streaming)' if args.stream else ''} ...")
        meter.start()
        wall, counts, errors = await run_http(client, model, items, args.concurrency,
                                              args.stream)
        cores, machine, busiest = meter.stop()
    for error in errors[:3]:
        _log(f"warning: phase B: a request failed: {error}")
    wrong = sum(1 for n, item in zip(counts, items, strict=True)
                if n is not None and n != item.output_len)
    if wrong:
        _log(f"warning: phase B: {wrong} responses report the wrong usage.completion_tokens")
    generated = sum(n for n in counts if n is not None)
    result = PhaseResult("HTTP through Serve", wall, generated, "?", cores, machine, busiest,
                         len(errors) + wrong)
    _log(f"phase B: {wall:.1f} s, {result.output_tps:.1f} output tok/s")
    return result


def _replica_threads(probe: list[dict[str, Any]] | str) -> str:
    if isinstance(probe, str) or not probe:
        return "unknown"
    return ",".join(str(p["torch_threads"]) for p in probe)


# Report -------------------------------------------------------------------------------------
def print_report(args: argparse.Namespace, items: Sequence[WorkItem], direct: PhaseResult,
                 http: PhaseResult, probe: list[dict[str, Any]] | str,
                 loads: tuple[str, str]) -> None:
    prompt_total = sum(len(i.prompt_ids) for i in items)
    output_total = sum(i.output_len for i in items)
    mode = "streaming" if args.stream else "non-streaming"
    print("serve overhead: the engine called directly vs. HTTP through the router and Ray "
          f"Serve (1 LLM replica), embedded default model, quantization "
          f"{_engine_args(args).quantization}, CPU")
    print(f"workload: {len(items)} requests, seed {args.seed}, prompt len {args.prompt_len[0]}.."
          f"{args.prompt_len[1]} ({prompt_total} tokens), output len {args.output_len[0]}.."
          f"{args.output_len[1]} ({output_total} tokens), greedy, ignore EOS, concurrency "
          f"{args.concurrency}; engine: max_num_seqs {args.concurrency}, max_model_len "
          f"{args.max_model_len}, max_num_batched_tokens {args.max_num_batched_tokens}; HTTP: "
          f"/v1/completions with token-id prompts, {mode}")
    print(f"machine: {os.cpu_count()} cpus; /proc/loadavg before: {loads[0]}; after: {loads[1]}")
    print("cores: CPU cores used over the timed phase (from /proc): 'ours' by this process "
          "(A) or by the server, forwarder and client (B); 'engine thread' by the busiest "
          "thread of the engine's process; 'others' by the rest of the machine")
    header = (f"{'phase':<20}{'wall s':>8}{'output tok/s':>14}{'torch threads':>15}"
              f"{'failed':>8}{'cores: ours':>13}{'engine thread':>15}{'others':>8}")
    print(header)
    print("-" * len(header))
    for result in (direct, http):
        ours = sum(result.cpu_cores.values())
        others = max(0.0, result.machine_cores - ours)
        print(f"{result.name:<20}{result.wall_s:>8.1f}{result.output_tps:>14.1f}"
              f"{result.torch_threads:>15}{result.failures:>8d}{ours:>13.2f}"
              f"{result.engine_thread_cores:>15.2f}{others:>8.2f}")
    ratio = http.output_tps / direct.output_tps
    overhead = 1.0 - ratio
    verdict = "meets" if overhead <= args.target else "does NOT meet"
    print(f"ratio HTTP/direct = {ratio:.3f}; overhead = 1 - ratio = {overhead * 100:.1f}% "
          f"({verdict} the <= {args.target * 100:g}% target)")
    print("phase B cores by process: " + ", ".join(
        f"{role} {cores:.2f}" for role, cores in sorted(http.cpu_cores.items(),
                                                       key=lambda kv: -kv[1])))
    if isinstance(probe, str) or not probe:
        print(f"LLM replica threads: probe failed: {probe or 'no LLM replica found'}")
    else:
        print("LLM replica (probed): " + "; ".join(
            f"pid {p['pid']}: torch.get_num_threads() = {p['torch_threads']}, OMP_NUM_THREADS = "
            f"{p['OMP_NUM_THREADS']}" for p in probe))
    if direct.torch_threads != http.torch_threads:
        print(f"warning: torch threads differ (direct {direct.torch_threads}, replica "
              f"{http.torch_threads}): not a like-for-like comparison")
    if direct.failures or http.failures:
        print("warning: some requests failed or produced the wrong token count; "
              "the ratio is not meaningful")


# Arguments and main -------------------------------------------------------------------------
def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"need KEY=VALUE, got {text!r}")
    return key, value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=None, help="default 64 (quick: 16)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-len", type=int_pair, default=None,
                        help="lo,hi inclusive, default 16,256 (quick: 16,64)")
    parser.add_argument("--output-len", type=int_pair, default=None,
                        help="lo,hi inclusive, default 32,128 (quick: 16,48)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512,
                        help="engine step token budget, both phases (the app's default 512)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads on both sides (replica_torch_threads for the "
                        "server); default: the replica's share of the cores "
                        "(AppConfig.replica_threads)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"API port on 127.0.0.1 (default {DEFAULT_PORT})")
    parser.add_argument("--stream", action="store_true", help="SSE streaming responses")
    parser.add_argument("--app-arg", type=_key_value, action="append", default=[],
                        metavar="KEY=VALUE", help="extra ringserve serve app arg, repeatable")
    parser.add_argument("--start-timeout", type=float, default=300.0,
                        help="seconds to wait for /health (default 300)")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds one HTTP request may take (default 600)")
    parser.add_argument("--target", type=float, default=0.10,
                        help="largest acceptable overhead (default 0.10)")
    parser.add_argument("--quick", action="store_true", help="small smoke workload")
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be positive")
    args.max_model_len = max(args.prompt_len[1] + args.output_len[1],
                             WARMUP_PROMPT_LEN[1] + WARMUP_OUTPUT_LEN[1])
    return args


def replica_thread_count(args: argparse.Namespace) -> int:
    """Torch threads the LLM replica will run with (see the module docstring): ``--threads``
    reaches it as ``replica_torch_threads`` (:func:`server_app_args`)."""
    from app.config import available_cpus

    return int(_app_config(args).replica_threads(available_cpus()))


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not netns_supported():
        print("serve_overhead_bench: needs root on Linux with iproute2: Ray must run in a "
              "private network namespace (ringserve serve --isolate netns)", file=sys.stderr)
        return 2
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # run the finally blocks, stop the server
    threads = replica_thread_count(args)
    load_before = _loadavg()
    _log(f"load before: {load_before}; torch threads on both sides: {threads}")
    try:
        direct, items, warm = asyncio.run(phase_direct(args, threads))
        server = Server(args)
        try:
            server.start()
            http = asyncio.run(phase_http(args, server, items, warm))
            _log("phase B: probing the LLM replica's torch threads")
            probe = server.probe_threads()
        finally:
            server.stop()
    except BenchError as exc:
        _log(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        _log("interrupted (the server, if started, has been stopped)")
        return 130
    http.torch_threads = _replica_threads(probe)
    load_after = _loadavg()
    _log(f"load after: {load_after}")
    print_report(args, items, direct, http, probe, (load_before, load_after))
    return 0


if __name__ == "__main__":
    sys.exit(main())
