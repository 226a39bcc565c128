"""The engine on the paged rolling cache: preemption under a small pool, batch invariance,
blocks held per sequence (W = 16, B = 4, so R = 5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.engine import Engine
from model.engine_args import EngineArgs
from model.paged_cache import PagedGeometry
from model.requests import GenerationRequest
from model.sampling_params import SamplingParams
from model.weights import load_weights
from tests.checkpoints import make_tiny_hf_checkpoint

WINDOW, BLOCK = 16, 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("paged_engine"),
                                   model_type="mistral", sliding_window=WINDOW)


def make_engine(checkpoint: Path, num_blocks: int | None = None) -> Engine:
    memory = None
    if num_blocks is not None:
        config = load_weights(checkpoint, progress=False).config
        geometry = PagedGeometry.for_model(config, 128, torch.float32, BLOCK)
        memory = num_blocks * geometry.bytes_per_block
    return Engine.from_args(EngineArgs(model=str(checkpoint), max_model_len=128,
                                       max_num_seqs=32, max_num_batched_tokens=96,
                                       prefill_chunk=24, block_size=BLOCK,
                                       kv_cache_memory=memory, progress=False))


@pytest.fixture(scope="module")
def roomy(checkpoint: Path) -> Engine:
    return make_engine(checkpoint, num_blocks=400)


def prompt(n: int, seed: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(3, 32000, (n,), generator=gen).tolist())


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def test_a_sequence_holds_ceil_len_over_b_blocks_and_never_more_than_r(roomy: Engine) -> None:
    assert roomy.cache.table_len == 5
    roomy.add(GenerationRequest("ten", prompt(10, 1), greedy(60)))
    roomy.step()  # the whole prompt prefilled
    assert roomy.blocks.num_blocks_of("ten#0") == 3
    held = []
    while roomy.has_work:
        seq = roomy.scheduler.running.get("ten#0")
        if seq is not None:
            held.append(roomy.blocks.num_blocks_of("ten#0"))
            # between steps the table covers the cached positions; the next one's block is
            # taken when that position is scheduled
            assert held[-1] == min(-(-seq.num_computed // BLOCK), 5)
        roomy.step()
    assert max(held) == 5
    assert roomy.cache.pool.num_free == roomy.cache.num_blocks


def test_32_mixed_requests_together_equal_each_alone(roomy: Engine) -> None:
    requests = [GenerationRequest(f"mix{i}", prompt(3 + (i * 7) % 50, 300 + i),
                                  greedy(5 + (i * 11) % 36)) for i in range(32)]
    together = roomy.run_to_completion(requests)
    assert roomy.scheduler.preemptions_total == 0
    alone = [roomy.run_to_completion([r])[0] for r in requests]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [len(c.token_ids) for c in together] == [r.params.max_tokens for r in requests]
    assert roomy.cache.pool.num_free == roomy.cache.num_blocks


def test_small_pool_preempts_and_every_request_keeps_its_solo_output(
        checkpoint: Path, roomy: Engine) -> None:
    tight = make_engine(checkpoint, num_blocks=12)  # R = 5: room for two full tables and a bit
    requests = [GenerationRequest(f"p{i}", prompt(4 + 3 * i, 700 + i), greedy(24 + 4 * i))
                for i in range(6)]
    together = tight.run_to_completion(requests)
    assert tight.scheduler.preemptions_total > 0  # the pool was too small for them all
    assert tight.stats().preemptions_total == tight.scheduler.preemptions_total
    solo = [roomy.run_to_completion([r])[0] for r in requests]
    assert [c.token_ids for c in together] == [c.token_ids for c in solo]
    assert all(c.finish_reason == "length" for c in together)
    assert tight.cache.pool.num_free == tight.cache.num_blocks  # no block leaked
    assert not tight.scheduler.has_work


def test_pool_must_hold_one_full_table(checkpoint: Path) -> None:
    from model.engine import EngineRequestError

    with pytest.raises(EngineRequestError, match="one sequence may need 5"):
        make_engine(checkpoint, num_blocks=4)
