"""Where a streamed token's time goes between the engine's step and the SSE bytes (issue #13).

One request at a time (concurrency 1), greedy, ``ignore_eos``, ``--tokens`` output tokens from
a ``--prompt-len`` token prompt (random token ids, seeded), streamed. The same request goes
through each layer of the serving path, and each layer's time per output token is measured
from its own consumer's point of view: (last token's arrival - first token's arrival) /
(tokens - 1), so prefill and TTFT stay out of it. Layers, innermost first:

* ``engine``: ``Engine.generate`` in this process (the engine thread + its asyncio queue).
* ``replica``: :class:`app.llm_server.LLMServer` ``generate_batch`` over that same engine
  (the replica's pump task and event queue, no Ray).
* ``router``: the real Router app (FastAPI, dispatcher, SSE rendering) over that in-process
  LLMServer, served by uvicorn on 127.0.0.1 in a thread of this process; the HTTP client is a
  separate process (as a real client is), so it takes no GIL from the engine.
* ``serve``: ``ringserve serve --isolate netns`` (Ray Serve: proxy, router replica, LLM
  replica with its own engine; root only) with the same settings, the same client process.

Rounds are interleaved (every round sends one request through every layer in turn), so a
neighbour's load on a shared box falls on all layers alike; the median over rounds is
reported with each layer's ratio to ``engine`` and its extra milliseconds per token. Both
engines (this process's and the replica's) use the same torch threads (the replica default:
:meth:`app.config.AppConfig.replica_threads`, ``--threads`` to set) and stay idle while the
other one works. The in-process engine's own step time (its ``recent_steps``) is printed per
layer too: a step that grows beside the HTTP work is CPU or GIL contention, a per-token time
above the step time is the path losing time between steps. And per layer the path's CPU time
per token (from /proc, the engine's ``threads`` busiest threads left out), for the serve
layer per Serve process and above its idle rate (measured for ``IDLE_S`` before the rounds):
on a shared box the times swing with the neighbours' load, the CPU per token much less.
Start it with ``setsid`` on a shared box: the server runs in its own session (a scheduler
autogroup of its own), and the in-process layers should compete on the same terms.
Prints; asserts nothing.

    python -m bench.stream_overhead_bench [--tokens 64] [--prompt-len 32] [--rounds 6]
        [--layers engine,replica,router,serve] [--threads N] [--port 8441] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

LAYERS = ("engine", "replica", "router", "serve")
CLIENT_TIMEOUT_S = 300.0
IDLE_S = 5.0  # the Serve processes' idle CPU is measured this long before the rounds


@dataclass
class LayerTimes:
    """Per-round figures of one layer."""

    per_token_ms: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)  # this process's engine, when it ran
    chunks: list[int] = field(default_factory=list)  # stream events the consumer saw
    wrong: int = 0  # rounds whose token count was not --tokens
    tokens: int = 0  # generated over the counted rounds
    cpu_s: dict[str, float] = field(default_factory=dict)  # path CPU seconds per process role
    wall_s: float = 0.0  # the counted rounds' wall time


CLK_TCK = os.sysconf("SC_CLK_TCK")


def thread_ticks(pids: Sequence[int]) -> dict[tuple[int, int], int]:
    """utime + stime (jiffies) of every thread of ``pids``."""
    from cluster.isolation.procfs import read_stat

    out: dict[tuple[int, int], int] = {}
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            stat = read_stat(pid, tid)
            if stat is not None:
                out[(pid, tid)] = stat.cpu_ticks
    return out


def path_cpu_s(before: dict[tuple[int, int], int], after: dict[tuple[int, int], int],
               roles: dict[int, str], engine_pid: int, engine_threads: int) -> dict[str, float]:
    """CPU seconds per role between two snapshots, leaving out the engine's own work: the
    ``engine_threads`` busiest threads of ``engine_pid`` (its step thread and OpenMP workers)."""
    deltas: dict[int, list[int]] = {}
    for key, ticks in after.items():
        deltas.setdefault(key[0], []).append(ticks - before.get(key, 0))
    out: dict[str, float] = {}
    for pid, per_thread in deltas.items():
        if pid == engine_pid:
            per_thread = sorted(per_thread)[:-engine_threads] if engine_threads else per_thread
        role = roles.get(pid, "other")
        out[role] = out.get(role, 0.0) + sum(per_thread) / CLK_TCK
    return out


def _log(message: str) -> None:
    print(f"[stream_overhead_bench] {message}", file=sys.stderr, flush=True)


def per_token_ms(arrivals: Sequence[tuple[float, int]]) -> tuple[float, int]:
    """(ms per token after the first, tokens) from (arrival time, tokens in it) pairs."""
    with_tokens = [(t, n) for t, n in arrivals if n > 0]
    total = sum(n for _, n in with_tokens)
    if len(with_tokens) < 2 or total < 2:
        return float("nan"), total
    first_t, first_n = with_tokens[0]
    return (with_tokens[-1][0] - first_t) * 1e3 / (total - first_n), total


# The HTTP client: a separate process ----------------------------------------------------------
def client_main(url: str, body: str) -> int:
    """Stream one completion; print {"arrivals": [[time, text length], ...], "usage": ...}
    (an SSE event does not say how many tokens it holds: the usage chunk gives the total)."""
    import httpx

    arrivals: list[list[float]] = []
    usage: dict[str, Any] | None = None
    with httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT_S, trust_env=False) as client:
        with client.stream("POST", "/v1/completions", content=body,
                           headers={"Content-Type": "application/json"}) as response:
            if response.status_code != 200:
                print(json.dumps({"error": f"HTTP {response.status_code}"}))
                return 1
            for line in response.iter_lines():
                now = time.perf_counter()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices", []):
                    arrivals.append([now, len(choice.get("text", ""))])
    print(json.dumps({"arrivals": arrivals, "usage": usage}))
    return 0


def http_round(url: str, model: str, prompt: Sequence[int], tokens: int
               ) -> tuple[float, int, int]:
    """(ms per token, completion tokens, SSE events) of one streamed request over HTTP."""
    body = json.dumps({"model": model, "prompt": list(prompt), "max_tokens": tokens,
                       "temperature": 0.0, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}})
    done = subprocess.run([sys.executable, "-m", "bench.stream_overhead_bench", "--client", url,
                           "--body", body], capture_output=True, text=True,
                          timeout=CLIENT_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"client failed: {done.stdout.strip()} {done.stderr.strip()[-300:]}")
    answer = json.loads(done.stdout)
    total = int(answer["usage"]["completion_tokens"])
    events = [(t, n) for t, n in answer["arrivals"] if n > 0]
    if len(events) < 2:
        return float("nan"), total, len(events)
    # The first event carries the first token (prefill's); the rest carry total - 1 tokens
    # (several per event when the path coalesced them), whatever their text lengths.
    return (events[-1][0] - events[0][0]) * 1e3 / (total - 1), total, len(events)


# In-process layers ------------------------------------------------------------------------
def _request(tag: str, prompt: Sequence[int], tokens: int) -> Any:
    from model.requests import GenerationRequest
    from model.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    return GenerationRequest(f"{tag}-{time.monotonic_ns()}", tuple(prompt), params)


async def engine_round(engine: Any, prompt: Sequence[int], tokens: int
                       ) -> tuple[float, int, int]:
    arrivals = []
    async for chunk in engine.generate(_request("engine", prompt, tokens)):
        arrivals.append((time.perf_counter(), len(chunk.token_ids)))
    ms, total = per_token_ms(arrivals)
    return ms, total, len(arrivals)


async def replica_round(server: Any, prompt: Sequence[int], tokens: int
                        ) -> tuple[float, int, int]:
    from app.llm_server import BatchItem
    from model.requests import GenerationChunk

    arrivals = []
    async for events in server.generate_batch([BatchItem(_request("replica", prompt, tokens))]):
        now = time.perf_counter()
        n = sum(len(e.token_ids) for e in events if isinstance(e, GenerationChunk))
        if n:
            arrivals.append((now, n))
    ms, total = per_token_ms(arrivals)
    return ms, total, len(arrivals)


def median_step_ms(engine: Any, since: int) -> float:
    """Median seconds of this engine's decode steps (batch 1, 1 token) after step ``since``."""
    steps = [s.seconds * 1e3 for s in engine.stats().recent_steps
             if s.index > since and s.batch_size == 1 and s.tokens == 1]
    return statistics.median(steps) if steps else float("nan")


