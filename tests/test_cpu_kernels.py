"""Our CPU kernels (model/cpu_kernels.py): decode attention and the int4 / Q8_0 linears
against fp64 references, their batch invariance (bit for bit), their argument checks, and the
PyTorch fallbacks they can be turned off to.

The kernel is built here as on any machine with a C++ compiler; where it cannot be built the
kernel tests skip with the build's reason (the fallback tests still run).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from model import cpu_kernels, int4, q8
from model.attention import paged_decode_attention, run_table, sdpa_paged_decode_attention

# The kernel computes in fp32 with a polynomial exp (relative error ~2e-7): against an fp64
# reference on unit-normal data the outputs (convex combinations of unit-scale rows) agree
# to a few 1e-6.
ATOL = 2e-5


@pytest.fixture(scope="module")
def kernel() -> cpu_kernels.PagedDecodeKernel:
    op = cpu_kernels.paged_decode()
    if op is None:
        pytest.skip("the CPU kernel could not be built here (see the warning in the log)")
    return op


def reference(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor,
              runs: tuple[tuple[tuple[int, int], ...], ...]) -> torch.Tensor:
    """fp64 softmax attention of each sequence over its runs' rows: [B, H, D]."""
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // k_rows.shape[0]
    for b, seq_runs in enumerate(runs):
        rows = torch.cat([torch.arange(lo, hi) for lo, hi in seq_runs])
        keys = k_rows[:, rows].double().repeat_interleave(group, 0)  # [H, L, D]
        values = v_rows[:, rows].double().repeat_interleave(group, 0)
        scores = torch.einsum("hd,hld->hl", q[b].double(), keys) / math.sqrt(q.shape[-1])
        out[b] = torch.einsum("hl,hld->hd", scores.softmax(-1), values)
    return out


def random_runs(rng: random.Random, batch: int, max_len: int, pool_rows: int,
                ) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Each sequence: 1..4 disjoint runs of rows, 1..max_len rows in all."""
    runs = []
    for _ in range(batch):
        length = rng.randint(1, max_len)
        cuts = sorted(rng.sample(range(1, length), min(rng.randint(0, 3), length - 1)))
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, length], strict=True)]
        seq, start = [], rng.randrange(0, pool_rows // 4)
        for size in sizes:
            seq.append((start, start + size))
            start += size + rng.randint(1, 40)  # a gap: the next run lies elsewhere
        runs.append(tuple(seq))
    return tuple(runs)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "max_len"), [
    (9, 3, 64, 300),   # the default model's shape
    (32, 8, 128, 700),  # Mistral 7B's
    (4, 4, 16, 40),    # no grouping, smallest head dim
    (8, 1, 32, 1500),  # all heads on one KV head; long windows (the threaded path)
])
def test_kernel_matches_fp64_reference(kernel: cpu_kernels.PagedDecodeKernel, heads: int,
                                       kv_heads: int, head_dim: int, max_len: int) -> None:
    rng = random.Random(heads * 1000 + max_len)
    torch.manual_seed(heads)
    pool_rows = 4 * max_len + 200
    k_rows = torch.randn(kv_heads, pool_rows, head_dim)
    v_rows = torch.randn(kv_heads, pool_rows, head_dim)
    for batch in (1, 5, 16):
        runs = random_runs(rng, batch, max_len, pool_rows)
        q = torch.randn(batch, heads, head_dim) * 2  # sharper softmax than unit scale
        got = kernel(q, k_rows, v_rows, *run_table(runs), 1 / math.sqrt(head_dim))
        assert got.dtype == torch.float32 and got.shape == q.shape
        torch.testing.assert_close(got.double(), reference(q, k_rows, v_rows, runs),
                                   atol=ATOL, rtol=0)


def test_kernel_is_batch_invariant_bit_for_bit(kernel: cpu_kernels.PagedDecodeKernel) -> None:
    """A sequence's output is the same bits alone, in any batch, in any position, at any
    thread count (big batches take the threaded path, small ones one thread)."""
    rng = random.Random(7)
    k_rows, v_rows = torch.randn(3, 20000, 64), torch.randn(3, 20000, 64)
    runs = random_runs(rng, 24, 900, 20000)
    q = torch.randn(24, 9, 64)
    scale = 1 / 8
    alone = [kernel(q[b:b + 1], k_rows, v_rows, *run_table(runs[b:b + 1]), scale)[0]
             for b in range(len(runs))]
    threads = torch.get_num_threads()
    try:
        for num_threads in sorted({1, 2, threads}):
            torch.set_num_threads(num_threads)
            together = kernel(q, k_rows, v_rows, *run_table(runs), scale)
            order = list(range(len(runs)))
            rng.shuffle(order)
            shuffled = kernel(q[order], k_rows, v_rows,
                              *run_table(tuple(runs[i] for i in order)), scale)
            for b in range(len(runs)):
                assert torch.equal(together[b], alone[b]), (num_threads, b)
                assert torch.equal(shuffled[order.index(b)], alone[b]), (num_threads, b)
    finally:
        torch.set_num_threads(threads)


def test_kernel_rejects_bad_arguments_with_clear_errors(
        kernel: cpu_kernels.PagedDecodeKernel) -> None:
    k_rows, v_rows = torch.randn(3, 100, 64), torch.randn(3, 100, 64)
    q = torch.randn(1, 9, 64)
    bounds, offsets = run_table((((0, 10),),))
    with pytest.raises(RuntimeError, match="outside the pool"):
        kernel(q, k_rows, v_rows, torch.tensor([[90, 101]]), offsets, 0.125)
    with pytest.raises(RuntimeError, match="at least one row"):
        kernel(q, k_rows, v_rows, torch.tensor([[5, 5]]), offsets, 0.125)
    with pytest.raises(RuntimeError, match="float32"):
        kernel(q.double(), k_rows, v_rows, bounds, offsets, 0.125)
    with pytest.raises(RuntimeError, match="seq_offsets"):
        kernel(torch.randn(2, 9, 64), k_rows, v_rows, bounds, offsets, 0.125)
    with pytest.raises(RuntimeError, match="head dim"):
        kernel(torch.randn(1, 9, 24), torch.randn(3, 100, 24), torch.randn(3, 100, 24),
               bounds, offsets, 0.125)


def test_paged_decode_attention_uses_the_kernel_and_can_fall_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The entry point the cache calls agrees with the SDPA path whether the kernel runs or
    is turned off (RINGSERVE_CPU_KERNELS=0), and shapes the kernel cannot take (head dim 8)
    go to SDPA."""
    rng = random.Random(3)
    runs = random_runs(rng, 6, 200, 2000)
    k_rows, v_rows = torch.randn(2, 2000, 32), torch.randn(2, 2000, 32)
    q = torch.randn(6, 4, 32)
    expected = reference(q, k_rows, v_rows, runs)
    sdpa = sdpa_paged_decode_attention(q, k_rows, v_rows, runs)
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "0")
    assert cpu_kernels.paged_decode() is None
    assert torch.equal(paged_decode_attention(q, k_rows, v_rows, runs), sdpa)
    monkeypatch.delenv(cpu_kernels.DISABLE_ENV)
    auto = paged_decode_attention(q, k_rows, v_rows, runs)
    torch.testing.assert_close(auto.double(), expected, atol=ATOL, rtol=0)
    if cpu_kernels.paged_decode() is not None:
        assert not torch.equal(auto, sdpa)  # a different kernel: same values, other rounding
    small_q, small_k, small_v = torch.randn(2, 4, 8), torch.randn(2, 50, 8), torch.randn(2, 50, 8)
    small_runs = (((0, 10),), ((20, 45),))
    assert torch.equal(paged_decode_attention(small_q, small_k, small_v, small_runs),
                       sdpa_paged_decode_attention(small_q, small_k, small_v, small_runs))


