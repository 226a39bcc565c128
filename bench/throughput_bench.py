"""Offline throughput on the embedded default model: ringserve vs transformers ``generate``.

Workload: ``--requests`` requests (default 64) built from a seeded RNG (``--seed``): prompt
lengths uniform in ``--prompt-len`` (default 16..512), output lengths uniform in
``--output-len`` (default 16..256). Prompts are random token ids from the vocabulary (special
ids left out); every request is greedy and ignores EOS, so both engines produce exactly the
requested number of tokens.

For each concurrency C in ``--concurrency`` (default 1,8,32), side by side in this process:

* ringserve: closed loop with at most C requests in flight; when one finishes the next one
  starts (continuous batching). ``--api async`` (default) goes through ``Engine.generate``, the
  path the server uses; ``--api sync`` drives ``add``/``step`` directly.
* transformers: static batches of C requests in order, left-padded with an attention mask,
  ``generate(do_sample=False, max_new_tokens=min_new_tokens=longest output in the batch)``.
  A static batch generates for as long as its longest request; only each request's own
  requested tokens count as output (useful tokens/s), the rest is padding work.

Reports per concurrency and engine: wall time, prompt tokens/s and useful output tokens/s
(both over the whole wall time), and the ratio ringserve/transformers of output tokens/s
(= the ratio of wall times, as the workload is the same). fp32 on CPU. Prints; asserts nothing.
Progress goes to stderr, one line per phase. The full default run is long on a small CPU
(transformers at batch 1 alone is ~10 minutes on 2 cores); ``--quick`` runs a smoke workload.

    python -m bench.throughput_bench [--requests 64] [--concurrency 1,8,32] [--seed 0]
                                     [--prompt-len 16,512] [--output-len 16,256]
                                     [--api async|sync] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import random
import re
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from model.engine import Engine
    from model.requests import GenerationRequest

PAD_ID = 0  # transformers batches are left-padded with this id; the mask hides it
QUICK = {"requests": 8, "prompt_len": (16, 128), "output_len": (8, 32), "concurrency": (1, 4)}
WARMUP_PROMPT_LEN, WARMUP_OUTPUT_LEN = (16, 32), (4, 4)  # two such requests warm both engines
GOALS = {1: 2.0, 32: 4.0}  # ringserve/transformers throughput the issue asks for


class Generates(Protocol):
    """What the benchmark needs of a transformers causal LM."""

    def generate(self, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class WorkItem:
    """One request of the workload: its prompt and how many tokens it must produce."""

    prompt_ids: tuple[int, ...]
    output_len: int


@dataclass(frozen=True)
class PhaseResult:
    """One engine at one concurrency over the whole workload."""

    engine: str
    concurrency: int
    wall_s: float
    prompt_tokens: int
    output_tokens: int  # useful: what the requests asked for
    generated_tokens: int  # what the engine computed (static batches pad to the longest)

    @property
    def output_tps(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.wall_s


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load avg {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cpus"


def build_workload(num_requests: int, prompt_len: tuple[int, int], output_len: tuple[int, int],
                   vocab_size: int, excluded_ids: frozenset[int], seed: int) -> list[WorkItem]:
    """Seeded random prompts (token ids, specials left out) and output lengths."""
    rng = random.Random(seed)
    allowed = [i for i in range(vocab_size) if i not in excluded_ids]
    items = []
    for _ in range(num_requests):
        length = rng.randint(*prompt_len)
        prompt = tuple(rng.choice(allowed) for _ in range(length))
        items.append(WorkItem(prompt, rng.randint(*output_len)))
    return items


def _requests(items: Sequence[WorkItem], tag: str) -> list[GenerationRequest]:
    from model.requests import GenerationRequest
    from model.sampling_params import SamplingParams

    return [GenerationRequest(f"{tag}-{i}", item.prompt_ids,
                              SamplingParams(max_tokens=item.output_len, temperature=0.0,
                                             ignore_eos=True))
            for i, item in enumerate(items)]


async def run_ours_async(engine: Engine, items: Sequence[WorkItem], concurrency: int,
                         tag: str) -> tuple[float, list[int]]:
    """Closed loop over ``Engine.generate``: a semaphore keeps C requests in flight."""
    gate = asyncio.Semaphore(concurrency)  # wakes waiters FIFO: requests start in order

    async def one(request: GenerationRequest) -> int:
        async with gate:
            count = 0
            async for chunk in engine.generate(request):
                count += len(chunk.token_ids)
            return count

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(r) for r in _requests(items, tag)))
    return time.perf_counter() - started, list(counts)


def run_ours_sync(engine: Engine, items: Sequence[WorkItem], concurrency: int,
                  tag: str) -> tuple[float, list[int]]:
    """Closed loop over ``add``/``step``: a finished request's place goes to the next one."""
    from model.engine import RequestFailure

    waiting = deque(enumerate(_requests(items, tag)))
    index_of: dict[str, int] = {}
    counts = [0] * len(items)
    started = time.perf_counter()

    def refill() -> None:
        while waiting and len(index_of) < concurrency:
            index, request = waiting.popleft()
            index_of[request.request_id] = index
            engine.add(request)

    refill()
    while engine.has_work:
        for output in engine.step():
            if isinstance(output, RequestFailure):  # only deadlines fail; these have none
                raise RuntimeError(f"request {output.request_id} failed") from output.error
            counts[index_of[output.request_id]] += len(output.token_ids)
            if output.finish_reason is not None:
                del index_of[output.request_id]
        refill()
    return time.perf_counter() - started, counts