def last_step(engine: Any) -> int:
    steps = engine.stats().recent_steps
    return steps[-1].index if steps else 0


# Main -------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--layers", default=",".join(LAYERS),
                        help=f"comma-separated subset of {','.join(LAYERS)}")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of both engines (default: the replica default)")
    parser.add_argument("--port", type=int, default=8441,
                        help="router layer's port; serve uses --port + 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--app-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra app arg for both the in-process router and ringserve serve")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # internal: the client process
    parser.add_argument("--body", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.layers = [x for x in args.layers.split(",") if x]
    unknown = set(args.layers) - set(LAYERS)
    if unknown:
        parser.error(f"unknown layers: {','.join(sorted(unknown))}")
    return args


def _app_args(args: argparse.Namespace) -> dict[str, str]:
    out = {"max_model_len": str(max(256, args.prompt_len + args.tokens + 16)),
           "max_num_seqs": "4", "kv_cache_memory": str(128 * 1024**2)}
    for item in args.app_arg:
        key, _, value = item.partition("=")
        out[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    from app.config import AppConfig, available_cpus
    from app.llm_server import LLMServer
    from app.main import build_engine
    from bench.http_int8_bench import InProcessClient

    app_args = _app_args(args)
    config = AppConfig.model_validate(app_args)
    threads = args.threads or config.replica_threads(available_cpus())
    config = config.model_copy(update={"replica_torch_threads": threads})
    app_args["replica_torch_threads"] = str(threads)
    _log(f"load before: {os.getloadavg()}; torch threads {threads}; layers {args.layers}")
    engine: Any = build_engine(config.engine_args(), config)  # model.engine.Engine
    vocab = engine.config.vocab_size
    excluded = engine.tokenizer.special_ids | engine.tokenizer.eos_token_ids
    rng = random.Random(args.seed)
    prompt = [t for t in (rng.randrange(vocab) for _ in range(args.prompt_len * 2))
              if t not in excluded][: args.prompt_len]
    times = {layer: LayerTimes() for layer in args.layers}
    urls: dict[str, str] = {}
    model = engine.model_name
    # One event loop, in its own thread, for everything in this process (the engine's thread
    # delivers to the loop it started on): the engine and replica rounds, and the router's
    # uvicorn server, as in a replica whose asyncio side is one loop.
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def on_loop(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    server_llm = LLMServer(lambda: engine, replica_id="r0")
    uvicorn_server = None
    serve = None
    try:
        if "router" in args.layers:
            import uvicorn

            from app.router import Router

            router = Router(InProcessClient(server_llm), config)
            uvicorn_server = uvicorn.Server(uvicorn.Config(
                router.http_app, host="127.0.0.1", port=args.port, log_level="warning"))
            asyncio.run_coroutine_threadsafe(uvicorn_server.serve(), loop)
            while not uvicorn_server.started:
                time.sleep(0.05)
            urls["router"] = f"http://127.0.0.1:{args.port}"
        roles = {os.getpid(): "this process"}
        replica_pid = os.getpid()
        if "serve" in args.layers:
            from bench.serve_overhead_bench import _role
            from cluster.isolation.procfs import cmdline

            serve = start_serve(args, app_args)
            urls["serve"] = serve.base
            serve_roles = {pid: _role(cmdline(pid)) for pid in serve.netns_pids()}
            assert serve.proc is not None
            serve_roles[serve.proc.pid] = "loopback forwarder"
            replica_pid = next((p for p, r in serve_roles.items() if r == "LLM replica"), -1)
            roles.update(serve_roles)
        idle_cores: dict[str, float] = {}
        if serve is not None:  # Ray's daemons and the router's load polls run when idle too
            ticks_before = thread_ticks(list(roles))
            time.sleep(IDLE_S)
            idle_cores = {role: seconds / IDLE_S for role, seconds in path_cpu_s(
                ticks_before, thread_ticks(list(roles)), roles, replica_pid, threads).items()}
        rounds = args.rounds + 1  # round 0 warms every layer up and is not counted
        for index in range(rounds):
            for layer in args.layers:
                since = last_step(engine)
                engine_pid = replica_pid if layer == "serve" else os.getpid()
                watched = list(roles) if layer == "serve" else [os.getpid()]
                ticks_before = thread_ticks(watched)
                started = time.perf_counter()
                if layer == "engine":
                    ms, total, chunks = on_loop(engine_round(engine, prompt, args.tokens))
                elif layer == "replica":
                    ms, total, chunks = on_loop(replica_round(server_llm, prompt, args.tokens))
                else:
                    ms, total, chunks = http_round(urls[layer], model, prompt, args.tokens)
                cpu = path_cpu_s(ticks_before, thread_ticks(watched), roles, engine_pid,
                                 threads)
                step = median_step_ms(engine, since) if layer != "serve" else float("nan")
                if index == 0:
                    continue
                figures = times[layer]
                figures.tokens += total
                figures.wall_s += time.perf_counter() - started
                for role, seconds in cpu.items():
                    figures.cpu_s[role] = figures.cpu_s.get(role, 0.0) + seconds
                figures.per_token_ms.append(ms)
                figures.step_ms.append(step)
                figures.chunks.append(chunks)
                figures.wrong += total != args.tokens
            if index:
                _log(f"round {index}/{args.rounds}: " + ", ".join(
                    f"{layer} {times[layer].per_token_ms[-1]:.1f} ms/token"
                    for layer in args.layers))
    finally:
        if uvicorn_server is not None:
            uvicorn_server.should_exit = True
        if serve is not None:
            serve.stop()
        on_loop(engine.shutdown())
        loop.call_soon_threadsafe(loop.stop)
    report(args, times, threads, idle_cores)
    return 0


def start_serve(args: argparse.Namespace, app_args: dict[str, str]) -> Any:
    """``ringserve serve`` in a network namespace, healthy (the serve_overhead_bench Server)."""
    import httpx

    from bench.serve_overhead_bench import Server
    from cluster.isolation.netns import netns_supported

    if not netns_supported():
        raise SystemExit("the serve layer needs root on Linux (Ray runs in a private network "
                         "namespace); run with --layers engine,replica,router")
    server_args = argparse.Namespace(
        port=args.port + 1, start_timeout=300.0, concurrency=int(app_args["max_num_seqs"]),
        max_model_len=int(app_args["max_model_len"]), max_num_batched_tokens=512,
        threads=None,  # replica_torch_threads travels in app_arg
        app_arg=[(k, v) for k, v in app_args.items()
                 if k not in ("max_num_seqs", "max_model_len")])
    server = Server(server_args)
    server.start()

    async def healthy() -> None:
        async with httpx.AsyncClient(base_url=server.base, trust_env=False) as client:
            await server.wait_healthy(client)

    try:
        asyncio.run(healthy())
    except BaseException:
        server.stop()
        raise
    return server


def report(args: argparse.Namespace, times: dict[str, LayerTimes], threads: int,
           idle_cores: dict[str, float]) -> None:
    print(f"stream overhead: concurrency 1, {args.tokens} output tokens, {args.prompt_len}-token "
          f"prompt, greedy, ignore_eos, streamed; {args.rounds} interleaved rounds (medians); "
          f"{threads} torch threads; {os.cpu_count()} cpus; load average after "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    header = (f"{'layer':<10}{'ms/token':>10}{'tok/s':>8}{'x engine':>10}{'+ms/token':>11}"
              f"{'engine step ms':>16}{'events':>8}{'wrong':>7}{'path CPU ms/token':>19}")
    print(header)
    print("-" * len(header))
    base = times.get("engine")
    base_ms = statistics.median(base.per_token_ms) if base else float("nan")
    for layer, figures in times.items():
        ms = statistics.median(figures.per_token_ms)
        steps = [s for s in figures.step_ms if s == s]
        step = f"{statistics.median(steps):.1f}" if steps else "-"
        print(f"{layer:<10}{ms:>10.1f}{1e3 / ms:>8.1f}{ms / base_ms:>10.2f}{ms - base_ms:>11.1f}"
              f"{step:>16}{statistics.median(figures.chunks):>8.0f}{figures.wrong:>7d}"
              f"{sum(figures.cpu_s.values()) * 1e3 / max(1, figures.tokens):>19.2f}")
    print("ms/token: (last token - first token) / (tokens - 1) as the layer's consumer saw "
          "it; engine step ms: median batch-1 decode step of this process's engine while the "
          "layer ran (the serve layer's engine is in its replica: -); events: stream events "
          "(SSE chunks) per request; path CPU: CPU time of the serving path per token, from "
          "/proc, leaving out the engine's threads (its torch-threads busiest ones): this "
          "process (engine, replica, router layers) or every Serve process (serve layer)")
    serve = times.get("serve")
    if serve is not None and serve.tokens:
        per_token = {role: seconds * 1e3 / serve.tokens for role, seconds in serve.cpu_s.items()}
        above = {role: (seconds - idle_cores.get(role, 0.0) * serve.wall_s) * 1e3 / serve.tokens
                 for role, seconds in serve.cpu_s.items()}
        print("serve path CPU ms/token by process (all / above its idle rate): " + ", ".join(
            f"{role} {per_token[role]:.2f} / {above[role]:.2f}"
            for role in sorted(per_token, key=lambda r: -per_token[r])))
        print(f"serve path CPU above idle: {sum(above.values()):.2f} ms/token; idle (measured "
              f"for {IDLE_S:g} s before the rounds): " + ", ".join(
                  f"{role} {cores:.3f} cores" for role, cores in sorted(idle_cores.items())))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client:
        return client_main(args.client, args.body)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
