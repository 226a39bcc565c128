"""CPU kernels of our own, compiled on the machine that runs them: ``ringserve::paged_decode``,
``ringserve::int4_linear``, ``ringserve::q8_linear``, a decoder layer's small ops
(``rms_norm``, ``rotary``, ``silu_mul``) and ``ringserve::decode_layer``.

Why a kernel: a decode step attends once per sequence per layer. Through PyTorch that is one
SDPA call per sequence (a ~35 us floor each, plus the Python around it): 480 calls a step at
batch 16 on the default model, a third of the step. ``model/csrc/paged_decode.cpp`` does a
whole layer in one call: it reads each window's runs of pool rows in place, splits the
(sequence, KV head) pairs over the intra-op threads, and computes each pair in a fixed order,
so a sequence's result is bit for bit the same alone or in any batch (what the engine promises;
``tests/test_cpu_kernels.py`` checks it).

Why the linears (``model/csrc/group_linear.cpp``): PyTorch's CPU int4 matmul takes bf16
activations and returns bf16, and its int8 one (fbgemm) quantizes the activations; those
roundings moved greedy near-ties (15 of 20 continuations as the fp32 model's). Ours read the
GGUF's own Q4_1 / Q8_0 groups with fp32 activations and results (20 of 20), each output summed
in a fixed order, so a row's result does not depend on the rest of the batch either, and run
0.7-0.9x the time of PyTorch's int4 kernel at 16 rows (about its time at 1).

Why the layer (``model/csrc/decode_layer.cpp``): with the linears and attention on our
kernels, a batch-1 decode step still spent ~190 us a layer (a third of the step) on ~20 small
PyTorch ops and the Python between them. A decode-only step with int4 projections now runs
each layer as one call of the same kernels (bit for bit the op-by-op result); the small ops
serve every other step (prompt chunks, other quantizations) so both ways agree.

How it is built: by the C++ compiler (``$CXX``, else ``c++``) against the installed torch's
headers, ``-O3 -march=native``, once per machine, torch version and source: the library goes
to ``$RINGSERVE_KERNEL_CACHE`` (default ``~/.cache/ringserve/kernels``) under a hash of all
three, built under a file lock and moved into place whole, so replicas starting together build
it once. About 30-50 s on 2 cores; ``make setup`` builds it ahead. Where it cannot be built (no
compiler, an unsupported platform) or ``RINGSERVE_CPU_KERNELS=0`` is set, :func:`paged_decode`
is None and attention takes its PyTorch path (one warning says why).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).with_name("csrc")
SOURCES = tuple(SOURCE_DIR / name
                for name in ("paged_decode.cpp", "group_linear.cpp", "decode_layer.cpp"))
HEADERS = (SOURCE_DIR / "ringserve_kernels.h",)  # part of the cache key, not compiled alone
LIBRARY_NAME = "ringserve_cpu"
DISABLE_ENV = "RINGSERVE_CPU_KERNELS"  # "0": never build or use the kernels
CACHE_ENV = "RINGSERVE_KERNEL_CACHE"
BUILD_TIMEOUT_S = 600
CXX_FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++20", "-shared", "-fPIC")

PagedDecodeKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                              torch.Tensor, float], torch.Tensor]

Int4LinearKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                            torch.Tensor]

Q8LinearKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

RMSNormKernel = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]

RotaryKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

SiluMulKernel = Callable[[torch.Tensor], torch.Tensor]

DecodeLayerKernel = Callable[..., torch.Tensor]

_lock = threading.Lock()
_load_result: bool | None = None  # set by the first _loaded() call that finds kernels enabled


def kernels_enabled() -> bool:
    """False where ``RINGSERVE_CPU_KERNELS`` is 0/false/off/no."""
    return os.environ.get(DISABLE_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def _cpu_identity() -> str:
    """The CPU model and feature flags (``-march=native`` code is only good on its like)."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as info:
            lines = [line for line in info if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    return platform.processor() or platform.machine()


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _compile_command(sources: Sequence[Path], output: Path) -> list[str]:
    from torch.utils import cpp_extension

    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    return [_compiler(), *CXX_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes,
            *(str(source) for source in sources),
            "-o", str(output), f"-L{torch_lib}", "-lc10", "-ltorch_cpu",
            f"-Wl,-rpath,{torch_lib}"]


def _library_path(sources: Sequence[Path], name: str) -> Path:
    key = hashlib.sha256()
    for source in (*sources, *HEADERS):
        key.update(source.read_bytes())
    for part in (torch.__version__, sys.version, _cpu_identity(), _compiler(), *CXX_FLAGS):
        key.update(part.encode())
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ringserve" / "kernels")
    return root / key.hexdigest()[:16] / f"{name}.so"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_library(sources: Sequence[Path] = SOURCES, name: str = LIBRARY_NAME) -> Path:
    """The compiled library of ``sources`` (built now unless already cached); raises
    RuntimeError with the compiler's message when it cannot be built."""
    library = _library_path(sources, name)
    if library.exists():
        return library
    with _file_lock(library.with_suffix(".lock")):
        if library.exists():  # another process built it while this one waited
            return library
        if shutil.which(_compiler()) is None:
            raise RuntimeError(f"no C++ compiler {_compiler()!r} on PATH (set CXX)")
        logger.info("building CPU kernels %s (once per machine and torch version, ~30-50 s)",
                    name)
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
            partial = Path(scratch) / library.name
            command = _compile_command(sources, partial)
            try:
                done = subprocess.run(command, capture_output=True, text=True,
                                      timeout=BUILD_TIMEOUT_S, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise RuntimeError(f"compiling {name} failed: {exc}") from exc
            if done.returncode != 0:
                raise RuntimeError(f"compiling {name} failed (exit {done.returncode}): "
                                   f"{done.stderr.strip()[-2000:]}")
            os.replace(partial, library)
        logger.info("built %s in %.1f s: %s", name, time.monotonic() - started, library)
    return library


def _load() -> bool:
    """Build (if need be) and load the library; False where it cannot be."""
    if platform.system() != "Linux":
        logger.warning("CPU kernels are built on Linux only; PyTorch's ops run instead")
        return False
    try:
        torch.ops.load_library(str(build_library()))
    except (RuntimeError, OSError) as exc:
        logger.warning("CPU kernels unavailable, PyTorch's (slower) ops run instead: %s", exc)
        return False
    return True


def _loaded() -> bool:
    """Whether the library is loaded (tried once per process; later calls read the result,
    without the lock: the layers call this every step)."""
    global _load_result
    if not kernels_enabled():
        return False
    if _load_result is None:
        with _lock:
            if _load_result is None:
                _load_result = _load()
    return _load_result


def paged_decode() -> PagedDecodeKernel | None:
    """``torch.ops.ringserve.paged_decode`` (built on first call), or None where it cannot be
    built or is turned off. Signature: ``(q [B, H, D], k_rows [KVH, P, D], v_rows, run_bounds
    [R, 2] int64, seq_offsets [B + 1] int64, scale) -> [B, H, D]``, all CPU fp32."""
    if not _loaded():
        return None
    op: PagedDecodeKernel = torch.ops.ringserve.paged_decode
    return op


def int4_linear() -> Int4LinearKernel | None:
    """``torch.ops.ringserve.int4_linear`` (built on first call), or None where it cannot be
    built or is turned off. Signature: ``(x [M, K] fp32, codes [N / 16, K, 8] uint8, d, m
    [N / 16, K / 32, 16] fp16) -> [M, N] fp32``; the layout is ``model.int4.KernelInt4``'s."""
    if not _loaded():
        return None
    op: Int4LinearKernel = torch.ops.ringserve.int4_linear
    return op


def q8_linear() -> Q8LinearKernel | None:
    """``torch.ops.ringserve.q8_linear`` (built on first call), or None where it cannot be
    built or is turned off. Signature: ``(x [M, K] fp32, codes [N / 16, K, 16] int8, d
    [N / 16, K / 32, 16] fp16) -> [M, N] fp32``; the layout is ``model.q8.Q8Weight``'s."""
    if not _loaded():
        return None
    op: Q8LinearKernel = torch.ops.ringserve.q8_linear
    return op


def rms_norm() -> RMSNormKernel | None:
    """``torch.ops.ringserve.rms_norm`` or None (as :func:`paged_decode`). Signature: ``(x
    [N, C] fp32, weight [C] fp32, eps) -> [N, C]``, C a multiple of 16."""
    if not _loaded():
        return None
    op: RMSNormKernel = torch.ops.ringserve.rms_norm
    return op


def rotary() -> RotaryKernel | None:
    """``torch.ops.ringserve.rotary`` or None. Signature: ``(x [T, heads, D] fp32, cos, sin
    [T, 1, D] or [T, D]) -> [T, heads, D]`` (rotate-half), D a multiple of 32."""
    if not _loaded():
        return None
    op: RotaryKernel = torch.ops.ringserve.rotary
    return op


def silu_mul() -> SiluMulKernel | None:
    """``torch.ops.ringserve.silu_mul`` or None. Signature: ``(gate_up [N, 2 I] fp32) ->
    [N, I]``: silu(gate) * up, I a multiple of 16."""
    if not _loaded():
        return None
    op: SiluMulKernel = torch.ops.ringserve.silu_mul
    return op


def decode_layer() -> DecodeLayerKernel | None:
    """``torch.ops.ringserve.decode_layer`` or None: a whole decoder layer for a decode step
    (model/csrc/decode_layer.cpp; ``DecoderLayer`` in model/transformer.py calls it)."""
    if not _loaded():
        return None
    op: DecodeLayerKernel = torch.ops.ringserve.decode_layer
    return op


def main() -> int:
    """``python -m model.cpu_kernels``: build the kernels now (``make setup`` runs this)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not kernels_enabled():
        print(f"CPU kernels turned off ({DISABLE_ENV}=0)")
        return 0
    print("CPU kernels (decode attention, int4 and q8 linears, decode layer):", "ready" if _loaded()
          else "unavailable (PyTorch's ops run instead; see the warning above)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
