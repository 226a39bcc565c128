"""Where a decode step goes, before and after the lean-step work, fp32 and int8 (printed only).

One process builds, from the same loaded weights, the model as a git ref had it (``--before``,
default ``main``: its model/transformer.py, model/quantization.py and model/rope.py, loaded as
private modules beside today's code; the cache and attention code are today's for both) and
the model of this checkout, each unquantized and int8. It then times ``Transformer.forward``
on one decode step (every sequence one token, a KV cache, ``--context`` cached tokens each) at
batch 1 and 16, the variants taking turns round after round (best of ``--rounds``), so a
shared machine's noise hits all alike. Each step is timed twice: wall clock, and the CPU time
of this process (``time.process_time``): at one torch thread the CPU time leaves out the time
the process waits for a core, which on a box shared with other jobs is most of the wall
time, so ratios and the bandwidth fraction use CPU time (``--clock wall`` to change that).
Also printed:

* the machine's read memory bandwidth (a ``sum`` over a buffer far larger than the caches,
  best of several, at the same thread count), and at batch 1 the weight-bandwidth fraction:
  the time the step's weight bytes take at that bandwidth over the measured step time;
* a ``torch.profiler`` table per variant at batch 1 and 16 (ops by self CPU time), with the
  number of ``aten::to`` calls and of ops per step.

    python -m bench.decode_step_bench [--before main] [--rounds 7] [--threads 2]
                                      [--batches 1,16] [--profile]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
# Files of the model package a --before ref supplies (imports among them are rewired).
_BEFORE_MODULES = ("rope", "quantization", "transformer")


def load_before(ref: str) -> types.ModuleType:
    """model/transformer.py as ``ref`` had it (with its rope and quantization), as a module."""
    folder = Path(tempfile.mkdtemp(prefix="ringserve-before-"))
    modules: dict[str, types.ModuleType] = {}
    for name in _BEFORE_MODULES:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:model/{name}.py"],
                                check=True, capture_output=True, text=True).stdout
        for other in _BEFORE_MODULES:
            source = source.replace(f"from model.{other} import", f"from _before_{other} import")
        path = folder / f"_before_{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(f"_before_{name}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"_before_{name}"] = module
        spec.loader.exec_module(module)
        modules[name] = module
    return modules["transformer"]


def read_bandwidth_gbs(clock: Callable[[], float], mib: int = 1024, rounds: int = 5) -> float:
    """Bytes per second a ``sum`` streams from memory (buffer far beyond the caches)."""
    buffer = torch.ones(mib * 2**20 // 4)
    best = float("inf")
    for _ in range(rounds + 1):
        started = clock()
        buffer.sum()
        best = min(best, clock() - started)
    return buffer.numel() * 4 / best / 1e9


def weight_bytes(model: nn.Module) -> int:
    """Bytes of projection weights one decode step reads (every linear layer and the head)."""
    total = 0
    for module in model.modules():
        weight_t = getattr(module, "weight_t", None)
        if isinstance(weight_t, torch.Tensor):
            total += weight_t.numel() * weight_t.element_size()
        elif getattr(module, "kernel_weights", None) is not None:  # Int4Projection, ours
            kernel_weights: Any = module.kernel_weights
            total += sum(t.numel() * t.element_size() for t in kernel_weights)
        elif hasattr(module, "_scales_and_zeros"):  # Int4Projection: PyTorch's packed codes
            for part in (module._packed, module._scales_and_zeros):
                assert isinstance(part, torch.Tensor)
                total += part.numel() * part.element_size()
        elif hasattr(getattr(module, "weight", None), "codes"):  # Q8Projection: Q8Weight
            q8_weight: Any = module.weight
            total += sum(t.numel() * t.element_size() for t in (q8_weight.codes, q8_weight.d))
        elif hasattr(module, "_packed"):  # Int8Projection: int8 values + fp32 row scales
            # duck-typed: the --before ref's Int8Projection is another class (and has no planes)
            planes: int = getattr(module, "planes", 1)
            out_features: int = getattr(module, "out_features", 0)
            in_features: int = getattr(module, "in_features", 0)
            total += planes * out_features * (in_features + 4)
    return total


def _step_fn(model: nn.Module, cache, batch: int, context: int, vocab: int
             ) -> Callable[[], object]:
    from model.kv_cache import SequenceChunk

    ids = torch.randint(0, vocab, (batch,))
    chunks = [SequenceChunk(slot, context, 1) for slot in range(batch)]
    return lambda: model(ids, chunks, cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", default="main", help="git ref of the 'before' model")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--context", type=int, default=128, help="cached tokens per sequence")
    parser.add_argument("--variants", default="fp32,int8,int8x2,int8x2-head,int4",
                        help="fp32, int8, int8x2, int8x2-head (fp32 layers, int8x2 LM head), "
                             "int4; "
                             "a variant the --before ref lacks is timed 'after' only")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="the clock of ratios and the bandwidth fraction")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]

    from model import transformer as after_module
    from model.kv_cache import CacheGeometry, KVCachePool
    from model.weights import load_weights

    before_module = load_before(args.before)
    loaded = load_weights(None, progress=False)
    config = loaded.config
    models: dict[str, nn.Module] = {}
    for variant in args.variants.split(","):
        if variant == "int8x2-head":  # fp32 layers, int8x2 LM head: int8 only where it pays
            from model.quantization import Int8Projection, quantize_planes

            head = after_module.Transformer.from_tensors(config, loaded.tensors)
            head_weight = loaded.tensors.get("lm_head.weight",
                                             loaded.tensors["embed_tokens.weight"])
            head.set_submodule("lm_head", Int8Projection(quantize_planes(head_weight, 2)))
            models["int8x2-head after"] = head
            continue
        quantization = "none" if variant == "fp32" else variant
        for label, module in (("before", before_module), ("after", after_module)):
            choices = sys.modules[module.__name__.replace("transformer", "quantization")
                                  ].QUANTIZATION_CHOICES
            if quantization in choices:  # the ref may not know this variant
                models[f"{variant} {label}"] = module.Transformer.from_tensors(
                    config, loaded.tensors, quantization=quantization)
    geometry = CacheGeometry.for_model(config, args.context + 64, torch.float32)
    cache = KVCachePool(geometry, max(batches), torch.float32)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    bandwidth = read_bandwidth_gbs(clock)
    load = os.getloadavg()
    print(f"decode step, embedded default model, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}, "
          f"{os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"read memory bandwidth (sum over 1 GiB, best of 5, {args.clock} clock): "
          f"{bandwidth:.1f} GB/s; "
          f"before = {args.before}, after = this checkout; context {args.context} tokens")

    with torch.inference_mode():
        for batch in batches:
            fns = {name: _step_fn(m, cache, batch, args.context, config.vocab_size)
                   for name, m in models.items()}
            for fn in fns.values():
                fn()
                fn()
            best = dict.fromkeys(fns, float("inf"))
            best_wall = dict.fromkeys(fns, float("inf"))
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    started, started_wall = clock(), time.perf_counter()
                    for _ in range(args.reps):
                        fn()
                    best[name] = min(best[name], (clock() - started) / args.reps)
                    best_wall[name] = min(best_wall[name],
                                          (time.perf_counter() - started_wall) / args.reps)
            print(f"\nbatch {batch}: ms per decode step (best of {args.rounds} interleaved "
                  f"rounds of {args.reps}); ratios and tok/s on the {args.clock} clock")
            header = (f"{'variant':<18}{'wall ms':>9}{args.clock + ' ms':>9}{'tok/s':>9}"
                      f"{'after/before':>14}")
            if batch == 1:
                header += f"{'weight MB':>11}{'BW limit ms':>13}{'of BW limit':>13}"
            print(header)
            for name, seconds in best.items():
                variant, label = name.split()
                before = best.get(f"{variant} before")
                speedup = f"{before / seconds:>13.2f}x" if before and label == "after" else (
                    f"{'':>14}")
                line = (f"{name:<18}{best_wall[name] * 1e3:>9.2f}{seconds * 1e3:>9.2f}"
                        f"{batch / seconds:>9.1f}{speedup}")
                if batch == 1:
                    nbytes = weight_bytes(models[name])
                    limit = nbytes / (bandwidth * 1e9)
                    line += f"{nbytes / 1e6:>11.0f}{limit * 1e3:>13.2f}{limit / seconds:>12.0%}"
                print(line, flush=True)
            if args.profile:
                _profile(fns, batch)


def _profile(fns: dict[str, Callable[[], object]], batch: int, steps: int = 5) -> None:
    from torch.profiler import ProfilerActivity, profile

    for name, fn in fns.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                fn()
        events = prof.key_averages()
        to_calls = sum(e.count for e in events if e.key == "aten::to") / steps
        ops = sum(e.count for e in events if e.key.startswith(("aten::", "quantized::"))) / steps
        print(f"\nprofile {name}, batch {batch}: {to_calls:.0f} aten::to and {ops:.0f} aten/"
              f"quantized op calls per step ({steps} steps)")
        print(events.table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
