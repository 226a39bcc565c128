"""The machine a benchmark ran on, measured: cores, SIMD flags, memory bandwidth, matmul FLOP/s.

Serving figures mean little without the machine behind them, so ``ringserve bench serve``
prints this before it sends load (and stores it in results.json): CPU model, cores usable by
this process, the AVX / VNNI / AMX flags the kernels can use, total memory, the load average
(other jobs share the box), and three short measurements at ``threads`` torch threads:

* memory bandwidth: ``dst.copy_(src)`` of 256 MiB fp32 tensors, bytes read + written / s;
* fp32 matmul: ``a @ b`` at 2048 x 2048 x 2048, 2 * M * N * K / s;
* int8 matmul: fbgemm ``quantized::linear_dynamic`` (the kernel behind ``--quantization
  int8``) at 256 x 2048 -> 2048, integer multiply-adds * 2 / s (0 when fbgemm is absent).

Each is the best of a few repetitions (about 2 s in all). ``python -m bench.machine`` prints it.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from collections.abc import Callable
from typing import Any

SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni",
              "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def _cpuinfo() -> tuple[str, list[str]]:
    """(model name, the SIMD flags of SIMD_FLAGS present) from /proc/cpuinfo."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, [f for f in SIMD_FLAGS if f in flags]


def _memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def _best_s(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm up (first touch, kernel selection)
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def measure(threads: int | None = None) -> dict[str, float]:
    """Memory GB/s and fp32 / int8 matmul GFLOP/s at ``threads`` torch threads (default all)."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            src = torch.ones(64 * 2**20)  # 256 MiB of fp32
            dst = torch.empty_like(src)
            copy_s = _best_s(lambda: dst.copy_(src), 5)
            bandwidth = 2 * src.numel() * 4 / copy_s / 1e9
            n = 2048
            a, b = torch.randn(n, n), torch.randn(n, n)
            fp32 = 2 * n**3 / _best_s(lambda: a @ b, 3) / 1e9
            int8 = 0.0
            if "fbgemm" in torch.backends.quantized.supported_engines:
                m, k, out = 256, 2048, 2048
                with warnings.catch_warnings():  # quantized tensors are deprecated, fbgemm not
                    warnings.simplefilter("ignore")
                    weight = torch.quantize_per_channel(
                        torch.randn(out, k) * 0.05, torch.full((out,), 0.05 / 127),
                        torch.zeros(out, dtype=torch.long), 0, torch.qint8)
                    packed = torch.ops.quantized.linear_prepack(weight, None)
                x = torch.randn(m, k)
                int8 = 2 * m * k * out / _best_s(
                    lambda: torch.ops.quantized.linear_dynamic(x, packed, True), 10) / 1e9
    finally:
        torch.set_num_threads(before)
    return {"memory_gb_s": bandwidth, "fp32_matmul_gflop_s": fp32,
            "int8_matmul_gop_s": int8}


def machine_report(threads: int | None = None, measured: bool = True) -> dict[str, Any]:
    """Everything :func:`describe` prints; ``measured=False`` skips the ~2 s measurements."""
    model, flags = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    report: dict[str, Any] = {
        "cpu": model, "cores": usable, "logical_cpus": os.cpu_count(), "simd": flags,
        "memory_gib": _memory_gib(), "loadavg": list(os.getloadavg()),
        "threads": threads or usable,
    }
    if measured:
        report.update(measure(threads))
    return report


def describe(report: dict[str, Any]) -> str:
    """One line, e.g. 'machine: Xeon ..., 2 cores, avx2 fma avx512f, 23.5 GiB, load 1.2 ...'."""
    parts = [report["cpu"], f"{report['cores']} cores usable ({report['logical_cpus']} "
             "logical)", " ".join(report["simd"]) or "no AVX"]
    if report.get("memory_gib"):
        parts.append(f"{report['memory_gib']:.1f} GiB")
    if "memory_gb_s" in report:
        parts.append(f"at {report['threads']} threads: memory {report['memory_gb_s']:.1f} GB/s,"
                     f" fp32 matmul {report['fp32_matmul_gflop_s']:.0f} GFLOP/s, int8 matmul "
                     f"{report['int8_matmul_gop_s']:.0f} GOP/s")
    parts.append("load average " + " ".join(f"{x:.2f}" for x in report["loadavg"]))
    return "machine: " + "; ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default all)")
    print(describe(machine_report(p.parse_args().threads)))


if __name__ == "__main__":
    main()
