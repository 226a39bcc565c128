"""Int8 vs fp32 speed on the embedded default model: kernels, engine decode, a decode profile.

All comparisons run side by side in this one process, interleaved (fp32, int8, fp32, int8, ...)
and reported best-of-``--rounds``, so machine noise hits both alike. Prints; asserts nothing.

* ``kernels``: every projection shape of the default model (q/k/v fused, o, gate/up fused,
  down, LM head) at batch 1 and 16: fp32 ``x @ W_t`` vs ringserve's ``Int8Projection``
  (fbgemm, rows made batch-independent, ~16-bit activations) vs the raw fbgemm
  ``quantized::linear_dynamic`` call it is built on (one 8-bit pass).
* ``engine``: decode tokens/s through ``Engine.step`` at batch 1 and 16 (greedy, ignore EOS;
  prefill excluded), ``quantization=none`` vs ``int8``.
* ``profile``: ``torch.profiler`` table of one batch-1 decode step per quantization, ops by
  self CPU time.

    python -m bench.quant_bench [--parts kernels,engine,profile] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch

SHAPES = (("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576),
          ("lm_head", 576, 49152))
PROMPT = "The rolling buffer cache keeps position i at slot i mod W, so that"


def _best_interleaved(fns: dict[str, Callable[[], object]], reps: int, rounds: int
                      ) -> dict[str, float]:
    """Best seconds per call of each fn, the fns taking turns round by round."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            started = time.perf_counter()
            for _ in range(reps):
                fn()
            best[name] = min(best[name], (time.perf_counter() - started) / reps)
    return best


def kernels(rounds: int) -> None:
    from model.quantization import Int8Projection, quantize_rows

    print("kernels: microseconds per call (best of interleaved rounds); ratio = fp32 / x")
    print(f"{'shape':<22}{'batch':>6}{'fp32':>10}{'int8':>10}{'ratio':>8}"
          f"{'fbgemm raw':>12}{'ratio':>8}")
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for name, fan_in, fan_out in SHAPES:
            weight = torch.randn(fan_out, fan_in, generator=gen) * 0.05
            weight_t = weight.T.contiguous()
            proj = Int8Projection(quantize_rows(weight))
            packed = proj._packed
            for batch in (1, 16):
                x = torch.randn(batch, fan_in, generator=gen)
                reps = max(5, int(2e7 / (fan_in * fan_out * max(batch, 4))))
                t = _best_interleaved({
                    "fp32": functools.partial(torch.matmul, x, weight_t),
                    "int8": functools.partial(proj, x),
                    "raw": functools.partial(torch.ops.quantized.linear_dynamic, x, packed, False),
                }, reps, rounds)
                print(f"{f'{name} {fan_in}x{fan_out}':<22}{batch:>6}{t['fp32'] * 1e6:>10.1f}"
                      f"{t['int8'] * 1e6:>10.1f}{t['fp32'] / t['int8']:>7.2f}x"
                      f"{t['raw'] * 1e6:>12.1f}{t['fp32'] / t['raw']:>7.2f}x", flush=True)


def _decode_rate(engine, prompt_ids: list[int], batch: int, new_tokens: int) -> float:
    from model.requests import GenerationRequest
    from model.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add(GenerationRequest(f"b{i}", tuple(prompt_ids), params))
    engine.step()  # every prompt fits one step's token budget: prefill + first tokens
    started, steps = time.perf_counter(), 0
    while engine.has_work:
        engine.step()
        steps += 1
    # all sequences ask for the same length, so each decode step made `batch` tokens
    return steps * batch / (time.perf_counter() - started)


def _engines(max_num_seqs: int):
    from model.engine import Engine
    from model.engine_args import EngineArgs

    return {q: Engine.from_args(EngineArgs(max_model_len=512, max_num_seqs=max_num_seqs,
                                           progress=False, quantization=q))
            for q in ("none", "int8")}


def engine_decode(rounds: int, new_tokens: int) -> None:
    engines = _engines(16)
    prompt_ids = engines["none"].tokenizer.encode(PROMPT)
    print(f"engine decode tokens/s (best of {rounds} interleaved), {new_tokens} new tokens "
          "per sequence, prefill excluded")
    print(f"{'batch':>6}{'fp32':>10}{'int8':>10}{'ratio':>8}")
    for batch in (1, 16):
        best = dict.fromkeys(engines, 0.0)
        for _ in range(rounds):
            for name, engine in engines.items():
                best[name] = max(best[name], _decode_rate(engine, prompt_ids, batch,
                                                          new_tokens))
        print(f"{batch:>6}{best['none']:>10.1f}{best['int8']:>10.1f}"
              f"{best['int8'] / best['none']:>7.2f}x", flush=True)


def profile(steps: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from model.requests import GenerationRequest
    from model.sampling_params import SamplingParams

    for name, engine in _engines(1).items():
        prompt_ids = engine.tokenizer.encode(PROMPT)
        params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
        engine.add(GenerationRequest("p", tuple(prompt_ids), params))
        for _ in range(4):
            engine.step()  # prefill and warm decode steps
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            started = time.perf_counter()
            for _ in range(steps):
                engine.step()
            per_step = (time.perf_counter() - started) / steps
        while engine.has_work:
            engine.step()
        print(f"\nprofile, quantization={name}: {steps} batch-1 decode steps, "
              f"{per_step * 1e3:.1f} ms per step under the profiler")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parts", default="kernels,engine,profile")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--profile-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    parts = args.parts.split(",")
    if "kernels" in parts:
        kernels(args.rounds)
    if "engine" in parts:
        engine_decode(args.rounds, args.new_tokens)
    if "profile" in parts:
        profile(args.profile_steps)


if __name__ == "__main__":
    main()
