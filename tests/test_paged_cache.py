"""Paged rolling KV cache through the model: exactness past W, kernels against references."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from model.attention import decode_attention, paged_decode_attention
from model.block_table import BlockManager, ring_segments
from model.paged_cache import (
    PagedChunk,
    PagedDecode,
    PagedGeometry,
    PagedKVCache,
    gathered_decode,
)
from model.transformer import Transformer
from model.weights import load_weights
from tests.checkpoints import make_tiny_swa_checkpoint

WINDOW, BLOCK = 16, 4


@pytest.fixture(scope="module")
def swa_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_swa_checkpoint(tmp_path_factory.mktemp("paged"), WINDOW)


def test_paged_logits_equal_full_windowed_forward(swa_checkpoint: Path) -> None:
    """W=16, B=4 (R=5): prompt 40 in chunks, then 60 decodes; every step's logits equal a full
    forward with the sliding-window mask (transformers), and the table never exceeds R."""
    from transformers import AutoModelForCausalLM

    loaded = load_weights(swa_checkpoint, progress=False)
    model = Transformer.from_tensors(loaded.config, loaded.tensors)
    geometry = PagedGeometry.for_model(loaded.config, 512, torch.float32, BLOCK)
    assert geometry.table_len == 5
    cache = PagedKVCache(geometry, 12, torch.float32)
    manager = BlockManager(cache.pool, BLOCK, geometry.table_len)
    assert manager.grow("other", 7)  # another sequence's blocks sit in the pool first
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 32000, (40,), generator=gen).tolist()
    step_logits = []
    for start in range(0, 40, 12):  # chunked prefill: 12, 12, 12, 4 tokens
        count = min(12, 40 - start)
        assert manager.grow("s", start + count)
        chunk = PagedChunk(manager.table("s"), start, count)
        step_logits.append(model(torch.tensor(tokens[start:start + count]), [chunk], cache,
                                 all_logits=True))
    assert manager.num_blocks_of("s") == 5
    for _ in range(60):  # 60 decodes wrap the 20-row ring three times
        next_id = int(step_logits[-1][-1].argmax())
        tokens.append(next_id)
        assert manager.grow("s", len(tokens))
        assert manager.num_blocks_of("s") <= geometry.table_len
        chunk = PagedChunk(manager.table("s"), len(tokens) - 1, 1)
        step_logits.append(model(torch.tensor([next_id]), [chunk], cache))
    ours = torch.cat(step_logits)  # [100, V]
    hf = AutoModelForCausalLM.from_pretrained(swa_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)[None]).logits[0]  # explicit sliding-window mask
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    manager.release("s")
    manager.release("other")
    assert cache.pool.num_free == 12


def test_batched_paged_decode_equals_each_sequence_alone(swa_checkpoint: Path) -> None:
    """Prefill and decode of several sequences in one pass equal each one run by itself."""
    loaded = load_weights(swa_checkpoint, progress=False)
    model = Transformer.from_tensors(loaded.config, loaded.tensors)
    geometry = PagedGeometry.for_model(loaded.config, 512, torch.float32, BLOCK)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 32000, (n,), generator=gen).tolist() for n in (3, 17, 30, 9)]

    def run(indices: list[int]) -> dict[int, torch.Tensor]:
        cache = PagedKVCache(geometry, 40, torch.float32)
        manager = BlockManager(cache.pool, BLOCK, geometry.table_len)
        seqs = {i: list(prompts[i]) for i in indices}
        out: dict[int, list[torch.Tensor]] = {i: [] for i in indices}
        for step in range(25):
            ids: list[int] = []
            chunks = []
            for i in indices:
                start = 0 if step == 0 else len(seqs[i]) - 1
                assert manager.grow(str(i), len(seqs[i]))
                ids += seqs[i][start:]
                chunks.append(PagedChunk(manager.table(str(i)), start, len(seqs[i]) - start))
            logits = model(torch.tensor(ids), chunks, cache)  # [len(indices), V]
            for row, i in enumerate(indices):
                out[i].append(logits[row])
                seqs[i].append(int(logits[row].argmax()))
        return {i: torch.stack(v) for i, v in out.items()}

    together = run([0, 1, 2, 3])
    for i in range(4):
        torch.testing.assert_close(together[i], run([i])[i], atol=1e-4, rtol=0)


@pytest.mark.parametrize("max_runs", [1, 4, 100])
def test_paged_decode_kernel_matches_padded_reference(max_runs: int) -> None:
    """In place over runs, gathered past max_runs, and the CUDA path's padded gather (run on
    CPU here) all equal the padded masked kernel."""
    rng = random.Random(max_runs)
    torch.manual_seed(0)
    kv_heads, group, dim, block, table_len, num_blocks = 2, 3, 16, 4, 6, 64
    k_rows = torch.randn(kv_heads, num_blocks * block, dim)  # [KVH, P, D]
    v_rows = torch.randn(kv_heads, num_blocks * block, dim)
    free = list(range(num_blocks))
    rng.shuffle(free)
    runs = []
    for _ in range(5):
        table = [free.pop() for _ in range(table_len)]
        pos = rng.randint(1, 60)
        seen = min(pos + 1, 20)
        runs.append(tuple(ring_segments(table, pos + 1 - seen, seen, block, table_len)))
    q = torch.randn(len(runs), kv_heads * group, dim)
    plan = PagedDecode(token_index=torch.arange(len(runs)), write_rows=torch.zeros(0),
                       runs=tuple(runs), covers_batch=True)
    index, valid = plan.gather_index("cpu")
    expected = decode_attention(q, k_rows[:, index].transpose(0, 1),
                                v_rows[:, index].transpose(0, 1), valid)
    ours = paged_decode_attention(q, k_rows, v_rows, plan.runs, max_runs_in_place=max_runs)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gathered_decode(q, k_rows, v_rows, plan), expected)
