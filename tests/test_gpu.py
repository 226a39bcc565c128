"""CUDA path: attention backends and the engine in bf16 on a GPU (skipped without one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.attention import decode_attention, prefill_attention
from tests.checkpoints import make_tiny_hf_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize(("num_q", "history", "window"), [(300, 0, 64), (64, 63, 64),
                                                          (128, 40, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_attention_on_cuda_matches_cpu(num_q: int, history: int, window: int | None,
                                               dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(num_q, 8, 64, generator=gen)
    k = torch.randn(num_q + history, 2, 64, generator=gen)
    v = torch.randn(num_q + history, 2, 64, generator=gen)
    ref = prefill_attention(q, k, v, history, window)
    ours = prefill_attention(q.cuda().to(dtype), k.cuda().to(dtype), v.cuda().to(dtype),
                             history, window)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(ours.float().cpu(), ref, atol=tol, rtol=tol)


def test_decode_attention_on_cuda_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(4, 8, 64, generator=gen)
    k = torch.randn(4, 2, 33, 64, generator=gen)
    v = torch.randn(4, 2, 33, 64, generator=gen)
    valid = torch.arange(33)[None, :] < torch.tensor([33, 10, 1, 20])[:, None]
    ref = decode_attention(q, k, v, valid)
    ours = decode_attention(q.cuda(), k.cuda(), v.cuda(), valid.cuda())
    torch.testing.assert_close(ours.cpu(), ref, atol=1e-4, rtol=1e-4)


def test_engine_on_cuda_bf16_tracks_cpu_fp32(tmp_path: Path) -> None:
    from model.engine import Engine
    from model.engine_args import EngineArgs
    from model.requests import GenerationRequest
    from model.sampling_params import SamplingParams

    folder = make_tiny_hf_checkpoint(tmp_path, model_type="mistral", sliding_window=16)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    request = GenerationRequest("g", tuple(range(5, 45)), params)
    cpu = Engine.from_args(EngineArgs(model=str(folder), device="cpu", max_model_len=128,
                                      progress=False))
    gpu = Engine.from_args(EngineArgs(model=str(folder), device="cuda", max_model_len=128,
                                      progress=False))
    assert gpu.model.dtype == torch.bfloat16
    cpu_ids = cpu.run_to_completion([request])[0].token_ids
    gpu_ids = gpu.run_to_completion([request])[0].token_ids
    # bf16 rounding may flip a late near-tie; the first tokens must agree
    assert gpu_ids[:3] == cpu_ids[:3]
    assert len(gpu_ids) == 8


def test_paged_decode_on_cuda_matches_cpu_in_place() -> None:
    """The CUDA paged decode (blocks gathered into a padded batch) equals the CPU kernel that
    reads the same blocks in place, for windows that wrap the ring."""
    from model.attention import paged_decode_attention
    from model.block_table import ring_segments
    from model.paged_cache import PagedDecode, gathered_decode

    gen = torch.Generator().manual_seed(2)
    k_rows = torch.randn(2, 64 * 4, 64, generator=gen)  # [KVH, blocks * B, D], B = 4
    v_rows = torch.randn(2, 64 * 4, 64, generator=gen)
    tables = [[5, 9, 2, 40, 41], [0, 1, 2, 3, 4], [63, 7, 8, 30, 31]]
    runs = tuple(tuple(ring_segments(t, p + 1 - min(p + 1, 16), min(p + 1, 16), 4, 5))
                 for t, p in zip(tables, (57, 9, 63), strict=True))
    plan = PagedDecode(token_index=torch.arange(3), write_rows=torch.zeros(0),
                       runs=runs, covers_batch=True)
    q = torch.randn(3, 8, 64, generator=gen)
    ref = paged_decode_attention(q, k_rows, v_rows, runs)
    ours = gathered_decode(q.cuda(), k_rows.cuda(), v_rows.cuda(), plan)
    torch.testing.assert_close(ours.cpu(), ref, atol=1e-4, rtol=1e-4)