def test_a_failed_build_says_why(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler that fails gives a RuntimeError carrying its message (the engine then logs a
    warning and takes the SDPA path), and leaves no half-written library behind."""
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="compiling broken failed.*broken.cpp"):
        cpu_kernels.build_library([broken], "broken")
    assert not list((tmp_path / "cache").rglob("*.so"))
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        cpu_kernels.build_library([broken], "broken")


# The group-quantized linears -------------------------------------------------------------

@pytest.fixture(scope="module")
def linear_kernels() -> None:
    if cpu_kernels.int4_linear() is None or cpu_kernels.q8_linear() is None:
        pytest.skip("the CPU kernels could not be built here (see the warning in the log)")


def kernel_int4_reference(weight: int4.Int4Weight) -> torch.Tensor:
    """The fp32 weight the int4 kernel computes with: d and m rounded to fp16, as packed."""
    packed = int4.KernelInt4.pack(weight)
    # the packing's own unpacking agrees with the codes it started from
    scale16 = weight.scale.half().float()
    low16 = (weight.zero - 8 * weight.scale).half().float()
    out, in_features = weight.codes.shape
    expected = (weight.codes.float().view(out, -1, 32) * scale16[..., None]
                + low16[..., None]).view(out, in_features)
    dequantized = packed.dequantize()
    assert torch.equal(dequantized, expected)
    return dequantized


@pytest.mark.parametrize(("in_features", "out_features"), [(576, 960), (1536, 576), (64, 48)])
def test_int4_linear_matches_its_weights_in_fp64(linear_kernels: None, in_features: int,
                                                 out_features: int) -> None:
    torch.manual_seed(in_features)
    weight = int4.quantize_int4(torch.randn(out_features, in_features) * 0.05)
    reference = kernel_int4_reference(weight).double()
    packed = int4.KernelInt4.pack(weight)
    kernel = cpu_kernels.int4_linear()
    assert kernel is not None
    for rows in (1, 3, 16, 37):
        x = torch.randn(rows, in_features)
        got = kernel(x, packed.codes, packed.d, packed.m)
        assert got.dtype == torch.float32 and got.shape == (rows, out_features)
        expected = x.double() @ reference.T
        # fp32 sums of in_features products: a few ulp of the sum's magnitude
        torch.testing.assert_close(got.double(), expected, atol=1e-5 * in_features ** 0.5,
                                   rtol=1e-5)


def test_group_linears_are_batch_invariant_bit_for_bit(linear_kernels: None) -> None:
    """A row's output is the same bits alone or among 1..40 rows, first, middle or last, at
    1 or 2 threads: the row tiles (16 rows) and thread splits never change its sums."""
    torch.manual_seed(5)
    weight = torch.randn(96, 192) * 0.05
    packed = int4.KernelInt4.pack(int4.quantize_int4(weight))
    head = q8.Q8Weight.quantize(weight)
    int4_op, q8_op = cpu_kernels.int4_linear(), cpu_kernels.q8_linear()
    assert int4_op is not None and q8_op is not None
    calls = {"int4": lambda x: int4_op(x, packed.codes, packed.d, packed.m),
             "q8": lambda x: q8_op(x, head.codes, head.d)}
    x = torch.randn(40, 192)
    threads = torch.get_num_threads()
    try:
        for name, call in calls.items():
            alone = torch.cat([call(x[i:i + 1]) for i in range(len(x))])
            for num_threads in sorted({1, 2, threads}):
                torch.set_num_threads(num_threads)
                for rows in (2, 15, 16, 17, 33, 40):
                    assert torch.equal(call(x[:rows]), alone[:rows]), (name, rows)
                    assert torch.equal(call(x[-rows:]), alone[-rows:]), (name, rows)
    finally:
        torch.set_num_threads(threads)


def test_q8_reproduces_a_q8_0_tensor_exactly_and_matches_fp64(linear_kernels: None) -> None:
    """fp32 values that came from Q8_0 groups (fp16 d, codes -127..127 with a +-127 in each
    group, as GGUF writes them) quantize back to the same codes and scales, so the head
    computes with the file's own weights."""
    torch.manual_seed(9)
    out_features, in_features = 64, 128
    d = (torch.rand(out_features, in_features // 32) * 0.01 + 1e-4).half().float()
    codes = torch.randint(-127, 128, (out_features, in_features // 32, 32))
    codes[..., 0] = 127 * torch.where(torch.rand(out_features, in_features // 32) < 0.5, 1, -1)
    weight = (codes.float() * d[..., None]).view(out_features, in_features)
    packed = q8.Q8Weight.quantize(weight)
    assert torch.equal(packed.dequantize(), weight)
    kernel = cpu_kernels.q8_linear()
    assert kernel is not None
    x = torch.randn(7, in_features)
    torch.testing.assert_close(kernel(x, packed.codes, packed.d).double(),
                               x.double() @ weight.double().T, atol=1e-5, rtol=1e-5)
    projection = q8.Q8Projection(weight)
    torch.testing.assert_close(projection(x[None]).double()[0], x.double() @ weight.double().T,
                               atol=1e-5, rtol=1e-5)


def test_group_linears_reject_bad_layouts(linear_kernels: None) -> None:
    packed = int4.KernelInt4.pack(int4.quantize_int4(torch.randn(32, 64)))
    int4_op, q8_op = cpu_kernels.int4_linear(), cpu_kernels.q8_linear()
    assert int4_op is not None and q8_op is not None
    with pytest.raises(RuntimeError, match="disagree on K"):
        int4_op(torch.randn(2, 96), packed.codes, packed.d, packed.m)
    with pytest.raises(RuntimeError, match="float32"):
        int4_op(torch.randn(2, 64).double(), packed.codes, packed.d, packed.m)
    with pytest.raises(RuntimeError, match="float16"):
        int4_op(torch.randn(2, 64), packed.codes, packed.d.float(), packed.m)
    head = q8.Q8Weight.quantize(torch.randn(32, 64))
    with pytest.raises(RuntimeError, match="int8"):
        q8_op(torch.randn(2, 64), head.codes.to(torch.uint8), head.d)
    with pytest.raises(ValueError, match="multiple of 16"):
        q8.Q8Weight.quantize(torch.randn(20, 64))


def test_int4_projection_takes_the_kernel_or_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Int4Projection computes with our kernel when it is built (fp32 results) and with
    PyTorch's bf16 kernel when the kernels are off; both near the dequantized weight."""
    torch.manual_seed(2)
    weight = int4.quantize_int4(torch.randn(64, 128) * 0.05)
    x = torch.randn(5, 128)
    expected = x.double() @ weight.dequantize().double().T
    built = cpu_kernels.int4_linear() is not None
    ours = int4.Int4Projection(weight)  # our kernel where built: fp32 all the way
    if built:  # its weights: fp16 d and m
        torch.testing.assert_close(ours(x).double(),
                                   x.double() @ kernel_int4_reference(weight).double().T,
                                   atol=2e-5, rtol=0)
    torch.testing.assert_close(ours(x).double(), expected, atol=5e-2, rtol=2e-2)
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "0")
    if int4.int4_kernel_available():  # PyTorch's: bf16 inputs and outputs
        theirs = int4.Int4Projection(weight)
        torch.testing.assert_close(theirs(x).double(), expected, atol=5e-2, rtol=2e-2)
        if built:
            assert not torch.equal(theirs(x), ours(x))
