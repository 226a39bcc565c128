"""The engine's measured drain rate vs what it drains per wall-clock second (issue 14, overload).

The router predicts a request's queue wait as queued work over the replica's drain rate. The
engine measures that rate over the seconds its steps took (``EngineStats.tokens_per_s``);
between steps (the asyncio loop forwarding chunks, GIL hand-offs, another job on the core) it
drains nothing, so on a busy machine the figure runs ahead of the truth and waits are
under-predicted. This runs the embedded model in-process under a closed loop of ``--clients``
streaming requests (``--slots`` sequences at once, ``--max-tokens`` each) and prints, over
``--seconds``: the engine's own rate (mean of 1 s polls), the wall-clock drain (prompt +
generated token totals over elapsed time) and their ratio, the share LLMServer now scales
its reported rates by (app/llm_server.py). Prints; asserts nothing.

    python -m bench.drain_rate_bench [--seconds 15] [--clients 8] [--slots 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid


async def measure(seconds: float, clients: int, slots: int, threads: int, max_tokens: int
                  ) -> tuple[float, float]:
    from model.engine import Engine
    from model.engine_args import EngineArgs
    from model.requests import GenerationRequest, SamplingParams

    engine = Engine.from_args(EngineArgs(max_num_seqs=slots, max_model_len=512,
                                         torch_threads=threads, progress=False))
    engine.warm_up()
    ids = tuple(engine.tokenizer.encode("The capital of France is"))
    engine.start()
    stop = time.monotonic() + seconds + 3

    async def client() -> None:
        while time.monotonic() < stop:
            request = GenerationRequest(uuid.uuid4().hex, ids, SamplingParams(
                max_tokens=max_tokens, ignore_eos=True))
            async for _ in engine.generate(request):
                pass

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    await asyncio.sleep(3)  # warm: every slot busy
    first, began = engine.stats(), time.monotonic()
    polled: list[float] = []
    while time.monotonic() < stop - 0.5:
        await asyncio.sleep(1)
        polled.append(engine.stats().tokens_per_s)
    last, ended = engine.stats(), time.monotonic()
    await asyncio.gather(*tasks)
    await engine.shutdown()
    drained = (last.prompt_tokens_total + last.generated_tokens_total
               - first.prompt_tokens_total - first.generated_tokens_total)
    return sum(polled) / len(polled), drained / (ended - began)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args()
    engine_rate, wall_rate = asyncio.run(measure(args.seconds, args.clients, args.slots,
                                                 args.threads, args.max_tokens))
    print(f"engine step-time rate {engine_rate:.1f} tok/s, wall-clock drain {wall_rate:.1f} "
          f"tok/s: share {wall_rate / engine_rate:.2f} (load average "
          f"{os.getloadavg()[0]:.2f}, {args.clients} clients, {args.slots} slots, "
          f"{args.threads} thread(s))")


if __name__ == "__main__":
    main()
