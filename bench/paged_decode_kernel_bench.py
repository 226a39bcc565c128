"""Our CPU kernels (``ringserve::paged_decode``, ``int4_linear``, ``q8_linear``, the fused
``decode_layer``) vs PyTorch's ops.

Two parts, in one process, printed only (asserts nothing):

1. **Attention alone**, one layer of the default model's shape (9 query heads, 3 KV heads,
   head dim 64) over a paged pool of 16-row blocks handed out shuffled (each window is a few
   to many runs, as in a crowded pool), windows of seeded lengths: milliseconds per layer for
   :func:`model.attention.sdpa_paged_decode_attention` (one SDPA call per sequence) and for
   the kernel, best of ``--rounds``, and the largest difference between the two.
2. **Engine decode steps** (unless ``--no-engine``): the embedded default model at the
   serving defaults (``quantization=auto``, ``--threads`` torch threads) built twice, with
   all our kernels (decode attention, int4 and q8 linears, the decode layer's small ops) and
   with PyTorch's ops (``RINGSERVE_CPU_KERNELS=0``: SDPA, PyTorch's bf16 int4 kernel,
   fbgemm's int8 head); ours steps with its decode layers fused (one
   ``ringserve::decode_layer`` call each) and op by op;
   ``--engine-batches`` greedy sequences with ``--prompt``-token prompts decoding;
   ``Engine.step()`` timed in alternating passes (so a shared box's noise hits both alike),
   median step ms of each and the ratios; how many sequences' greedy tokens agree.

    python -m bench.paged_decode_kernel_bench [--batches 1,16] [--lengths 64,250,1000]
        [--rounds 30] [--engine-batches 1,16] [--prompt 250] [--steps 60] [--threads 2]
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import statistics
import time
from collections.abc import Sequence

import torch

from bench.timing import best_ms
from model import cpu_kernels
from model.attention import run_table, sdpa_paged_decode_attention

KV_HEADS, GROUP, HEAD_DIM, BLOCK = 3, 3, 64, 16


def _windows(batch: int, length: int, num_blocks: int, rng: random.Random
             ) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Each sequence's window as runs of pool rows: ``length`` rows (+-25%) in shuffled blocks."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    runs = []
    for _ in range(batch):
        rows = max(1, int(length * rng.uniform(0.75, 1.25)))
        blocks = sorted(free.pop() for _ in range((rows + BLOCK - 1) // BLOCK))
        seq: list[tuple[int, int]] = []
        left = rows
        for block in blocks:
            take = min(BLOCK, left)
            start = block * BLOCK
            if seq and seq[-1][1] == start:
                seq[-1] = (seq[-1][0], start + take)
            else:
                seq.append((start, start + take))
            left -= take
        runs.append(tuple(seq))
    return tuple(runs)


def attention_alone(batches: Sequence[int], lengths: Sequence[int], rounds: int) -> None:
    kernel = cpu_kernels.paged_decode()
    if kernel is None:
        print("kernel unavailable: nothing to compare")
        return
    rng = random.Random(0)
    num_blocks = 4096
    k_rows = torch.randn(KV_HEADS, num_blocks * BLOCK, HEAD_DIM)  # [KVH, P, D]
    v_rows = torch.randn(KV_HEADS, num_blocks * BLOCK, HEAD_DIM)
    print(f"attention alone, one layer, {torch.get_num_threads()} torch threads "
          f"(best of {rounds}):")
    print("| batch | window rows | runs/seq | sdpa ms | kernel ms | kernel / sdpa | max diff |")
    print("|---|---|---|---|---|---|---|")
    for batch in batches:
        for length in lengths:
            runs = _windows(batch, length, num_blocks, rng)
            q = torch.randn(batch, KV_HEADS * GROUP, HEAD_DIM)  # [B, H, D]
            bounds, offsets = run_table(runs)
            scale = HEAD_DIM ** -0.5
            ref = sdpa_paged_decode_attention(q, k_rows, v_rows, runs)
            got = kernel(q, k_rows, v_rows, bounds, offsets, scale)
            sdpa = best_ms(functools.partial(sdpa_paged_decode_attention, q, k_rows, v_rows,
                                             runs), rounds)
            ours = best_ms(functools.partial(kernel, q, k_rows, v_rows, bounds, offsets, scale),
                           rounds)
            per_seq = sum(len(r) for r in runs) / batch
            print(f"| {batch} | {length} | {per_seq:.1f} | {sdpa:.3f} | {ours:.3f} | "
                  f"{ours / sdpa:.2f} | {(ref - got).abs().max().item():.1e} |")


def engine_steps(batches: Sequence[int], prompt_len: int, steps: int, threads: int) -> None:
    """Two engines of the default model in this process, one built with our kernels and one
    with PyTorch's ops (``RINGSERVE_CPU_KERNELS=0`` while it is built and while it steps);
    ours steps twice, with its decode layers fused (``ringserve::decode_layer``) and op by op
    (``DecoderLayer.fuse_decode = False``); the three take turns pass by pass."""
    from model.engine import Engine
    from model.engine_args import SERVING_QUANTIZATION, EngineArgs
    from model.requests import GenerationRequest
    from model.sampling_params import SamplingParams
    from model.transformer import DecoderLayer

    def build(kernels: bool) -> Engine:
        os.environ[cpu_kernels.DISABLE_ENV] = "1" if kernels else "0"
        return Engine.from_args(EngineArgs(quantization=SERVING_QUANTIZATION,
                                           torch_threads=threads, progress=False))

    built = {"pytorch": build(False), "ours": build(True)}
    engines = {"pytorch": built["pytorch"], "op by op": built["ours"], "fused": built["ours"]}
    modes = tuple(engines)
    text = open(os.path.join(os.path.dirname(__file__), "data", "gpl-3.0.txt")).read()
    ids = built["ours"].tokenizer.encode(text)
    print(f"\nengine decode steps, default model, quantization {SERVING_QUANTIZATION}, "
          f"{threads} torch threads, {prompt_len}-token prompts; 'pytorch': SDPA attention, "
          "PyTorch's int4 kernel, fbgemm int8 head; 'op by op': the ringserve kernels one op "
          "at a time; 'fused': each decode layer one ringserve::decode_layer call:")
    print("| batch | steps each | pytorch step ms (median) | op by op ms | fused ms | "
          "fused / pytorch | fused / op by op | greedy tokens: fused = op by op, = pytorch |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in batches:
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        tokens: dict[str, list[list[int]]] = {}
        for mode in modes * 2:  # two passes each, interleaved
            os.environ[cpu_kernels.DISABLE_ENV] = "0" if mode == "pytorch" else "1"
            engine = engines[mode]
            for layer in engine.model.layers:
                assert isinstance(layer, DecoderLayer)
                layer.fuse_decode = mode == "fused"
            requests = [GenerationRequest(
                f"{mode}-{len(times[mode])}-{b}", tuple(ids[b * 7:b * 7 + prompt_len]),
                SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True))
                for b in range(batch)]
            for request in requests:
                engine.add(request)
            outs: dict[str, list[int]] = {r.request_id: [] for r in requests}
            decoding = False
            while engine.has_work:
                started = time.perf_counter()
                outputs = engine.step()
                elapsed = time.perf_counter() - started
                if decoding:
                    times[mode].append(elapsed * 1e3)
                for output in outputs:
                    outs[output.request_id].extend(getattr(output, "token_ids", ()))
                decoding = all(len(v) > 0 for v in outs.values())
            tokens[mode] = [outs[r.request_id] for r in requests]
        os.environ.pop(cpu_kernels.DISABLE_ENV, None)
        median = {mode: statistics.median(times[mode]) for mode in modes}

        def same(a: str, b: str, tokens: dict[str, list[list[int]]] = tokens) -> int:
            return sum(x == y for x, y in zip(tokens[a], tokens[b], strict=True))

        print(f"| {batch} | {len(times['fused'])} | {median['pytorch']:.2f} | "
              f"{median['op by op']:.2f} | {median['fused']:.2f} | "
              f"{median['fused'] / median['pytorch']:.2f} | "
              f"{median['fused'] / median['op by op']:.2f} | "
              f"{same('fused', 'op by op')} of {batch}, {same('fused', 'pytorch')} of {batch} |")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: tuple(int(x) for x in text.split(","))  # noqa: E731
    parser.add_argument("--batches", type=ints, default=(1, 16))
    parser.add_argument("--lengths", type=ints, default=(64, 250, 1000))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--engine-batches", type=ints, default=(1, 16))
    parser.add_argument("--no-engine", action="store_true", help="attention alone only")
    parser.add_argument("--prompt", type=int, default=250)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    attention_alone(args.batches, args.lengths, args.rounds)
    if not args.no_engine:
        engine_steps(args.engine_batches, args.prompt, args.steps, args.threads)


if __name__ == "__main__":
    main()