def run_transformers(hf_model: Generates, items: Sequence[WorkItem], batch_size: int
                     ) -> tuple[float, int]:
    """Static, left-padded batches in order; returns wall time and tokens generated."""
    generated = 0
    started = time.perf_counter()
    for lo in range(0, len(items), batch_size):
        batch = items[lo:lo + batch_size]
        width = max(len(item.prompt_ids) for item in batch)
        new_tokens = max(item.output_len for item in batch)
        input_ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, T]
        for row, item in enumerate(batch):
            input_ids[row, width - len(item.prompt_ids):] = torch.tensor(item.prompt_ids)
            mask[row, width - len(item.prompt_ids):] = 1
        with torch.inference_mode():
            out = hf_model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                    max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                    eos_token_id=None, pad_token_id=PAD_ID)
        assert isinstance(out, torch.Tensor)  # [B, T + new]; no return_dict_in_generate
        produced = out.shape[1] - width
        if produced != new_tokens:
            _log(f"warning: transformers produced {produced} tokens, asked {new_tokens}")
        generated += produced * len(batch)
    return time.perf_counter() - started, generated


def _print_report(results: list[PhaseResult], items: Sequence[WorkItem], args: argparse.Namespace,
                  load_before: str, load_after: str) -> None:
    prompt_total = sum(len(i.prompt_ids) for i in items)
    output_total = sum(i.output_len for i in items)
    print(f"throughput, embedded default model, fp32 CPU, {torch.get_num_threads()} threads, "
          f"ringserve via the {args.api} API")
    print(f"workload: {len(items)} requests, seed {args.seed}, prompt len "
          f"{args.prompt_len[0]}..{args.prompt_len[1]} ({prompt_total} tokens), output len "
          f"{args.output_len[0]}..{args.output_len[1]} ({output_total} tokens), greedy, "
          "ignore EOS")
    print("output tok/s counts each request's requested tokens only (useful tokens); "
          "'computed' is what the engine generated, static batches pad to their longest")
    print(f"machine: before {load_before}; after {load_after}")
    header = (f"{'conc':>5}  {'engine':<13}{'wall s':>9}{'prompt tok/s':>14}"
              f"{'output tok/s':>14}{'computed':>10}{'ratio':>8}{'goal':>7}")
    print(header)
    print("-" * len(header))
    by_key = {(r.engine, r.concurrency): r for r in results}
    for concurrency in args.concurrency:
        ours = by_key[("ringserve", concurrency)]
        theirs = by_key[("transformers", concurrency)]
        ratio = ours.output_tps / theirs.output_tps
        goal = GOALS.get(concurrency)
        for result in (ours, theirs):
            is_ours = result is ours
            ratio_cell = f"{ratio:.2f}x" if is_ours else ""
            goal_cell = f">={goal:g}x" if is_ours and goal is not None else ""
            print(f"{concurrency:>5}  {result.engine:<13}{result.wall_s:>9.1f}"
                  f"{result.prompt_tps:>14.1f}{result.output_tps:>14.1f}"
                  f"{result.generated_tokens:>10d}{ratio_cell:>8}{goal_cell:>7}")


def int_pair(text: str) -> tuple[int, int]:
    lo, hi = (int(v) for v in text.split(","))
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"need 1 <= lo <= hi, got {text!r}")
    return lo, hi


