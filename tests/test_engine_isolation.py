"""One request's failure inside an engine step is its own (the real engine, tiny checkpoint).

A request that slipped past validation (a seed beyond 64 bits), whose sampling raises, or
whose detokenizing raises, joins a running batch; it ends with finish_reason ``error`` and no
more, while every other request completes with exactly the tokens it produces alone, and the
engine then serves new requests with all its slots free.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

import model.engine.model_runner as model_runner_module
import model.engine.output_processor as output_processor_module
from model.engine import Engine
from model.engine_args import EngineArgs
from model.requests import GenerationChunk, GenerationRequest
from model.sampling_params import SamplingParams, SamplingParamsError
from tests.checkpoints import make_tiny_hf_checkpoint

SLOTS = 6


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    path = make_tiny_hf_checkpoint(tmp_path_factory.mktemp("iso"), model_type="mistral",
                                   sliding_window=16, hidden_size=128, intermediate_size=256,
                                   num_layers=2, num_heads=4, num_kv_heads=2)
    return Engine.from_args(EngineArgs(model=str(path), max_model_len=128, max_num_seqs=SLOTS,
                                       max_num_batched_tokens=64, progress=False))


def prompt(n: int, seed: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(3, 32000, (n,), generator=gen).tolist())


def others() -> list[GenerationRequest]:
    """The requests that must not notice: greedy, seeded sampling, and n=2 seeded sampling."""
    return [
        GenerationRequest("greedy", prompt(7, 1), SamplingParams(
            max_tokens=24, temperature=0.0, ignore_eos=True)),
        GenerationRequest("seeded", prompt(11, 2), SamplingParams(
            max_tokens=24, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True)),
        GenerationRequest("pair", prompt(5, 3), SamplingParams(
            max_tokens=20, temperature=1.1, top_k=50, seed=99, n=2, ignore_eos=True)),
    ]


def solo(engine: Engine, request: GenerationRequest) -> list[tuple[int, ...]]:
    return [c.token_ids for c in engine.run_to_completion([request])]


async def collect(engine: Engine, request: GenerationRequest,
                  started: asyncio.Event | None = None) -> list[GenerationChunk]:
    chunks = []
    async for chunk in engine.generate(request):
        chunks.append(chunk)
        if started is not None and sum(len(c.token_ids) for c in chunks) >= 3:
            started.set()
    return chunks


def tokens_per_choice(chunks: list[GenerationChunk], n: int) -> list[tuple[int, ...]]:
    return [tuple(t for c in chunks if c.index == i for t in c.token_ids) for i in range(n)]


def run_with_intruder(engine: Engine, intruder: GenerationRequest
                      ) -> tuple[list[list[GenerationChunk]], list[GenerationChunk]]:
    """Start the others, and once they are decoding, the intruder; all run to their end."""

    async def scenario() -> tuple[list[list[GenerationChunk]], list[GenerationChunk]]:
        started = asyncio.Event()
        running = [asyncio.ensure_future(collect(engine, r, started if i == 0 else None))
                   for i, r in enumerate(others())]
        await asyncio.wait_for(started.wait(), 60)
        bad = await asyncio.wait_for(collect(engine, intruder), 60)
        return list(await asyncio.gather(*running)), bad

    return asyncio.run(scenario())


def check_isolated(engine: Engine, results: list[list[GenerationChunk]],
                   bad: list[GenerationChunk], n_bad: int) -> None:
    for request, chunks in zip(others(), results, strict=True):
        assert tokens_per_choice(chunks, request.params.n) == solo(engine, request), (
            request.request_id)
        finishes = [c.finish_reason for c in chunks if c.finish_reason is not None]
        assert finishes == ["length"] * request.params.n
    assert sorted(c.index for c in bad if c.finish_reason == "error") == list(range(n_bad))
    assert all(c.finish_reason in (None, "error") for c in bad)
    # nothing is left behind, and the engine goes on serving
    assert engine.healthy and engine.cache.pool.num_free == engine.cache.num_blocks
    assert not engine.sequences and not engine.request_sequences
    again = others()[0]
    assert [c.token_ids for c in engine.run_to_completion([again])] == solo(engine, again)


def test_seed_beyond_64_bits_is_refused_by_sampling_params() -> None:
    with pytest.raises(SamplingParamsError, match="64-bit"):
        SamplingParams(seed=2**70)
    SamplingParams(seed=2**63 - 1)
    SamplingParams(seed=-(2**63))


def test_a_seed_that_slipped_past_validation_fails_alone(engine: Engine) -> None:
    # the bug: seeding raised inside the step and dropped the whole batch
    params = SamplingParams(max_tokens=8, temperature=1.0, n=2)
    object.__setattr__(params, "seed", 2**70)
    results, bad = run_with_intruder(engine, GenerationRequest("overflow", prompt(6, 4), params))
    assert all(not c.token_ids for c in bad)
    check_isolated(engine, results, bad, n_bad=2)


def test_a_request_whose_sampling_raises_fails_alone(engine: Engine,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    doomed = SamplingParams(max_tokens=30, temperature=0.7, seed=5, ignore_eos=True)
    real_sample = model_runner_module.sample
    calls = {"batched": 0}

    def sample(logits, rows):  # the sampler's own signature
        if len(rows) > 1:
            calls["batched"] += 1
        doomed_row = next((r for r in rows if r.params is doomed), None)
        if doomed_row is not None and len(doomed_row.output_token_ids) >= 3:
            # draw from every seeded generator first, as a failure midway through would
            for row in rows:
                if row.generator is not None:
                    torch.rand(4, generator=row.generator)
            raise RuntimeError("injected sampling failure")
        return real_sample(logits, rows)

    monkeypatch.setattr(model_runner_module, "sample", sample)
    results, bad = run_with_intruder(engine, GenerationRequest("sampler", prompt(9, 5), doomed))
    assert sum(len(c.token_ids) for c in bad) == 3 and calls["batched"] > 0
    check_isolated(engine, results, bad, n_bad=1)


def test_a_request_whose_detokenizing_raises_fails_alone(engine: Engine,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    real_push = output_processor_module.IncrementalDetokenizer.push
    counts: dict[int, int] = {}

    def push(self, token_id: int) -> str:  # the detokenizer's own signature
        seq = next((s for s in engine.sequences.values() if s.detokenizer is self), None)
        if seq is not None and seq.request.request_id == "detok":
            counts[seq.index] = counts.get(seq.index, 0) + 1
            if seq.index == 1 and counts[1] == 4:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return real_push(self, token_id)

    monkeypatch.setattr(output_processor_module.IncrementalDetokenizer, "push", push)
    params = SamplingParams(max_tokens=30, temperature=0.0, n=2, ignore_eos=True)
    results, bad = run_with_intruder(engine, GenerationRequest("detok", prompt(8, 6), params))
    # choice 1 raised on its 4th token: the whole request (both choices) ends with error
    first, second = tokens_per_choice(bad, 2)
    assert len(second) == 3 and len(first) in (3, 4)
    check_isolated(engine, results, bad, n_bad=2)