def _int_list(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(","))
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need positive integers, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=None, help="default 64 (quick: 8)")
    parser.add_argument("--concurrency", type=_int_list, default=None,
                        help="comma-separated, default 1,8,32 (quick: 1,4)")
    parser.add_argument("--prompt-len", type=int_pair, default=None,
                        help="lo,hi inclusive, default 16,512 (quick: 16,128)")
    parser.add_argument("--output-len", type=int_pair, default=None,
                        help="lo,hi inclusive, default 16,256 (quick: 8,32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api", choices=("async", "sync"), default="async")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="small smoke workload")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else {"requests": 64, "prompt_len": (16, 512),
                                         "output_len": (16, 256), "concurrency": (1, 8, 32)}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


async def _bench(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from model.default_model import default_model_path
    from model.engine import Engine
    from model.engine_args import EngineArgs
    from model.omp_threads import release_omp_threads

    max_len = max(args.prompt_len[1] + args.output_len[1],
                  WARMUP_PROMPT_LEN[1] + WARMUP_OUTPUT_LEN[1])
    max_seqs = max(args.concurrency)
    _log(f"loading ringserve engine (max_model_len {max_len}, max_num_seqs {max_seqs})")
    engine = Engine.from_args(EngineArgs(max_model_len=max_len, max_num_seqs=max_seqs,
                                         progress=False))
    if engine.cache.num_blocks < max_seqs * engine.cache.table_len:
        raise SystemExit(f"the KV pool's {engine.cache.num_blocks} blocks hold fewer than "
                         f"{max_seqs} sequences of {max_len} tokens")
    _log("loading transformers model (de-quantizing the GGUF)")
    hf_logging.disable_progress_bar()  # progress here is one line per phase
    path = default_model_path()
    # The GGUF de-quantizing bar ignores that switch: catch stderr, replay all but the bar.
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            hf_model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    finally:
        for line in re.split(r"[\r\n]+", captured.getvalue()):
            if line.strip() and "GGUF tensors" not in line:
                print(line, file=sys.stderr)
    excluded = engine.tokenizer.special_ids | engine.tokenizer.eos_token_ids | {PAD_ID}
    items = build_workload(args.requests, args.prompt_len, args.output_len,
                           engine.config.vocab_size, excluded, args.seed)

    async def ours(batch: Sequence[WorkItem], concurrency: int, tag: str
                   ) -> tuple[float, list[int]]:
        if args.api == "async":
            # transformers ran on this thread: free its OpenMP team, or the engine thread's
            # team runs throttled beside it (model/omp_threads.py); the engine thread frees
            # its own when idle, so transformers' phases are not slowed either
            release_omp_threads()
            return await run_ours_async(engine, batch, concurrency, tag)
        return run_ours_sync(engine, batch, concurrency, tag)

    _log("warm-up (both engines, 2 short requests)")
    warm = build_workload(2, WARMUP_PROMPT_LEN, WARMUP_OUTPUT_LEN, engine.config.vocab_size,
                          excluded, args.seed + 1)
    await ours(warm, 2, "warmup")
    run_transformers(hf_model, warm, 2)

    load_before = _load_note()
    _log(f"workload: {len(items)} requests, {sum(len(i.prompt_ids) for i in items)} prompt "
         f"tokens, {sum(i.output_len for i in items)} output tokens; {load_before}")
    results: list[PhaseResult] = []
    prompt_total = sum(len(i.prompt_ids) for i in items)
    output_total = sum(i.output_len for i in items)
    for concurrency in args.concurrency:
        _log(f"ringserve, concurrency {concurrency} ...")
        wall, counts = await ours(items, concurrency, f"c{concurrency}")
        short = [i for i, (n, item) in enumerate(zip(counts, items, strict=True))
                 if n != item.output_len]
        if short:
            _log(f"warning: {len(short)} ringserve requests produced the wrong token count")
        results.append(PhaseResult("ringserve", concurrency, wall, prompt_total, output_total,
                                   sum(counts)))
        _log(f"ringserve, concurrency {concurrency}: {wall:.1f} s, "
             f"{output_total / wall:.1f} output tok/s")
        _log(f"transformers, batch {concurrency} ...")
        wall, generated = run_transformers(hf_model, items, concurrency)
        results.append(PhaseResult("transformers", concurrency, wall, prompt_total, output_total,
                                   generated))
        _log(f"transformers, batch {concurrency}: {wall:.1f} s, "
             f"{output_total / wall:.1f} useful output tok/s")
    load_after = _load_note()
    await engine.shutdown()
    _print_report(results, items, args, load_before, load_after)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    asyncio.run(_bench(args))


if __name__ == "__main__":
    main()
